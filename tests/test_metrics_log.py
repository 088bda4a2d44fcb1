"""The metrics log's three forms: JSON lines, a CSV beside them, event files read back by TensorBoard's reader."""

from __future__ import annotations

import csv
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import fedge.learning as fl
from device_artifacts import artifact_path
from device_runtime.artifact import Artifact
from fedge.learning.executors import InProcessExecutor
from fedge.server import FederatedServer, MqttExecutor, ServerSettings
from fedge.server.metrics_log import MetricsLog, read_metrics_log
from test_serve_tflite import running_agents
from test_server import make_process, toy_data

# The TensorBoard tag of each flattened record key (docs/server.md); "round" is the step, "started" is not written.
TAGS = {"seconds": "time/total", "times.checkin": "time/checkin", "times.round": "time/round",
        "times.evaluation": "time/evaluation", "times.checkpoint": "time/checkpoint",
        "selected": "participation/selected", "goal": "participation/goal", "accepted": "participation/accepted",
        "dropped.after_goal": "participation/dropped/after_goal", "dropped.late": "participation/dropped/late",
        "dropped.malformed": "participation/dropped/malformed",
        "bytes_down": "bytes/down", "bytes_up": "bytes/up", "update_norm": "server/update_norm",
        "dp_epsilon": "privacy/epsilon", "clipped_clients": "server/clipped_clients",
        "train_loss": "train/loss", "train_accuracy": "train/accuracy", "train_num_examples": "train/num_examples",
        "eval_loss": "eval/loss", "eval_accuracy": "eval/accuracy"}


def round_record(round_num: int, dropped: dict[str, int], evaluated: bool) -> dict[str, Any]:
    """A record shaped like the server's (rounds.py `_report`, with DP), numpy scalars included."""
    return {"round": round_num, "outcome": "completed", "closed_by": "goal", "started": 1767225600.25 + round_num,
            "seconds": 2.9 + round_num, "times": {"checkin": 0.01, "round": 2.7 + round_num, "evaluation": 0.15,
                                                  "checkpoint": 0.04},
            "selected": 13, "goal": 10, "accepted": 10 - round_num, "dropped": dropped, "bytes_down": 66880,
            "bytes_up": 67840 + round_num, "update_norm": np.float32(0.21 / (round_num + 1)),
            "dp_epsilon": 0.5 * (round_num + 1), "clipped_clients": np.int64(round_num),
            "train_loss": 0.41 - 0.1 * round_num, "train_accuracy": 0.88, "train_num_examples": np.float32(1312.0),
            **({"eval_loss": 0.38, "eval_accuracy": 0.9} if evaluated else {})}


RECORDS = [round_record(0, {}, False), round_record(1, {"after_goal": 3}, True),
           round_record(2, {"after_goal": 1, "late": 2}, False), round_record(3, {"late": 1, "malformed": 2}, True)]


def flattened(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record as its JSON line holds it (numpy scalars as floats), nested dicts as dotted keys (CSV columns)."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{inner}": inner_value for inner, inner_value in value.items()})
        else:
            flat[key] = float(value) if isinstance(value, np.generic) else value
    return flat


def csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The CSV's header and its rows, without their empty cells."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), [{k: v for k, v in row.items() if v != ""} for row in reader]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in `folder`'s event files as TensorBoard reads them: tag -> (step, value) by step."""
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {tag: sorted((event.step, event.value) for event in accumulator.Scalars(tag))
            for tag in accumulator.Tags()["scalars"]}


def expected_scalars(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard should hold for `records`: every number at step = its round (float32, as events store it),
    and the dropped reports as participation/surplus (after the goal or the deadline) and participation/refused."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        flat = flattened(record)
        numbers = {TAGS[key]: value for key, value in flat.items() if key not in ("round", "started", "outcome",
                                                                                    "closed_by")}
        surplus = sum(count for reason, count in record["dropped"].items() if reason in ("after_goal", "late"))
        numbers["participation/surplus"] = surplus
        numbers["participation/refused"] = sum(record["dropped"].values()) - surplus
        for tag, value in numbers.items():
            expected.setdefault(tag, []).append((record["round"], float(np.float32(value))))
    return expected


def test_each_round_is_a_json_line_a_csv_row_and_scalars_tensorboard_reads_before_the_log_is_closed(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for record in RECORDS:
        log.write(record)

    assert [r["round"] for r in read_metrics_log(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    _, rows = csv_rows(tmp_path / "metrics.csv")
    assert rows == [{key: str(value) for key, value in flattened(r).items()} for r in RECORDS]
    assert [float(row["train_loss"]) for row in rows] == [r["train_loss"] for r in RECORDS]  # exact: repr's digits
    # Flushed every round, so TensorBoard sees them while the server runs; steps and values are the records'.
    assert tensorboard_scalars(tmp_path / "tensorboard") == expected_scalars(RECORDS)
    log.close()
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1


def test_a_record_with_a_new_key_widens_the_csv_header_and_keeps_the_rows(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write(RECORDS[0])  # no drops, not evaluated
    first_header, _ = csv_rows(tmp_path / "m.csv")
    for record in RECORDS[1:]:  # drop reasons and the held-out metrics arrive later
        log.write(record)
    log.close()

    header, rows = csv_rows(tmp_path / "m.csv")
    assert [column for column in header if column in first_header] == first_header
    assert set(header) - set(first_header) == {"dropped.after_goal", "dropped.late", "dropped.malformed", "eval_loss",
                                                "eval_accuracy"}
    # a new column lands beside its kind: the drop reasons after accepted, the held-out metrics after the training's
    assert header[header.index("accepted"):header.index("accepted") + 4] == ["accepted", "dropped.after_goal",
                                                                             "dropped.late", "dropped.malformed"]
    assert header[-2:] == ["eval_loss", "eval_accuracy"]
    assert rows == [{key: str(value) for key, value in flattened(r).items()} for r in RECORDS]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.csv", "m.jsonl", "tensorboard"]  # no .tmp left


def test_a_resumed_log_appends_to_the_csv_and_adds_an_event_file(tmp_path):
    killed = MetricsLog(tmp_path / "metrics.jsonl")
    for record in RECORDS[:2]:
        killed.write(record)  # never closed: a killed server
    resumed = MetricsLog(tmp_path / "metrics.jsonl")  # likely in the same second: its event file is named apart
    for record in RECORDS[2:]:
        resumed.write(record)
    resumed.close()

    assert [r["round"] for r in read_metrics_log(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    _, rows = csv_rows(tmp_path / "metrics.csv")
    assert rows == [{key: str(value) for key, value in flattened(r).items()} for r in RECORDS]
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2
    assert tensorboard_scalars(tmp_path / "tensorboard") == expected_scalars(RECORDS)


def test_without_tensorboardx_the_log_writes_json_and_csv_and_says_once_what_to_install(tmp_path, monkeypatch,
                                                                                          caplog):
    for name in {"tensorboardX", *(name for name in sys.modules if name.startswith("tensorboardX."))}:
        monkeypatch.setitem(sys.modules, name, None)  # a device-only install: importing tensorboardX fails
    caplog.set_level(logging.INFO, logger="fedge.server.metrics_log")
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for record in RECORDS:
        log.write(record)
    log.close()

    assert [r["round"] for r in read_metrics_log(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert len(csv_rows(tmp_path / "metrics.csv")[1]) == 4
    assert not (tmp_path / "tensorboard").exists()
    assert [record.levelname for record in caplog.records] == ["INFO"]
    assert "pip install tensorboardX" in caplog.records[0].getMessage()


def test_a_metrics_log_named_csv_is_refused(tmp_path):
    with pytest.raises(ValueError, match="name it .jsonl"):
        MetricsLog(tmp_path / "metrics.csv")


def test_a_server_and_its_resumed_run_write_every_round_to_the_csv_and_tensorboard(mosquitto_broker, fleet,
                                                                                      tmp_path):
    artifact = Artifact.from_file(artifact_path("mlp", tmp_path / "artifacts"))
    host, port = mosquitto_broker
    broker = f"mqtt://{host}:{port}"
    evaluation = fl.FederatedEvaluation(artifact, InProcessExecutor(num_workers=0))
    report = tmp_path / "report"

    def serve(rounds: int) -> None:
        with MqttExecutor(broker, fleet, clients_per_round=2, deadline_s=20) as executor:  # selects 3 for 2
            settings = ServerSettings(rounds=rounds, checkpoint_dir=tmp_path / "ckpt",
                                      metrics_log=report / "metrics.jsonl", checkin_timeout_s=10, eval_every=2)
            FederatedServer(make_process(artifact, executor), executor, settings, evaluation,
                            [toy_data(40, seed=99)]).run()

    with running_agents(broker, fleet, [toy_data(16, seed=i) for i in range(3)], tmp_path):
        serve(2)
        serve(4)  # resumes from the checkpoint of round 2

    records = read_metrics_log(report / "metrics.jsonl")
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    header, rows = csv_rows(report / "metrics.csv")
    assert {"times.round", "train_loss", "eval_accuracy", "bytes_up"} <= set(header)
    assert rows == [{key: str(value) for key, value in flattened(r).items()} for r in records]
    assert len(list((report / "tensorboard").iterdir())) == 2  # one event file per server run
    scalars = tensorboard_scalars(report / "tensorboard")
    for tag in ("train/loss", "participation/accepted", "participation/surplus", "participation/refused", "bytes/up",
                "time/round",
                "server/update_norm"):
        assert [step for step, _ in scalars[tag]] == [0, 1, 2, 3], tag
    assert [step for step, _ in scalars["eval/accuracy"]] == [1, 3]  # evaluated every 2 rounds
    assert [value for _, value in scalars["train/loss"]] == [float(np.float32(r["train_loss"])) for r in records]
