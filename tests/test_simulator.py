"""The fleet simulator against a real mosquitto: scenarios, rounds, dropout, availability, repeatability, scale."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_artifacts import artifact_path
from device_runtime.rounds import device_shuffle_seed
from device_runtime.artifact import read_manifest
from device_runtime.model import TrainableModel
from device_runtime.protocol import Task, decode_update, encode_weights, is_selected, payload_hash
from device_runtime.protocol.topics import weights_topic
from device_runtime.training import train_locally
from fedge.broker import EmbeddedBroker
from fedge.job import load_job
from fedge.simulation.datasets import ClientData
from simulator import Availability, Fleet, ScenarioError, load_scenario
from simulator.cli import main as simulate_main
from simulator.scenario import parse_bandwidth
from test_device_agent import TIMEOUT_S, Server, tls_broker, wait_until  # noqa: F401 (tls_broker is a fixture)

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = REPO / "simulator" / "scenarios"
SCALE_DEVICES = 1000


def _raise_open_files_limit(wanted: int = 4096) -> None:
    """Let this process, and the session's mosquitto started after collection, hold 1,000+ sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


_raise_open_files_limit()  # at import, i.e. during collection, before the session broker starts


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The 'mlp' test artifact: input (8,), 3 classes, batch 4."""
    return artifact_path("mlp", tmp_path_factory.mktemp("artifacts")).read_bytes()


@pytest.fixture(scope="module")
def manifest(model_bytes: bytes) -> dict[str, Any]:
    return read_manifest(model_bytes)


def client_data(num_clients: int, seed: int = 0) -> ClientData:
    """Synthetic clients for the mlp artifact: 6 to 13 examples each."""
    rng = np.random.default_rng(seed)
    return ClientData.from_arrays({
        f"client_{i:04d}": (rng.normal(size=(n, 8)).astype(np.float32), rng.integers(0, 3, size=n).astype(np.int32))
        for i, n in enumerate(rng.integers(6, 14, size=num_clients))})


def scenario(fleet: str, *groups: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """A scenario dict with these groups."""
    return {"fleet": fleet, "seed": seed, "groups": list(groups)}


@pytest.fixture
def fleet_id() -> str:
    """A fresh fleet per test, so retained messages of other tests never interfere."""
    return f"s{uuid.uuid4().hex[:10]}"


@pytest.fixture
def server(mosquitto_broker: tuple[str, int], fleet_id: str) -> Iterator[Server]:
    server = Server(*mosquitto_broker, fleet_id)
    yield server
    server.close()


@pytest.fixture
def start_fleet(mosquitto_broker: tuple[str, int]) -> Iterator[Callable[..., Fleet]]:
    """Start fleets on the session broker (clients from `client_data` unless given); stop them at teardown."""
    fleets: list[Fleet] = []

    def start(spec: dict[str, Any], clients: ClientData | None = None, **options: Any) -> Fleet:
        host, port = mosquitto_broker
        total = sum(group["count"] for group in spec["groups"])
        fleet = Fleet.from_scenario(spec, f"mqtt://{host}:{port}", client_data=clients or client_data(total),
                                    workers=2, **options)
        fleets.append(fleet)
        fleet.start()
        return fleet

    yield start
    for fleet in fleets:
        fleet.stop()


def publish_round(server: Server, model_bytes: bytes, manifest: dict[str, Any], round_id: int, seed: int = 0,
                  **fields: Any) -> tuple[Task, list[np.ndarray], bytes]:
    """Retain the model, random global weights and a task naming them; (task, weights, weights payload)."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(scale=0.3, size=w.shape).astype(np.float32) for w in manifest.weights]
    payload = encode_weights(server.fleet, round_id, manifest.content_hash, weights,
                             manifest.metrics.variables, run_id="job-1")
    server.publish_model(model_bytes)
    server.publish(weights_topic(server.fleet), payload)
    task = server.publish_task(manifest.content_hash, round_id, weights_hash=payload_hash(payload), **fields)
    return task, weights, payload


def collect_updates(server: Server, manifest: dict[str, Any], count: int, quiet: float = 1.0) -> dict[str, Any]:
    """`count` decoded updates by device id, then check that nothing else arrives for `quiet` seconds."""
    updates = {}
    for _ in range(count):
        device, payload = server.next_update()
        update = decode_update(payload, manifest, fleet=server.fleet, device_id=device)
        assert device not in updates, f"{device} reported twice"
        updates[device] = update
    time.sleep(quiet)
    assert server.updates.empty(), f"unexpected update from {server.next_update()[0]}"
    return updates


def statuses_of(server: Server, device: str) -> list[str]:
    """The states `device` reported, in order."""
    return [status["state"] for sender, status in list(server.statuses) if sender == device]


# ------------------------------------------------------------------------------------------ scenarios


def test_shipped_scenarios_load() -> None:
    job = load_job(None)  # the main job's fleet and data
    digits = job.fleet.scenario(job.rounds.seed)
    assert digits.num_devices == 40 and [g.name for g in digits.groups] == ["phone", "pi", "sensor"]
    assert job.data.partition == "dirichlet" and job.data.alpha == 0.5
    sensor = digits.groups[2]
    assert (sensor.speed, sensor.upload, sensor.availability) == (8.0, 100e3, Availability(((0.0, 40.0),), 60.0))
    ids = [profile.device_id for profile in digits.devices]
    assert ids[0] == "phone-000" and ids[-1] == "sensor-007" and len(set(ids)) == 40
    fleet_1000 = load_scenario(SCENARIOS / "fleet_1000.toml")
    assert fleet_1000.num_devices == SCALE_DEVICES and fleet_1000.data.partition == "iid"


def test_bandwidth_and_availability() -> None:
    assert parse_bandwidth("1 MB/s") == 1e6 and parse_bandwidth("10 Mbit/s") == 1.25e6
    assert parse_bandwidth("250kB/s") == 250e3 and parse_bandwidth(2048) == 2048.0
    periodic = Availability(((1.0, 2.0), (4.0, 5.0)), period=10.0)
    assert periodic.next_window(0.0) == (1.0, 2.0)
    assert periodic.next_window(1.5) == (1.0, 2.0)  # online now
    assert periodic.next_window(2.0) == (4.0, 5.0)
    assert periodic.next_window(7.0) == (11.0, 12.0)
    assert Availability(((1.0, 2.0),)).next_window(3.0) is None
    assert Availability().next_window(3.0) == (3.0, float("inf"))


_GOOD_GROUP = {"name": "a", "count": 2}


@pytest.mark.parametrize("change, message", [
    ({"groups": []}, "groups must be a non-empty array of tables"),
    ({"groups": [{"count": 2}]}, "groups[0].name is required"),
    ({"groups": [{"name": "a/b", "count": 2}]}, "groups[0].name is invalid"),
    ({"groups": [{**_GOOD_GROUP, "count": 0}]}, "groups[0].count must be an integer >= 1, got 0"),
    ({"groups": [{**_GOOD_GROUP, "speed": 0.5}]}, "groups[0].speed must be a number >= 1, got 0.5"),
    ({"groups": [{**_GOOD_GROUP, "sped": 2}]}, "groups[0] has unknown key(s) 'sped'"),
    ({"groups": [{**_GOOD_GROUP, "upload": "fast"}]}, "groups[0].upload is invalid: must be a number of bytes/s"),
    ({"groups": [{**_GOOD_GROUP, "download": -1}]}, "groups[0].download is invalid: must be positive"),
    ({"groups": [{**_GOOD_GROUP, "dropout": 1.5}]}, "dropout must be a number >= 0 and <= 1, got 1.5"),
    ({"groups": [{**_GOOD_GROUP, "downtime": 0}]}, "downtime must be a number > 0"),
    ({"groups": [{**_GOOD_GROUP, "availability": [[5, 3]]}]}, "availability[0] must be [start, end] seconds"),
    ({"groups": [{**_GOOD_GROUP, "availability": [[0, 5], [4, 6]]}]}, "availability[1] must start at or after"),
    ({"groups": [{**_GOOD_GROUP, "period": 10}]}, "period needs availability windows"),
    ({"groups": [{**_GOOD_GROUP, "availability": [[0, 5]], "period": 4}]}, "period must be at least the last window"),
    ({"groups": [_GOOD_GROUP, _GOOD_GROUP]}, "groups names must be unique, 'a' repeat(s)"),
    ({"data": {"dataset": "digits", "partition": "weird"}},
     "data.partition must be one of iid, dirichlet, shards, quantity_skew"),
    ({"data": {"dataset": "digits", "alpha": 0}}, "data.alpha must be a number > 0"),
    ({"fleet": "a/b"}, "fleet is invalid"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"devices": 3}, "the top level has unknown key(s) 'devices'"),
])
def test_scenario_errors_name_the_field(change: dict[str, Any], message: str) -> None:
    spec = {"fleet": "f", "seed": 0, "groups": [_GOOD_GROUP], **change}
    with pytest.raises(ScenarioError) as error:
        load_scenario(spec)
    assert message in str(error.value)


def test_scenario_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("fleet = \n")
    with pytest.raises(ScenarioError, match=f"scenario {re.escape(str(path))}: invalid TOML"):
        load_scenario(path)
    path.write_text('fleet = "f"\n[[groups]]\nname = "pi"\ncount = 3\nspeed = "fast"\ndropout = 2\n')
    with pytest.raises(ScenarioError) as error:  # every error at once, each naming the file and the field
        load_scenario(path)
    assert error.value.errors == [f"scenario {path}: groups[0].speed must be a number >= 1, got 'fast'",
                                  f"scenario {path}: groups[0].dropout must be a number >= 0 and <= 1, got 2"]
    with pytest.raises(ScenarioError, match="cannot read it"):
        load_scenario(tmp_path / "missing.toml")


def test_simulator_never_imports_tensorflow() -> None:
    code = ("import sys, simulator, simulator.cli; "
            "simulator.Fleet.from_scenario('simulator/scenarios/fleet_1000.toml', 'mqtt://127.0.0.1:1'); "
            "from fedge.job import load_job; simulator.Fleet.from_job(load_job(None), 'mqtt://127.0.0.1:1'); "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_fleet_needs_a_client_per_device() -> None:
    with pytest.raises(ValueError, match="3 devices but the client data holds only 2 clients"):
        Fleet.from_scenario(scenario("f", {"name": "a", "count": 3}), "mqtt://127.0.0.1:1883",
                            client_data=client_data(2))


def test_cli_rejects_a_bad_scenario_before_connecting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[groups]]\nname = "pi"\ncount = 3\ndropout = 2\n')
    assert simulate_main([str(path), "--broker", "mqtt://127.0.0.1:1"]) == 2
    assert "groups[0].dropout must be a number >= 0 and <= 1, got 2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- rounds over MQTT


def test_selected_devices_publish_updates_unselected_do_not(server, start_fleet, fleet_id, model_bytes, manifest):
    clients = client_data(50)
    fleet = start_fleet(scenario(fleet_id, {"name": "phone", "count": 30, "download": "10 MB/s", "upload": "1 MB/s"},
                                 {"name": "pi", "count": 20, "speed": 3.0}), clients)
    assert fleet.wait_connected(timeout=TIMEOUT_S), f"{fleet.connected_count()}/50 connected"
    wait_until(lambda: all(server.has_status(device, "online") for device in fleet.device_ids), "50 'online' statuses")
    selected = sorted(str(device) for device in np.random.default_rng(0).choice(fleet.device_ids, 20, replace=False))
    assert {device.split("-")[0] for device in selected} == {"phone", "pi"}
    task, weights, weights_payload = publish_round(server, model_bytes, manifest, 1, selected=selected, epochs=2)

    updates = collect_updates(server, manifest, len(selected))
    assert sorted(updates) == selected
    for device in selected:  # the shared interpreters give exactly what the device would compute alone
        x, y = clients.create_dataset_for_client(clients.client_ids[fleet.device_ids.index(device)]).as_tuple()
        expected = train_locally(TrainableModel(model_bytes, num_threads=1), (x, y), epochs=2,
                                 shuffle_seed=device_shuffle_seed(task.seed, device), learning_rate=task.work.learning_rate,
                                 initial_weights=weights)
        assert updates[device].num_examples == expected.num_examples == 2 * len(x)
        for got, want in zip(updates[device].tensors, expected.delta, strict=True):
            np.testing.assert_array_equal(got, want)
    stats = fleet.stats()
    for device, counters in stats.items():
        trained = device in selected
        assert (counters.rounds_trained, counters.updates_published, counters.models_downloaded) == (trained,) * 3
        assert (counters.bytes_up > 0) == trained and counters.tasks_received == 1
    assert stats[selected[0]].bytes_down == len(model_bytes) + len(weights_payload)

    task2, _, _ = publish_round(server, model_bytes, manifest, 2, seed=1, fraction=0.5, encoding="int8")
    reporters = [device for device in fleet.device_ids if is_selected(task2, device)]
    updates = collect_updates(server, manifest, len(reporters))
    assert sorted(updates) == sorted(reporters)
    assert all(fleet.stats()[d].models_from_cache == 1 for d in reporters if d in selected), "model fetched again"


def test_dropout_devices_vanish_mid_round_and_come_back(server, start_fleet, fleet_id, model_bytes, manifest):
    fleet = start_fleet(scenario(fleet_id, {"name": "steady", "count": 5},
                                 {"name": "flaky", "count": 5, "dropout": 1.0, "downtime": 2.0}))
    assert fleet.wait_connected(timeout=TIMEOUT_S)
    flaky = [device for device in fleet.device_ids if device.startswith("flaky")]
    publish_round(server, model_bytes, manifest, 1)

    updates = collect_updates(server, manifest, 5, quiet=0.0)
    assert sorted(updates) == [device for device in fleet.device_ids if device.startswith("steady")]
    wait_until(lambda: all(statuses_of(server, d)[-1:] == ["offline"] for d in flaky), "the flaky devices' last wills")
    for device in flaky:
        assert statuses_of(server, device)[-2:] == ["training", "offline"]  # vanished mid-round, without DISCONNECT
    wait_until(lambda: all(statuses_of(server, d)[-1:] == ["online"] for d in flaky), "the flaky devices to come back")
    assert fleet.wait_connected(timeout=TIMEOUT_S)
    time.sleep(0.5)
    assert server.updates.empty(), "a device that vanished reported the round after all"
    stats = fleet.stats()
    assert all((stats[d].rounds_dropped, stats[d].rounds_trained, stats[d].connects) == (1, 0, 2) for d in flaky)
    assert fleet.totals().rounds_dropped == 5


def test_availability_windows_connect_and_disconnect(server, start_fleet, fleet_id, model_bytes, manifest):
    started = time.monotonic()
    fleet = start_fleet(scenario(fleet_id, {"name": "always", "count": 2},
                                 {"name": "late", "count": 3, "availability": [[1.5, 3.0]], "period": 4.0}))
    late = [device for device in fleet.device_ids if device.startswith("late")]
    assert fleet.wait_connected(2, timeout=TIMEOUT_S)
    publish_round(server, model_bytes, manifest, 1)  # retained: the late devices find it when they come online
    assert sorted(collect_updates(server, manifest, 2, quiet=0.0)) == ["always-000", "always-001"]
    assert time.monotonic() - started < 1.4 and fleet.connected_count() == 2 and statuses_of(server, late[0]) == []

    assert fleet.wait_connected(5, timeout=TIMEOUT_S)
    assert 1.4 < time.monotonic() - started < 3.0
    assert sorted(collect_updates(server, manifest, 3, quiet=0.0)) == late  # the retained task, trained on arrival
    wait_until(lambda: fleet.connected_count() == 2, "the late devices to leave at the end of their window")
    assert 2.9 < time.monotonic() - started < 5.5
    assert all(statuses_of(server, device)[-1] == "offline" for device in late)
    assert fleet.wait_connected(5, timeout=TIMEOUT_S)  # the next window: [5.5, 7)
    assert time.monotonic() - started > 5.4
    assert all(fleet.stats()[device].connects == 2 for device in late)
    time.sleep(0.3)
    assert server.updates.empty(), "a device trained the same round twice"


def _one_run(mosquitto_broker: tuple[str, int], model_bytes: bytes, manifest: dict[str, Any],
             seed: int) -> dict[str, list[np.ndarray]]:
    """A fresh fleet (20 devices, half of them dropping out at random) trains one fraction-selected round."""
    fleet_id = f"r{uuid.uuid4().hex[:10]}"
    server = Server(*mosquitto_broker, fleet_id)
    spec = scenario(fleet_id, {"name": "a", "count": 10}, {"name": "b", "count": 10, "dropout": 0.5, "downtime": 60},
                    seed=seed)
    host, port = mosquitto_broker
    fleet = Fleet.from_scenario(spec, f"mqtt://{host}:{port}", client_data=client_data(20, seed), workers=2)
    try:
        fleet.start()
        assert fleet.wait_connected(timeout=TIMEOUT_S)
        task, _, _ = publish_round(server, model_bytes, manifest, 1, fraction=0.6, epochs=2)
        wait_until(lambda: all(s.rounds_trained + s.rounds_dropped == 1 for d, s in fleet.stats().items()
                               if is_selected(task, d)), "every selected device to train or drop out")
        updates = collect_updates(server, manifest, fleet.totals().rounds_trained, quiet=0.2)
        return {device: update.tensors for device, update in updates.items()}
    finally:
        fleet.stop()
        server.close()


def test_same_seed_same_selection_dropouts_and_deltas(mosquitto_broker, model_bytes, manifest):
    first, second = (_one_run(mosquitto_broker, model_bytes, manifest, seed=3) for _ in range(2))
    assert sorted(first) == sorted(second) and len(first) >= 5
    for device in first:
        for a, b in zip(first[device], second[device], strict=True):
            np.testing.assert_array_equal(a, b)
    other = _one_run(mosquitto_broker, model_bytes, manifest, seed=4)
    assert sorted(other) != sorted(first), "another seed should drop other devices"


def test_tls_with_password(tls_broker, fleet_id, caplog):
    broker, cert = tls_broker
    url = f"mqtts://{broker.host}:{broker.port}"
    fleets = [Fleet.from_scenario(scenario(f"{fleet_id}{i}", {"name": "a", "count": 3}), url,
                                  client_data=client_data(3), username="dev", password=password, tls_ca=str(cert),
                                  workers=1)
              for i, password in enumerate(("s3cret", "wrong"))]
    try:
        for fleet in fleets:
            fleet.start()
        assert fleets[0].wait_connected(timeout=TIMEOUT_S)
        wait_until(lambda: "the broker refused the connection" in caplog.text, "the wrong password to be refused")
        assert fleets[1].connected_count() == 0
    finally:
        for fleet in fleets:
            fleet.stop()


def test_stop_returns_when_the_broker_stops_answering(fleet_id, caplog):
    """A frozen broker (SIGSTOP) cannot acknowledge 'offline': stop() names the devices, drops them and returns."""
    with EmbeddedBroker("mosquitto") as broker:
        fleet = Fleet.from_scenario(scenario(fleet_id, {"name": "a", "count": 3}), broker.url,
                                    client_data=client_data(3), workers=1)
        fleet.start()
        assert fleet.wait_connected(timeout=TIMEOUT_S)
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            fleet.stop(timeout=1.0)
            assert time.monotonic() - started < 4.0
        finally:
            os.kill(broker.pid, signal.SIGCONT)
    assert f"fleet {fleet_id}: 3 device(s) not offline within 1 s" in caplog.text
    assert set(fleet.stats()) == set(fleet.device_ids)  # the final counters survive the forced stop


# ---------------------------------------------------------------------------------------------- scale


def test_one_machine_holds_1000_connected_devices(mosquitto_broker, tmp_path):
    """`python -m simulator` connects the 1,000-device scenario; the broker sees every device online."""
    host, port = mosquitto_broker
    server = Server(host, port, load_scenario(SCENARIOS / "fleet_1000.toml").fleet)
    stats_path = tmp_path / "stats.json"
    command = [sys.executable, "-m", "simulator", str(SCENARIOS / "fleet_1000.toml"), "--broker",
               f"mqtt://{host}:{port}", "--duration", "4", "--stats", str(stats_path)]
    started = time.monotonic()
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        online = {device for device, status in list(server.statuses) if status["state"] == "online"}
    finally:
        server.close()
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    connected = re.search(r"all 1000 devices connected after ([0-9.]+) s", result.stdout)
    assert connected, result.stdout + result.stderr
    peak_rss = re.search(r"peak RSS ([0-9]+) MB", result.stdout)
    print(f"\n1000 devices connected in {connected.group(1)} s; simulator peak RSS {peak_rss.group(1)} MB; "
          f"whole run {elapsed:.1f} s")
    assert float(connected.group(1)) < 30
    assert len(online) == SCALE_DEVICES, f"the broker saw {len(online)} devices online"
    stats = json.loads(stats_path.read_text())
    assert len(stats) == SCALE_DEVICES and all(counters["connects"] == 1 for counters in stats.values())
