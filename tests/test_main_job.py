"""The README's first command, `fedge simulate`: embedded broker, server, simulated fleet, report folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

REPORT_FILES = {"metrics.jsonl", "accuracy_loss.png", "round_durations.png", "participation.png",
                "final_model.keras", "final_model.tflite", "simulation.log"}


@pytest.mark.parametrize("broker", ["mosquitto", "amqtt", "external"])
def test_simulate_runs_rounds_and_writes_the_report(tmp_path, broker, mosquitto_broker):
    out = tmp_path / "report"
    command = [sys.executable, "-m", "fedge.cli", "simulate", "--rounds", "3", "--out", str(out)]
    if broker == "external":
        command += ["--broker", "mqtt://%s:%d" % mosquitto_broker]
    else:
        command += ["--embedded-broker", broker]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert (f"embedded {broker} broker" in run.stdout) == (broker != "external")
    assert "3 rounds (0 failed)" in run.stdout
    for noise in ("oneDNN", "absl", "XNNPACK", "Traceback"):  # TensorFlow's and LiteRT's start-up lines stay out
        assert noise not in run.stdout + run.stderr, run.stderr[-3000:]
    assert {path.name for path in out.iterdir()} >= REPORT_FILES
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]  # the server's round ids, as in fedge serve's metrics log
    for record in records:
        assert record["outcome"] == "completed" and record["accepted"] == 20 and record["selected"] == 26
        assert record["bytes_up"] > 20 * 20_000 and 0 <= record["eval_accuracy"] <= 1


JOB_60 = """
[model]
factory = "fedge.simulation.models:digits_cnn"
loss = "sparse_categorical_crossentropy"
batch_size = 16

[model.optimizer]
learning_rate = 0.1
momentum = 0.9

[data]
dataset = "digits"
partition = "iid"

[process]
local_epochs = 10

[rounds]
seed = 1

[fleet]
id = "e2e60"

[[fleet.groups]]
name = "phone"
count = 40
speed = 1.0
dropout = 0.1
downtime = 5.0

[[fleet.groups]]
name = "pi"
count = 20
speed = 2.0
upload = "1 MB/s"
"""


def test_sixty_simulated_devices_over_mosquitto_learn_digits(tmp_path, mosquitto_broker):
    """Issue 5's end-to-end check: >= 50 simulated devices, a real Mosquitto, rounds complete, accuracy improves."""
    job = tmp_path / "job60.toml"
    job.write_text(JOB_60)
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, "-m", "fedge.cli", "simulate", str(job), "--broker",
                          "mqtt://%s:%d" % mosquitto_broker, "--rounds", "15", "--clients-per-round", "30",
                          "--min-reports", "20", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [(r["outcome"], r["closed_by"], r["selected"], r["accepted"], r["dropped"],
               round(r["times"]["checkin"], 1)) for r in records]  # what a failure shows
    assert len(records) == 15 and all(r["outcome"] == "completed" for r in records), rounds
    assert all(r["accepted"] == 30 and r["selected"] == 39 for r in records), rounds
    assert sum(sum(r["dropped"].values()) for r in records) > 0  # dropouts and late reports happen, and are counted
    first, last = records[0]["eval_accuracy"], records[-1]["eval_accuracy"]
    assert last >= 0.6 and last > first + 0.3, [round(r["eval_accuracy"], 3) for r in records]
    assert records[-1]["train_loss"] < 0.6 * records[0]["train_loss"]
