"""Faults against a real mosquitto: a broker restart and a SIGKILLed server mid-round, dropouts and stragglers,
and bad updates end to end. Each test prints a `FIGURES <test> {...}` line (run with -s) for docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pytest

import fedge.learning as fl
from device_runtime.agent import DeviceAgent
from device_runtime.manifest import Manifest
from device_runtime.protocol import decode_update, max_update_bytes, update_topic
from fedge.learning import optimizers
from fedge.learning.executors import ClientUpdate, InProcessExecutor
from fedge.learning.process import aggregate_round
from fedge.server import FederatedServer, MqttExecutor, ServerSettings
from fedge.server.journal import JOURNAL_FILE, UpdateJournal
from fedge.server.metrics_log import read_metrics_log
from fedge.simulation.datasets import ClientData, ClientDataset
from simulator import Fleet
from test_device_agent import PrivateBroker, Server, wait_until
from test_server import (  # noqa: F401 (artifact, broker_url and fake_devices are fixtures)
    artifact,
    assert_same_weights,
    broker_url,
    fake_devices,
    fake_update,
    make_process,
    toy_data,
)

TIMEOUT_S = 60.0


def report_figures(test: str, figures: dict[str, Any]) -> None:
    """Print the figures a test measured, for docs/reliability.md."""
    print(f"FIGURES {test} {json.dumps(figures, sort_keys=True, default=float)}")


def accepted_ids(caplog: pytest.LogCaptureFixture, round_num: int) -> list[str]:
    """The update ids the server accepted in `round_num`, from ReportGate's DEBUG log."""
    pattern = re.compile(rf"round {round_num}: accepted update (\w+) from ")
    return [m.group(1) for record in caplog.records if (m := pattern.match(record.getMessage()))]


def delivered_ids(caplog: pytest.LogCaptureFixture, round_num: int) -> list[str]:
    """The update ids the devices saw acknowledged by the broker (PUBACK) in `round_num`, from their INFO log."""
    pattern = re.compile(rf"round {round_num}: update (\w+) delivered")
    return [m.group(1) for record in caplog.records if (m := pattern.match(record.getMessage()))]


# ------------------------------------------------------------------------------ 1. broker restart


def test_broker_restart_mid_round_loses_no_update_and_counts_none_twice(artifact, fleet, tmp_path, caplog):
    """Four devices train (5 s each) while mosquitto (persistence on) is stopped and restarted on its port:
    every update reaches the server exactly once and the new weights are what those updates imply."""
    caplog.set_level(logging.INFO, logger="device_runtime.agent")
    caplog.set_level(logging.DEBUG, logger="fedge.server.reports")  # last: it sets the capture handler's level too
    broker = PrivateBroker(tmp_path)
    broker.start()
    url = f"mqtt://{broker.host}:{broker.port}"
    observer = Server(broker.host, broker.port, fleet, persistent=True)  # a second subscriber, its session kept too
    data = {f"dev-{i}": toy_data(20 + 4 * i, seed=40 + i) for i in range(4)}
    agents = [DeviceAgent(url, fleet, device, arrays, cache_dir=tmp_path / f"cache-{device}", num_threads=1,
                          publish_timeout=TIMEOUT_S) for device, arrays in data.items()]
    executor = MqttExecutor(url, fleet, min_reports=4, deadline_s=TIMEOUT_S)  # goal: all four
    process = make_process(artifact, executor, epochs=10_000, seed=7, max_seconds=5.0)  # the 5 s budget ends training
    results: queue.Queue = queue.Queue()
    try:
        for agent in agents:
            agent.start()
        executor.start()
        wait_until(lambda: len(executor.registry.available()) == 4, "the devices to check in")
        start = process.initialize()
        threading.Thread(target=lambda: results.put(process.next(start, sorted(data))), daemon=True).start()
        wait_until(lambda: all(observer.has_status(device, "training") for device in data),
                   "every device to start training")
        stopped = time.monotonic()
        broker.stop()
        wait_until(lambda: not any(agent.connected for agent in agents), "the devices to notice the broker is gone")
        wait_until(lambda: all(agent.stats["rounds_trained"] == 1 for agent in agents),
                   "the devices to finish training while the broker is down")
        assert all(agent.stats["updates_published"] == 0 for agent in agents)  # queued by paho, not acknowledged
        broker.start()
        restarted = time.monotonic()
        state, metrics = results.get(timeout=TIMEOUT_S)
        completed = time.monotonic()
        short = make_process(artifact, executor, epochs=10_000, seed=7, max_seconds=0.2)  # the fleet trains on
        after, after_metrics = short.next(state, sorted(data))
    finally:
        executor.close()
        for agent in agents:
            agent.stop(timeout=TIMEOUT_S)
        observer.close()
        broker.stop()

    distributor = metrics["distributor"]
    assert (distributor["outcome"], distributor["closed_by"], distributor["accepted"]) == ("completed", "goal", 4)
    assert set(distributor["dropped"]) <= {"duplicate_update"}  # a QoS 1 resend may repeat an id, never count it
    server_ids, device_ids = accepted_ids(caplog, 0), delivered_ids(caplog, 0)
    observed = []
    while not observer.updates.empty():
        topic, payload = observer.updates.get()
        observed.append(decode_update(payload, artifact.manifest, device_id=topic.rsplit("/", 1)[1]))
    round_zero = [update for update in observed if update.round == 0]
    assert len(server_ids) == len(set(server_ids)) == 4, "an update was counted twice or lost"
    assert sorted(server_ids) == sorted(device_ids) == sorted({u.update_id for u in round_zero})
    assert all(agent.stats["rounds_trained"] == 2 for agent in agents), "a device trained a round twice"

    # The aggregate is exactly what the four distinct updates imply (float64 sums: the order does not matter).
    distinct = {u.update_id: u for u in round_zero}.values()
    implied, implied_metrics = aggregate_round(
        start, start.global_model_weights,
        iter([ClientUpdate(u.tensors, u.num_examples, u.metrics, 0, 0) for u in distinct]), artifact.manifest,
        fl.ClientWeighting.NUM_EXAMPLES, optimizers.SGD(1.0))
    assert_same_weights(state.global_model_weights, implied.global_model_weights)
    assert metrics["client_work"]["train"] == implied_metrics["client_work"]["train"]
    assert after_metrics["distributor"]["accepted"] == 4 and after.round_num == 2
    assert not set(accepted_ids(caplog, 1)) & set(server_ids)
    report_figures("test_broker_restart_mid_round_loses_no_update_and_counts_none_twice", {
        "devices": 4, "updates_published": len(device_ids), "updates_accepted": len(server_ids),
        "updates_lost": len(set(device_ids) - set(server_ids)),
        "duplicates_counted": len(server_ids) - len(set(server_ids)),
        "duplicates_dropped": distributor["dropped"].get("duplicate_update", 0),
        "broker_down_s": round(restarted - stopped, 1), "round_done_after_restart_s": round(completed - restarted, 1)})


# ------------------------------------------------------------------------------ 2. server SIGKILL


def test_server_killed_mid_round_resumes_and_ends_with_the_uninterrupted_model(artifact, broker_url, fleet,
                                                                               tmp_path):
    """`fedge serve` is SIGKILLed after acknowledging an update of round 1 while a device still trains; the same
    command resumes from the checkpoint, replays the journaled update, and ends with the uninterrupted weights."""
    model_path = tmp_path / "model.tflite"
    model_path.write_bytes(artifact.tflite_bytes)
    data = {"dev-0": toy_data(12, seed=50), "dev-1": toy_data(16, seed=51), "dev-2": toy_data(4000, seed=52)}
    epochs, seed, rounds = 60, 4, 3  # dev-2 trains 60,000 steps a round (about 1 s), dev-0 and dev-1 a few hundred
    agents = [DeviceAgent(broker_url, fleet, device, arrays, cache_dir=tmp_path / f"cache-{device}", num_threads=1)
              for device, arrays in data.items()]
    watcher = Server(*_host_port(broker_url), fleet)
    checkpoint, log = tmp_path / "ckpt", tmp_path / "metrics.jsonl"
    command = [sys.executable, "-m", "fedge.cli", "serve", str(model_path), "--broker", broker_url, "--fleet", fleet,
               "--rounds", str(rounds), "--clients-per-round", "3", "--over-selection", "1.0", "--min-reports", "3",
               "--deadline", str(TIMEOUT_S), "--local-epochs", str(epochs), "--seed", str(seed),
               "--checkpoint-dir", str(checkpoint), "--metrics-log", str(log), "--checkin-timeout", "5"]
    try:
        for agent in agents:
            agent.start()
        with open(tmp_path / "killed.log", "wb") as killed_log:
            killed = subprocess.Popen(command, stdout=killed_log, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: _round_one_update(watcher, artifact.manifest) or killed.poll() is not None,
                       "a device to report round 1", 90)
            assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            wait_until(lambda: (checkpoint / JOURNAL_FILE).stat().st_size > 0, "the server to journal it")
            killed.send_signal(signal.SIGKILL)
            killed.wait(TIMEOUT_S)
        finally:
            if killed.poll() is None:
                killed.kill()
        assert killed.returncode == -signal.SIGKILL
        assert fl.load_state(checkpoint / "state.npz").round_num == 1, "the kill was not mid-round 1"
        resumed = subprocess.run(command, capture_output=True, text=True, timeout=240)
    finally:
        for agent in agents:
            agent.stop(timeout=TIMEOUT_S)
        watcher.close()
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming from" in output and "at round 1" in output and "all rounds done: 3 of 3" in output
    replayed = int(re.search(r"replayed (\d+) journaled update messages", output).group(1))
    assert replayed >= 1
    assert all(agent.stats["rounds_trained"] == rounds for agent in agents), "a device trained a round twice"
    lines = read_metrics_log(log)
    assert [line["round"] for line in lines] == [0, 1, 2] and all(line["accepted"] == 3 for line in lines)

    with InProcessExecutor(num_workers=0) as inline:  # the same rounds, uninterrupted, in-process
        process = make_process(artifact, inline, epochs=epochs, seed=seed)
        state = process.initialize()
        for _ in range(rounds):
            state, _ = process.next(state, [ClientDataset(x, y, client_id=d) for d, (x, y) in data.items()])
    final = fl.load_state(checkpoint / "state.npz")
    assert final.round_num == rounds
    assert_same_weights(final.global_model_weights, state.global_model_weights)  # bit for bit
    report_figures("test_server_killed_mid_round_resumes_and_ends_with_the_uninterrupted_model", {
        "rounds": rounds, "killed_in_round": 1, "journaled_updates_replayed": replayed,
        "resumed_round_dropped": lines[1]["dropped"], "final_weights_equal_uninterrupted": "bitwise"})


def _journaled(path, count: int) -> list[tuple[str, bytes, float]]:
    """`count` update messages of distinct sizes journaled to `path` by a run that then stopped; returns them."""
    messages = [(f"fedge/f/update/dev-{i}", bytes([i]) * (100 + i), 1000.0 + i) for i in range(count)]
    journal = UpdateJournal(path)
    for message in messages:
        journal.append(message)
    journal.close()
    return messages


def test_the_update_journal_replays_a_killed_run_and_stops_at_a_torn_record(tmp_path, caplog):
    path = tmp_path / JOURNAL_FILE
    messages = _journaled(path, 3)
    with open(path, "ab") as torn:  # the kill came in the middle of writing a fourth record
        torn.write(b"\x00" * 20)
    second = UpdateJournal(path)  # a restarted server
    assert list(second.replay()) == messages and "a torn record after 3 messages ends it" in caplog.text
    second.append(("fedge/f/update/dev-9", b"late", 2000.0))
    second.close()
    third = UpdateJournal(path)  # killed again during the replayed round: both runs' records are kept
    assert [m[0] for m in third.replay()] == [m[0] for m in messages] + ["fedge/f/update/dev-9"]
    third.clear()  # the round is checkpointed
    third.close()
    assert list(UpdateJournal(path).replay()) == [] and path.stat().st_size == 0


def test_a_damaged_record_in_the_middle_of_the_journal_loses_only_itself(tmp_path, caplog):
    path = tmp_path / JOURNAL_FILE
    messages = _journaled(path, 4)
    data = bytearray(path.read_bytes())
    second_record = 20 + len(messages[0][0]) + len(messages[0][1])  # header 20 bytes, topic, payload
    data[second_record + 40] ^= 0xFF  # a flipped bit in the second record's payload: its CRC no longer matches
    path.write_bytes(bytes(data))
    replayed = list(UpdateJournal(path).replay())
    assert replayed == [messages[0], messages[2], messages[3]]
    assert f"skipped {20 + len(messages[1][0]) + len(messages[1][1])} damaged bytes after 1 messages" in caplog.text


def _host_port(url: str) -> tuple[str, int]:
    """(host, port) of an mqtt://host:port URL."""
    host, port = url.removeprefix("mqtt://").split(":")
    return host, int(port)


def _round_one_update(watcher: Server, manifest: dict) -> bool:
    """Whether the watcher has seen an update for round 1 (earlier rounds' updates are consumed)."""
    while not watcher.updates.empty():
        if decode_update(watcher.updates.get()[1], manifest).round == 1:
            return True
    return False


# ------------------------------------------------------------------------------ 3. dropouts and stragglers


def test_rounds_close_at_the_deadline_despite_dropouts_and_count_late_reports(artifact, broker_url, fleet,
                                                                              tmp_path):
    """Of 10 selected simulated devices, 3 vanish mid-round (dropout) and 1 uploads so slowly that it misses
    the deadline: every round closes at the deadline with the 6 reports that arrived; the slow ones are late."""
    deadline_s, rounds = 4.0, 3
    sizes = [12, 14, 16, 18, 20, 22, 10, 10, 10, 24]  # steady x6, vanishing x3, straggler x1 (scenario order)
    clients = ClientData.from_arrays({f"client_{i:02d}": toy_data(n, seed=60 + i) for i, n in enumerate(sizes)})
    update_bytes = len(fake_update(artifact.manifest, fleet, "straggler-000", 0))  # float32, as the devices send
    spec = {"fleet": fleet, "seed": 0, "groups": [
        {"name": "steady", "count": 6},
        {"name": "vanishing", "count": 3, "dropout": 1.0, "downtime": 1.0},  # vanish every round, back in 1 s
        {"name": "straggler", "count": 1, "upload": update_bytes / (deadline_s + 2.0)}]}  # uploads for 5 s
    devices = Fleet.from_scenario(spec, broker_url, client_data=clients, workers=1)
    executor = MqttExecutor(broker_url, fleet, clients_per_round=10, over_selection=1.0, min_reports=3,
                            deadline_s=deadline_s)  # every round waits for all 10 to be online and selects them
    settings = ServerSettings(rounds=rounds, checkpoint_dir=tmp_path / "ckpt", metrics_log=tmp_path / "m.jsonl",
                              checkin_timeout_s=TIMEOUT_S)
    devices.start()
    try:
        with executor:
            FederatedServer(make_process(artifact, executor), executor, settings).run()
        wait_until(lambda: devices.stats()["straggler-000"].updates_published == rounds,
                   "the straggler's last upload", TIMEOUT_S)
        stats = devices.stats()
    finally:
        devices.stop()

    lines = read_metrics_log(tmp_path / "m.jsonl")
    assert [line["round"] for line in lines] == list(range(rounds))
    for line in lines:
        assert (line["outcome"], line["closed_by"], line["selected"], line["accepted"]) == \
            ("completed", "deadline", 10, 6)
        assert line["train_num_examples"] == sum(sizes[:6])  # exactly the reports that arrived were aggregated
        assert line["times"]["reporting"] >= deadline_s - 0.5
    assert [line["dropped"] for line in lines] == [{}] + [{"late": 1}] * (rounds - 1)  # each round's straggler
    vanishing = [stats[f"vanishing-{i:03d}"] for i in range(3)]
    assert all((s.rounds_dropped, s.updates_published) == (rounds, 0) for s in vanishing)
    assert all(stats[f"steady-{i:03d}"].updates_published == rounds for i in range(6))
    report_figures("test_rounds_close_at_the_deadline_despite_dropouts_and_count_late_reports", {
        "rounds": rounds, "selected_per_round": 10, "vanished_per_round": 3, "stragglers_per_round": 1,
        "rounds_closed_at_deadline": sum(line["closed_by"] == "deadline" for line in lines),
        "accepted_per_round": [line["accepted"] for line in lines],
        "late_reports_counted": sum(line["dropped"].get("late", 0) for line in lines),
        "straggler_updates_published": stats["straggler-000"].updates_published})


# ------------------------------------------------------------------------------ 4. bad updates end to end


def test_bad_updates_through_the_broker_are_dropped_and_counted_in_the_metrics_log(artifact, broker_url, fleet,
                                                                                   fake_devices, tmp_path, caplog):
    """NaN, Inf, oversized, wrong shapes, wrong round and model, unknown device and a replayed update id sent
    through mosquitto: each is dropped with a logged reason, counted in metrics.jsonl, and the server goes on."""
    manifest = artifact.manifest
    caplog.set_level(logging.INFO, logger="fedge.server")
    fake_devices.announce("a", "b", "c")
    executor = MqttExecutor(broker_url, fleet, clients_per_round=3, over_selection=1.0, min_reports=1,
                            deadline_s=5.0)  # waits for a, b and c; goal: all 3, so round 0 runs to the deadline
    settings = ServerSettings(rounds=2, checkpoint_dir=tmp_path / "ckpt", metrics_log=tmp_path / "m.jsonl")
    server = FederatedServer(make_process(artifact, executor), executor, settings)
    done: queue.Queue = queue.Queue()
    with executor:
        threading.Thread(target=lambda: done.put(server.run()), daemon=True).start()
        task = fake_devices.next_task()
        r, job = task.round, task.run_id
        good = fake_update(manifest, fleet, "a", r, job)
        bad = {
            "nan": _with_value(manifest, fleet, "b", r, job, np.nan),
            "inf": _with_value(manifest, fleet, "c", r, job, np.inf),
            "oversized": fake_update(manifest, fleet, "b", r, job) + bytes(max_update_bytes(manifest)),
            "wrong_shapes": fake_update(manifest, fleet, "b", r, job, tensors=[np.zeros(3, np.float32)] * 4),
            "wrong_round": fake_update(manifest, fleet, "b", r + 5, job),
            "wrong_model": fake_update(manifest, fleet, "c", r, job, model_hash="sha256:" + "0" * 64),
        }
        fake_devices.publish(update_topic(fleet, "a"), good)
        for name, payload in bad.items():
            fake_devices.publish(update_topic(fleet, "b" if name in ("nan", "oversized", "wrong_shapes",
                                                                     "wrong_round") else "c"), payload)
        fake_devices.publish(update_topic(fleet, "ghost"), fake_update(manifest, fleet, "ghost", r, job))  # unknown
        fake_devices.publish(update_topic(fleet, "a"), good)  # replayed update id
        second = fake_devices.next_task()  # the server went on to the next round
        for device in ("a", "b", "c"):
            fake_devices.publish(update_topic(fleet, device), fake_update(manifest, fleet, device, second.round, job))
        final = done.get(timeout=TIMEOUT_S)
    lines = read_metrics_log(tmp_path / "m.jsonl")
    assert final.round_num == 2 and [line["accepted"] for line in lines] == [1, 3]
    assert lines[0]["dropped"] == {"malformed": 4, "wrong_round": 1, "wrong_model": 1, "unknown_device": 1,
                                   "duplicate_update": 1}
    assert lines[1]["dropped"] == {} and lines[1]["closed_by"] == "goal"
    for reason in ("values are not all finite", f"payload has {len(bad['oversized'])} bytes, more than",
                   "num_elements is 3", "model_hash is", "ghost: unknown_device", "duplicate_update"):
        assert reason in caplog.text, reason
    assert caplog.text.count("values are not all finite") == 2  # the NaN and the Inf
    report_figures("test_bad_updates_through_the_broker_are_dropped_and_counted_in_the_metrics_log", {
        "bad_updates_sent": len(bad) + 2, "dropped_in_metrics_log": lines[0]["dropped"],
        "accepted": lines[0]["accepted"], "next_round_accepted": lines[1]["accepted"]})


def _with_value(manifest: Manifest, fleet: str, device: str, round_num: int, run_id: str, value: float) -> bytes:
    """A float32 update whose first delta value is `value` (encode_update refuses NaN and Inf, so it is patched in)."""
    sentinel = np.float32(1234.5678)
    tensors = [np.full(w.shape, 0.01, np.float32) for w in manifest.weights]
    tensors[0].flat[0] = sentinel
    payload = fake_update(manifest, fleet, device, round_num, run_id, tensors=tensors)
    assert payload.count(sentinel.tobytes()) == 1
    return payload.replace(sentinel.tobytes(), np.float32(value).tobytes())
