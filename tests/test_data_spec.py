"""A job's [data]: each source, its held-out examples, its clients per device, and the errors of a bad table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedge.job import JobError, parse_job
from fedge.simulation.data_spec import DataSpec, parse_data
from fedge.tables import Table

PLAY = "".join(f"ROLE {i}:\nSpeech number {j} of role {i}, long enough to make a few sequences.\n\n"
               for i in range(6) for j in range(3))


def _npz(path: Path, count: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.normal(size=(count, 4)).astype(np.float32), y=rng.integers(0, 3, count))
    return path


def test_an_npz_is_split_over_the_devices_after_its_held_out_share(tmp_path: Path) -> None:
    spec = DataSpec(npz=_npz(tmp_path / "all.npz", 100), partition="dirichlet", alpha=1.0, test_fraction=0.2)
    clients, held_out = spec.load(num_clients=5, seed=3)
    train_total = sum(len(clients.create_dataset_for_client(c)) for c in clients.client_ids)
    assert (len(clients), train_total, len(held_out)) == (5, 80, 20)
    again, held_out_again = spec.load(num_clients=5, seed=3)  # seeded
    np.testing.assert_array_equal(held_out.x, held_out_again.x)
    np.testing.assert_array_equal(spec.load_test(seed=3).x, held_out.x)  # what fedge serve evaluates
    assert DataSpec(npz=tmp_path / "all.npz").load(5, 3)[1] is None  # no test, no fraction: nothing held out


def test_a_folder_gives_each_device_one_file_and_says_when_there_are_too_few(tmp_path: Path) -> None:
    for name, count in (("dev-a", 7), ("dev-b", 9), ("dev-c", 4)):
        _npz(tmp_path / f"{name}.npz", count)
    test = _npz(tmp_path.parent / f"{tmp_path.name}-test.npz", 12)
    clients, held_out = DataSpec(folder=tmp_path, test=test).load(num_clients=3, seed=0)
    assert sorted(clients.client_ids) == ["dev-a", "dev-b", "dev-c"] and len(held_out) == 12
    assert len(clients.create_dataset_for_client("dev-b")) == 9
    two, _ = DataSpec(folder=tmp_path).load(num_clients=2, seed=0)  # a seeded choice of 2 of the 3
    assert len(two) == 2 and set(two.client_ids) <= {"dev-a", "dev-b", "dev-c"}
    with pytest.raises(ValueError, match="holds 3 clients, fewer than the 4 devices"):
        DataSpec(folder=tmp_path).load(num_clients=4, seed=0)


def test_a_play_holds_out_whole_speaking_roles(tmp_path: Path) -> None:
    (tmp_path / "play.txt").write_text(PLAY)
    spec = DataSpec(dataset="shakespeare", path=tmp_path / "play.txt", test_fraction=0.34)
    clients, held_out = spec.load(num_clients=4, seed=1)
    assert len(clients) == 4 and all(cid.startswith("ROLE") for cid in clients.client_ids)
    assert held_out.x.shape[1:] == (80,) and held_out.y.shape == held_out.x.shape  # 2 roles' sequences


def test_leaf_femnist_writers_are_devices(tmp_path: Path) -> None:
    users = {f"w{i}": {"x": np.random.default_rng(i).random((3, 784)).tolist(), "y": [i % 10] * 3}
             for i in range(3)}
    (tmp_path / "femnist.json").write_text(json.dumps({"users": list(users), "num_samples": [3, 3, 3],
                                                        "user_data": users}))
    clients, held_out = DataSpec(dataset="emnist_leaf", path=tmp_path / "femnist.json").load(3, seed=0)
    assert sorted(clients.client_ids) == ["w0", "w1", "w2"] and held_out is None
    assert clients.create_dataset_for_client("w1").x.shape == (3, 28, 28, 1)


def _errors(table: dict, base_dir: Path) -> list[str]:
    errors: list[str] = []
    parse_data(Table(table, "job.toml", "data.", errors), base_dir)
    return errors


@pytest.mark.parametrize("table, message", [
    ({"npz": "a.npz", "dataset": "digits"}, "data.dataset and npz are alternatives"),
    ({"npz": "missing.npz"}, "data.npz is invalid: "),
    ({"dataset": "shakespeare"}, "data.path is required with dataset = 'shakespeare'"),
    ({"dataset": "digits", "path": "x.txt"}, "data.path applies to dataset = shakespeare"),
    ({"folder": "."}, None),
    ({"folder": ".", "partition": "iid"}, "data.partition applies to a source that is split over the devices"),
    ({"dataset": "digits", "test": "t.npz", "test_fraction": 0.1}, "data.test_fraction and test are alternatives"),
    ({"dataset": "digits", "test_fraction": 1.0}, "data.test_fraction must be a number > 0 and <= 0.99"),
    ({"dataset": "digits", "shuffle": True}, "data has unknown key(s) 'shuffle'"),
])
def test_a_bad_data_table_names_the_key(table: dict, message: str | None, tmp_path: Path) -> None:
    _npz(tmp_path / "a.npz", 5)
    _npz(tmp_path / "t.npz", 5)
    (tmp_path / "x.txt").write_text(PLAY)
    errors = _errors(table, tmp_path)
    if message is None:
        assert errors == []
    else:
        assert any(line.startswith(f"job.toml: {message}") for line in errors), errors


def test_a_job_without_data_parses_but_cannot_be_simulated(tmp_path: Path) -> None:
    from simulator.fleet import Fleet

    job = parse_job({"model": {"factory": "m:f"}, "fleet": {"id": "f"}}, None, tmp_path)
    assert [problem.split(": ", 1)[1] for problem in job.simulation_problems()] == [
        "[data] is required to simulate: dataset, npz or folder (docs/job.md)",
        "fleet.groups (or fleet.scenario) is required to simulate: the devices to emulate (docs/job.md)"]
    with pytest.raises(ValueError, match="fleet.groups .* is required to simulate"):  # python -m simulator job.toml
        Fleet.from_job(job, "mqtt://127.0.0.1:1")
    too_few = parse_job({"model": {"factory": "m:f"}, "data": {"dataset": "digits"}, "rounds": {"min_reports": 3},
                         "fleet": {"id": "f", "groups": [{"name": "a", "count": 2}]}}, None, tmp_path)
    assert too_few.simulation_problems() == [
        "job 'job': rounds.min_reports (3) is more than the fleet's 2 devices: no round could ever complete"]
    with pytest.raises(JobError, match="data.npz is invalid"):
        parse_job({"model": {"factory": "m:f"}, "data": {"npz": "nope.npz"}}, None, tmp_path)
