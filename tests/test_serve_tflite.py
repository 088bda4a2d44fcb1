"""`fedge serve ARTIFACT.tflite` with the device extra alone: a real server process, real agents, no TensorFlow.

CI runs this module in the device-only venv (where TensorFlow is not installed) and on arm64;
in the desktop venv the server process reports whether it loaded TensorFlow or Keras.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from device_artifacts import artifact_path
from device_runtime.agent import DeviceAgent
from test_device_agent import wait_until

pytestmark = pytest.mark.device

TIMEOUT_S = 120.0
# Runs `fedge` in the server process, then says which of the heavy packages that process imported.
_SERVE_AND_REPORT = ("import sys\nfrom fedge.cli import main\nstatus = main(sys.argv[1:])\n"
                     "print('imported:', sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
                     "sys.exit(status)")


def _examples(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The 'mlp' artifact's task (8 features, 3 classes): which of three centres an example lies near."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size).astype(np.int32)
    return (np.eye(3, 8, dtype=np.float32)[y] * 2.5 + rng.normal(scale=0.8, size=(size, 8))).astype(np.float32), y


@contextmanager
def running_agents(broker: str, fleet: str, data: list[tuple[np.ndarray, np.ndarray]],
                   tmp_path: Path) -> Iterator[list[DeviceAgent]]:
    """In-thread agents dev-0, dev-1, ... with `data`, connected and subscribed; stopped afterwards."""
    agents = [DeviceAgent(broker, fleet, f"dev-{i}", arrays, cache_dir=tmp_path / f"cache-{i}", num_threads=1)
              for i, arrays in enumerate(data)]
    for agent in agents:
        agent.start()
    try:
        for agent in agents:
            wait_until(lambda: agent.ready, f"agent {agent.device_id} to connect")
        yield agents
    finally:
        for agent in agents:
            agent.stop(timeout=TIMEOUT_S)


def test_serving_a_tflite_trains_rounds_without_tensorflow(mosquitto_broker, fleet, tmp_path: Path) -> None:
    model = artifact_path("mlp", tmp_path / "artifacts")
    x, y = _examples(40, seed=9)
    np.savez(tmp_path / "held_out.npz", x=x, y=y)
    host, port = mosquitto_broker
    broker = f"mqtt://{host}:{port}"
    with running_agents(broker, fleet, [_examples(16, seed=i) for i in range(2)], tmp_path):
        log = tmp_path / "metrics.jsonl"
        command = [sys.executable, "-c", _SERVE_AND_REPORT, "serve", str(model), "--broker", broker,
                   "--fleet", fleet, "--rounds", "2", "--clients-per-round", "2", "--over-selection", "1",
                   "--deadline", "60", "--checkin-timeout", "60", "--learning-rate", "0.05",
                   "--server-optimizer", "adam", "--eval-data", str(tmp_path / "held_out.npz"),
                   "--checkpoint-dir", str(tmp_path / "checkpoints"), "--metrics-log", str(log)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "imported: []" in result.stdout, output[-3000:]
    assert "all rounds done: 2 of 2 rounds (0 failed" in output
    rounds = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    assert all(r["outcome"] == "completed" and r["accepted"] == 2 and r["train_num_examples"] == 32 for r in rounds)
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 and r["eval_num_examples"] == 40 for r in rounds)
    assert (tmp_path / "checkpoints" / "state.npz").exists()


def test_fedge_serve_exits_1_when_every_round_of_the_run_failed(mosquitto_broker, fleet, tmp_path: Path) -> None:
    """A fleet whose only device cannot train (its data has 5 features, the model takes 8): both rounds fail."""
    model = artifact_path("mlp", tmp_path / "artifacts")
    host, port = mosquitto_broker
    broker = f"mqtt://{host}:{port}"
    x, y = _examples(16, seed=1)
    with running_agents(broker, fleet, [(x[:, :5], y)], tmp_path):
        command = [sys.executable, "-m", "fedge.cli", "serve", str(model), "--broker", broker, "--fleet", fleet,
                   "--rounds", "2", "--clients-per-round", "1", "--over-selection", "1", "--deadline", "2",
                   "--checkin-timeout", "30", "--checkpoint-dir", str(tmp_path / "checkpoints")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    assert "fedge serve: error: every round of this run failed (2 of 2)" in result.stderr


def test_a_second_job_on_a_running_fleet_trains_from_its_first_round(mosquitto_broker, fleet, tmp_path: Path) -> None:
    """Two `fedge serve` jobs one after the other (their own checkpoint folders, so their own run ids)
    on the same long-running agents: both jobs' rounds 0 and 1 are trained."""
    model = artifact_path("mlp", tmp_path / "artifacts")
    host, port = mosquitto_broker
    broker = f"mqtt://{host}:{port}"
    with running_agents(broker, fleet, [_examples(12, seed=20 + i) for i in range(2)], tmp_path) as agents:
        logs = []
        for job in ("first", "second"):
            logs.append(tmp_path / f"{job}.jsonl")
            command = [sys.executable, "-m", "fedge.cli", "serve", str(model), "--broker", broker, "--fleet", fleet,
                       "--rounds", "2", "--clients-per-round", "2", "--over-selection", "1", "--deadline", "60",
                       "--checkin-timeout", "60", "--checkpoint-dir", str(tmp_path / job),
                       "--metrics-log", str(logs[-1])]
            result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
            assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for log in logs:
        rounds = [json.loads(line) for line in log.read_text().splitlines()]
        assert [(r["round"], r["outcome"], r["accepted"]) for r in rounds] == [(0, "completed", 2), (1, "completed", 2)]
    run_ids = {(tmp_path / job / "run_id").read_text().strip() for job in ("first", "second")}
    assert len(run_ids) == 2
    assert all(agent.stats["rounds_trained"] == 4 for agent in agents)



def test_a_job_whose_model_is_a_tflite_is_served_without_tensorflow(mosquitto_broker, fleet, tmp_path: Path) -> None:
    """`fedge serve job.toml`: a job file naming a converted artifact, FedProx and a server Yogi (the job's
    process, sent to the devices in every task), held-out data; the server process loads no TensorFlow."""
    from fedge.learning.state import load_state

    model = artifact_path("scalar", tmp_path / "artifacts")  # converted with FedProx's proximal term
    x, y = _examples(30, seed=3)
    np.savez(tmp_path / "held_out.npz", x=x, y=y)
    (tmp_path / "job.toml").write_text(
        f'[model]\ntflite = "{model}"\n[data]\ntest = "held_out.npz"\n'
        '[process]\nalgorithm = "fedprox"\nproximal_mu = 0.5\nlearning_rate = 0.05\n'
        '[process.server_optimizer]\nname = "yogi"\n'
        '[rounds]\ncount = 2\nclients_per_round = 2\nover_selection = 1.0\ndeadline = 60\ncheckin_wait = 60\n'
        f'[fleet]\nid = "{fleet}"\n')
    host, port = mosquitto_broker
    broker = f"mqtt://{host}:{port}"
    with running_agents(broker, fleet, [_examples(16, seed=50 + i) for i in range(2)], tmp_path):
        result = subprocess.run([sys.executable, "-c", _SERVE_AND_REPORT, "serve", str(tmp_path / "job.toml"),
                                 "--broker", broker], capture_output=True, text=True, timeout=TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "imported: []" in result.stdout, output[-3000:]
    rounds = [json.loads(line) for line in (tmp_path / "reports" / "serve" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["outcome"], r["accepted"], r["eval_num_examples"]) for r in rounds] == \
        [(0, "completed", 2, 30), (1, "completed", 2, 30)]
    assert set(load_state(tmp_path / "reports" / "serve" / "checkpoints" / "state.npz").server_optimizer_state) \
        == {"m", "v"}
