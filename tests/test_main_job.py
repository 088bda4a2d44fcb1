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
    assert {path.name for path in out.iterdir()} >= REPORT_FILES
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    for record in records:
        assert record["outcome"] == "completed" and record["accepted"] == 20 and record["selected"] == 26
        assert record["bytes_up"] > 20 * 20_000 and 0 <= record["eval_accuracy"] <= 1
