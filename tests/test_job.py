"""Job files: every error at once, overrides, `fedge new`, and one job simulated then served with the same result.

The last test is the issue's proof: a user's own Keras CNN on 28x28 images and their own .npz
files, run with `fedge simulate job.toml` (emulated devices, embedded broker) and with
`fedge serve job.toml` to separately started `fedge-device` processes, FedProx and a server
Adam optimizer, ends both ways with the same global weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedge.broker import EmbeddedBroker
from fedge.cli import main
from fedge.job import JobError, load_job, parse_job
from fedge.learning import load_state
from fedge.server.metrics_log import read_metrics_log

TIMEOUT_S = 300
REPO = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BAD_JOB = """
name = "bad"
[model]
keras = "missing.keras"
loss = "huber"
[process]
algorithm = "fedprox"
[process.server_optimizer]
name = "adam"
momentum = 0.9
[rounds]
count = -3
min_reports = 20
[[fleet.groups]]
name = "a"
count = 0
sped = 2
[typo]
x = 1
"""


def test_a_bad_job_gets_every_error_at_once_and_touches_nothing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    job = write(tmp_path / "job.toml", BAD_JOB)
    assert main(["simulate", str(job), "--set", "rounds.deadline=soon", "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.splitlines()
    expected = ["model.keras is invalid: ", "model.loss must be one of ", "model.batch_size is required",
                "rounds.count must be an integer >= 1, got -3", "rounds.deadline must be a number > 0, got 'soon'",
                "rounds.min_reports (20) cannot exceed clients_per_round (10)",
                "process.proximal_mu is required with algorithm = \"fedprox\"",
                "process.server_optimizer.momentum is not a setting of adam",
                "fleet.groups[0].count must be an integer >= 1, got 0", "fleet.groups[0] has unknown key(s) 'sped'",
                "the top level has unknown key(s) 'typo'"]
    assert len(lines) == len(expected), lines
    for line, message in zip(lines, expected):
        assert line.startswith(f"fedge simulate: error: {job}: {message}"), line
    assert not (tmp_path / "out").exists()


def test_overrides_set_any_key_and_paths_resolve_against_their_origin(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "project"
    write(folder / "data" / "train.npz", "")
    write(folder / "model.py", "")
    write(tmp_path / "elsewhere.npz", "")
    job_file = write(folder / "job.toml", '[model]\nfactory = "model:build"\n[data]\nnpz = "data/train.npz"\n'
                                          '[rounds]\ncount = 5\n[fleet]\nid = "f"\n')
    monkeypatch.chdir(tmp_path)
    job = load_job(job_file)
    assert job.data.npz == folder / "data" / "train.npz" and job.model.search_path == folder  # beside the file
    assert job.output.simulation == folder / "reports" / "simulation"
    job = load_job(job_file, [("rounds.count", 50), ("data.npz", "elsewhere.npz"), ("process.aggregator.name",
                                                                                   "median")])
    assert (job.rounds.count, job.data.npz, job.process.aggregator.name) == (50, tmp_path / "elsewhere.npz", "median")
    with pytest.raises(JobError, match="--set rounds: rounds is a table"):
        load_job(job_file, [("rounds", 3)])


def test_a_scenario_file_is_not_mistaken_for_a_job(tmp_path: Path) -> None:
    scenario = write(tmp_path / "fleet.toml", '[[groups]]\nname = "pi"\ncount = 3\n')
    with pytest.raises(JobError, match="this is a fleet scenario .* a job names it in \\[fleet\\] scenario"):
        load_job(scenario)
    job = parse_job({"model": {"factory": "m:f"}, "fleet": {"scenario": str(scenario)}}, None, tmp_path)
    assert job.fleet.num_devices == 3 and job.fleet.id == "simulation"  # the scenario's default fleet id


def test_fedge_new_writes_a_job_that_simulates_and_never_overwrites(tmp_path: Path) -> None:
    folder = tmp_path / "myjob"
    run = subprocess.run([sys.executable, "-m", "fedge.cli", "new", str(folder)], capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stderr
    assert sorted(path.name for path in folder.rglob("*")) == ["data", "job.toml", "model.py", "test.npz",
                                                                "train.npz"]
    again = subprocess.run([sys.executable, "-m", "fedge.cli", "new", str(folder)], capture_output=True, text=True,
                           timeout=TIMEOUT_S)
    assert again.returncode == 2 and "never writes over files" in again.stderr
    run = subprocess.run([sys.executable, "-m", "fedge.cli", "simulate", str(folder / "job.toml"), "--rounds", "3"],
                         capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    records = read_metrics_log(folder / "reports" / "simulation" / "metrics.jsonl")
    assert [(r["round"], r["outcome"]) for r in records] == [(0, "completed"), (1, "completed"), (2, "completed")]
    assert records[-1]["eval_num_examples"] == 360 and records[-1]["eval_accuracy"] > records[0]["eval_accuracy"]


OWN_JOB = """
name = "own"

[model]
keras = "cnn.keras"
loss = "sparse_categorical_crossentropy"
batch_size = 8

[model.optimizer]
name = "sgd"
learning_rate = 0.05
momentum = 0.9

[data]
folder = "devices"   # one .npz per device, named by the device id
test = "test.npz"

[process]
algorithm = "fedprox"
proximal_mu = 0.1
local_epochs = 2

[process.server_optimizer]
name = "adam"
learning_rate = 0.01

[rounds]
count = 3
clients_per_round = 3
min_reports = 3
over_selection = 1.0
deadline = 120
seed = 4

[fleet]
id = "{fleet}"

[[fleet.groups]]
name = "cam"
count = 3
"""


def _own_data(folder: Path) -> None:
    """A user's own data: 28x28x1 images of three blob shapes (float32) with int64 labels, one file per device."""
    rng = np.random.default_rng(0)

    def images(count: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, count)
        grid = np.zeros((count, 28, 28, 1), np.float32)
        for i, label in enumerate(y):
            row, col = 4 + 8 * label, rng.integers(4, 20)
            grid[i, row:row + 6, col:col + 6] = 1.0
        return grid + rng.normal(scale=0.1, size=grid.shape).astype(np.float32), y.astype(np.int64)

    (folder / "devices").mkdir()
    for name, count in (("devices/cam-000", 19), ("devices/cam-001", 11), ("devices/cam-002", 24), ("test", 40)):
        x, y = images(count)
        np.savez(folder / f"{name}.npz", x=x, y=y)


def _own_model(path: Path) -> None:
    import keras

    keras.utils.set_random_seed(3)
    keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Conv2D(4, 5, strides=2, activation="relu"),
                      keras.layers.MaxPooling2D(2), keras.layers.Flatten(),
                      keras.layers.Dense(3, activation="softmax")]).save(path)


def test_a_users_job_simulated_and_served_to_fedge_device_agents_ends_with_the_same_weights(tmp_path: Path,
                                                                                           fleet: str) -> None:
    _own_data(tmp_path)
    _own_model(tmp_path / "cnn.keras")
    job = write(tmp_path / "job.toml", OWN_JOB.replace("{fleet}", fleet))
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    simulated = subprocess.run([sys.executable, "-m", "fedge.cli", "simulate", str(job)], capture_output=True,
                               text=True, timeout=TIMEOUT_S, env=environment)
    assert simulated.returncode == 0, simulated.stdout[-2000:] + simulated.stderr[-3000:]
    with EmbeddedBroker("mosquitto") as broker:
        devices = [subprocess.Popen([sys.executable, "-m", "device_runtime", "--broker", broker.url, "--fleet", fleet,
                                     "--device-id", device, "--data", str(tmp_path / "devices" / f"{device}.npz"),
                                     "--cache-dir", str(tmp_path / f"cache-{device}"), "--num-threads", "1"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=environment)
                   for device in ("cam-000", "cam-001", "cam-002")]
        try:
            time.sleep(1.0)
            served = subprocess.run([sys.executable, "-m", "fedge.cli", "serve", str(job), "--broker", broker.url],
                                    capture_output=True, text=True, timeout=TIMEOUT_S, env=environment)
        finally:
            for device in devices:
                device.terminate()
            assert all(device.wait(TIMEOUT_S) == 0 for device in devices)
    assert served.returncode == 0, served.stdout[-2000:] + served.stderr[-3000:]
    simulation_log = read_metrics_log(tmp_path / "reports" / "simulation" / "metrics.jsonl")
    serve_log = read_metrics_log(tmp_path / "reports" / "serve" / "metrics.jsonl")
    exact, close = ("round", "outcome", "selected", "accepted", "train_num_examples"), ("train_loss", "eval_accuracy")
    assert [[r[k] for k in exact] for r in serve_log] == [[r[k] for k in exact] for r in simulation_log]
    for served_round, simulated_round in zip(serve_log, simulation_log, strict=True):
        assert [served_round[k] for k in close] == pytest.approx([simulated_round[k] for k in close], rel=1e-5)
    assert [r["train_num_examples"] for r in serve_log] == [2 * (19 + 11 + 24)] * 3
    simulated_state = load_state(tmp_path / "reports" / "simulation" / "checkpoints" / "state.npz")
    served_state = load_state(tmp_path / "reports" / "serve" / "checkpoints" / "state.npz")
    for a, b in zip(simulated_state.global_model_weights.to_list(), served_state.global_model_weights.to_list(),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert set(served_state.server_optimizer_state) == {"m", "v"}  # the job's Adam, in serve as in simulate


SMALL_JOB = """
[model]
factory = "model:build"
loss = "sparse_categorical_crossentropy"
batch_size = 4
[data]
npz = "train.npz"
test_fraction = 0.25
[rounds]
count = 30
clients_per_round = 2
min_reports = 2
over_selection = 1.0
[fleet]
id = "{fleet}"
[[fleet.groups]]
name = "dev"
count = 2
"""
SMALL_MODEL = """
import keras

def build():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
"""


def _small_job(folder: Path, fleet: str, features: int = 4, labels: int = 3) -> Path:
    rng = np.random.default_rng(0)
    np.savez(folder / "train.npz", x=rng.normal(size=(40, features)).astype(np.float32),
             y=rng.integers(0, labels, 40))
    write(folder / "model.py", SMALL_MODEL)
    return write(folder / "job.toml", SMALL_JOB.replace("{fleet}", fleet))


@pytest.mark.parametrize("features, labels, message", [
    (5, 3, "the examples of client client_000 of {npz} do not fit the model: x: expected shape (N, 4)"),
    (4, 5, "the examples of client client_000 of {npz} do not fit the model: y: labels must be class ids in [0, 2]"),
])
def test_data_that_does_not_fit_the_model_is_refused_and_the_last_report_stays(
        tmp_path: Path, fleet: str, features: int, labels: int, message: str) -> None:
    job = _small_job(tmp_path, fleet, features, labels)
    report = tmp_path / "reports" / "simulation"
    report.mkdir(parents=True)
    (report / ".fedge-report").write_text("")
    (report / "metrics.jsonl").write_text('{"round": 0}\n')
    run = subprocess.run([sys.executable, "-m", "fedge.cli", "simulate", str(tmp_path)], capture_output=True,
                         text=True, timeout=TIMEOUT_S)  # the folder fedge new writes: its job.toml
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("fedge simulate: error:")]
    assert len(errors) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert errors[0].startswith(f"fedge simulate: error: {job}: " + message.format(npz=tmp_path / "train.npz"))
    assert (report / "metrics.jsonl").read_text() == '{"round": 0}\n'  # the earlier report is untouched


def test_a_file_that_is_not_a_job_gets_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model.keras").write_bytes(b"PK\x03\x04\x00\xff\xfe binary")
    assert main(["simulate", str(tmp_path / "model.keras")]) == 2
    assert capsys.readouterr().err == f"fedge simulate: error: job {tmp_path / 'model.keras'}: not a TOML file " \
                                      "(it is not UTF-8 text)\n"


def test_sigterm_stops_fedge_simulate_cleanly_and_resume_continues_it(tmp_path: Path, fleet: str) -> None:
    def brokers() -> set[int]:
        return {int(pid) for pid in os.listdir("/proc") if pid.isdigit()
                and Path(f"/proc/{pid}/comm").exists() and Path(f"/proc/{pid}/comm").read_text().strip() == "mosquitto"}

    job = _small_job(tmp_path, fleet)
    temp = tmp_path / "tmp"
    temp.mkdir()
    environment = {**os.environ, "TMPDIR": str(temp)}  # the embedded broker's and the executor's temp folders
    before = brokers()
    process = subprocess.Popen([sys.executable, "-m", "fedge.cli", "simulate", str(job), "--deadline", "600",
                                "--max-seconds", "0.5", "--local-epochs", "1000"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    metrics = tmp_path / "reports" / "simulation" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    while not (metrics.exists() and len(read_metrics_log(metrics)) >= 2) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.terminate()
    stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 143, stdout[-2000:] + stderr[-2000:]
    assert "Traceback" not in stderr and "stopped by SIGTERM after" in stdout and "--resume continues it" in stdout
    rounds = read_metrics_log(metrics)
    assert 2 <= len(rounds) < 30 and all(r["outcome"] == "completed" for r in rounds)
    assert (tmp_path / "reports" / "simulation" / "accuracy_loss.png").exists()
    assert brokers() <= before  # the embedded broker is gone
    assert list(temp.iterdir()) == []  # and every temporary folder

    done = load_state(tmp_path / "reports" / "simulation" / "checkpoints" / "state.npz").round_num
    assert done >= len(rounds)
    resumed = subprocess.run([sys.executable, "-m", "fedge.cli", "simulate", str(job), "--resume",
                              "--rounds", str(done + 2)], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"resuming from {tmp_path / 'reports' / 'simulation' / 'checkpoints' / 'state.npz'}: {done} of " \
           f"{done + 2} rounds done" in resumed.stdout
    after = read_metrics_log(metrics)
    assert [r["round"] for r in after] == [r["round"] for r in rounds] + [done, done + 1]
    assert f"{len(after)} rounds (0 failed)" in resumed.stdout  # the report covers both runs


def test_resume_without_a_stopped_run_is_one_line(tmp_path: Path, fleet: str) -> None:
    job = _small_job(tmp_path, fleet)
    run = subprocess.run([sys.executable, "-m", "fedge.cli", "simulate", str(job), "--resume"], capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr == f"fedge simulate: error: {tmp_path / 'reports' / 'simulation'} is not a fedge simulate " \
                         "report folder: nothing to resume (run without --resume to start one)\n"
    assert not (tmp_path / "reports").exists()


def _fit(shape_in: int = 4) -> list[np.ndarray]:
    return [np.zeros((shape_in, 3), np.float32), np.zeros(3, np.float32)]


@pytest.mark.parametrize("checkpoint, message", [
    ({"weights": _fit(7)}, "state.npz does not hold this model's weights"),
    ({"weights": _fit(), "model": "mlp"}, "state.npz was trained with another model"),
    ({"weights": [np.full((4, 3), np.nan, np.float32), np.zeros(3, np.float32)]},
     "state.npz: holds non-finite weights or optimizer slots (NaN or Inf)"),
    ({"weights": [np.full((4, 3), 1e20, np.float32), np.zeros(3, np.float32)]}, "or weights too large to train with"),
    ({"bytes": b"PK\x03\x04 a truncated archive"}, "state.npz: not a readable fedge checkpoint (BadZipFile"),
])
def test_serve_refuses_a_checkpoint_it_cannot_resume_in_one_line(checkpoint: dict, message: str, tmp_path: Path,
                                                                 fleet: str) -> None:
    from device_artifacts import artifact_path
    from fedge.learning.state import LearningProcessState, ModelWeights, save_state

    job = _small_job(tmp_path, fleet)
    checkpoints = tmp_path / "reports" / "serve" / "checkpoints"
    checkpoints.mkdir(parents=True)
    if "bytes" in checkpoint:
        (checkpoints / "state.npz").write_bytes(checkpoint["bytes"])
    else:
        save_state(checkpoints / "state.npz", LearningProcessState(ModelWeights(checkpoint["weights"], []), {}, 4))
    if "model" in checkpoint:  # the model the checkpoint was trained with, kept beside it: another one
        (checkpoints / "model.tflite").write_bytes(artifact_path(checkpoint["model"], tmp_path).read_bytes())
    kept = {path.name: path.read_bytes() for path in checkpoints.iterdir()}
    run = subprocess.run([sys.executable, "-m", "fedge.cli", "serve", str(job), "--broker", "mqtt://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert {path.name: path.read_bytes() for path in checkpoints.iterdir()} == kept  # nothing written or removed
