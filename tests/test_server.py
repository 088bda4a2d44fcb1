"""The MQTT server against a real mosquitto, with in-thread DeviceAgents (device_runtime) as the fleet."""

from __future__ import annotations

import logging
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest

import fedge.learning as fl
from device_artifacts import artifact_path
from device_runtime.agent import DeviceAgent
from device_runtime.artifact import Artifact
from device_runtime.protocol import (ModelUpdate, decode_task, encode_status, encode_update, status_topic, task_topic,
                                     update_topic)
from fedge.learning import optimizers
from fedge.learning.executors import ClientUpdate, InProcessExecutor
from device_runtime.protocol import ClientWork
from fedge.learning.process import LearningProcess, aggregate_round
from fedge.server import DropReason, FederatedServer, MqttExecutor, ServerSettings
from fedge.server.metrics_log import read_metrics_log
from fedge.server.reports import ReportGate, RoundWindow
from test_device_agent import wait_until
from fedge.server.selection import over_selected, select_devices
from fedge.simulation.datasets import ClientDataset
from device_runtime.manifest import Manifest
from manifests import manifest_for

TIMEOUT_S = 20.0
CENTRES = np.eye(3, 8, dtype=np.float32) * 2.5


# ------------------------------------------------------------------------------------------- helpers


def toy_data(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A learnable task for the 'mlp' artifact (8 features, 3 classes): which centre an example lies near."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size).astype(np.int32)
    return (CENTRES[y] + rng.normal(scale=0.8, size=(size, 8))).astype(np.float32), y


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    """The 'mlp' test artifact (input (8,), 3 classes, SGD 0.1, batch 4)."""
    return Artifact.from_file(artifact_path("mlp", tmp_path_factory.mktemp("artifacts")))


def make_process(artifact: Artifact, executor: Any, epochs: int = 1, seed: int | None = 0,
                 server_optimizer: Any = None, **work: Any) -> LearningProcess:
    """FedAvg (FedProx with a `proximal_mu` in `work`, the rest of ClientWork too) on the artifact with `executor`;
    server SGD(1.0) unless given."""
    return LearningProcess(artifact, ClientWork(epochs, **work), fl.ClientWeighting.NUM_EXAMPLES,
                           server_optimizer or optimizers.SGD(1.0), executor, seed=seed)


@pytest.fixture
def broker_url(mosquitto_broker: tuple[str, int]) -> str:
    host, port = mosquitto_broker
    return f"mqtt://{host}:{port}"


@pytest.fixture
def start_agents(broker_url: str, fleet: str, tmp_path: Path) -> Iterator[Callable[..., list[DeviceAgent]]]:
    """Start in-thread DeviceAgents, each with its own data and model cache; stop them at teardown."""
    agents: list[DeviceAgent] = []

    def start(data: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[DeviceAgent]:
        started = []
        for device_id, arrays in data.items():
            agent = DeviceAgent(broker_url, fleet, device_id, arrays, cache_dir=tmp_path / f"cache-{device_id}",
                                num_threads=1)
            agent.start()
            agents.append(agent)
            started.append(agent)
        for agent in started:
            wait_until(lambda: agent.ready, f"agent {agent.device_id} to connect")
        return started

    yield start
    for agent in agents:
        agent.stop(timeout=TIMEOUT_S)


@pytest.fixture
def make_executor(broker_url: str, fleet: str) -> Iterator[Callable[..., MqttExecutor]]:
    """MqttExecutors on the session broker; closed at teardown."""
    executors: list[MqttExecutor] = []

    def make(**options: Any) -> MqttExecutor:
        executor = MqttExecutor(broker_url, fleet, **options)
        executor.start()
        executors.append(executor)
        return executor

    yield make
    for executor in executors:
        executor.close()


class FakeDevices:
    """The test as misbehaving devices: its own paho client publishes statuses and crafted updates."""

    def __init__(self, host: str, port: int, fleet: str) -> None:
        self.fleet = fleet
        self.tasks: queue.Queue[bytes] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fake-{uuid.uuid4().hex[:10]}")
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *args: subscribed.set()
        self.client.on_message = lambda client, userdata, message: self.tasks.put(bytes(message.payload))
        self.client.connect(host, port)
        self.client.loop_start()
        self.client.subscribe(task_topic(fleet), qos=1)
        assert subscribed.wait(TIMEOUT_S)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT_S)

    def announce(self, *device_ids: str) -> None:
        for device_id in device_ids:
            self.publish(status_topic(self.fleet, device_id), encode_status("online"), retain=True)

    def next_task(self):
        """The next non-empty task published (the server clears the retained task when a round closes)."""
        while True:
            payload = self.tasks.get(timeout=TIMEOUT_S)
            if payload:
                return decode_task(payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fake_devices(mosquitto_broker: tuple[str, int], fleet: str) -> Iterator[FakeDevices]:
    devices = FakeDevices(*mosquitto_broker, fleet)
    yield devices
    devices.close()


def fake_update(manifest: Manifest, fleet: str, device_id: str, round_num: int, run_id: str = "test-run",
                **fields: Any) -> bytes:
    """A well-formed float32 update (small random delta) of job `run_id`'s round unless `fields` change it."""
    rng = np.random.default_rng(abs(hash((device_id, round_num))) % 2**32)
    values = dict(fleet=fleet, round=round_num, device_id=device_id, update_id=uuid.uuid4().hex,
                  model_hash=manifest.content_hash, num_examples=8,
                  metrics={name: 1.0 for name in manifest.metrics.variables},
                  tensors=[rng.normal(scale=0.01, size=w.shape).astype(np.float32) for w in manifest.weights],
                  run_id=run_id)
    values.update(fields)
    return encode_update(ModelUpdate(**values))


def assert_same_weights(a: fl.ModelWeights, b: fl.ModelWeights) -> None:
    for x, y in zip(a.to_list(), b.to_list(), strict=True):
        np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------- tests


SERVER_OPTIMIZERS = {"fedavg": lambda: optimizers.SGD(1.0), "fedavgm": lambda: optimizers.SGD(0.5, momentum=0.9),
                     "fedprox_adam": lambda: optimizers.Adam(0.05), "fedprox_yogi": lambda: optimizers.Yogi(0.05),
                     "fedprox_adagrad": lambda: optimizers.Adagrad(0.05)}


@pytest.mark.parametrize("algorithm", list(SERVER_OPTIMIZERS))
def test_in_process_and_mqtt_executors_end_with_the_same_weights(algorithm, artifact, start_agents, make_executor,
                                                                 tmp_path):
    """FedAvg, and FedProx (mu in the task), with every server optimizer: devices over MQTT give the in-process
    weights."""
    options: dict[str, Any] = {}
    if algorithm.startswith("fedprox"):
        artifact = Artifact.from_file(artifact_path("scalar", tmp_path / "artifacts"))  # converted with proximal=True
        options = {"proximal_mu": 0.5}
    data = {f"dev-{i}": toy_data(size, seed=i) for i, size in enumerate((9, 14, 6, 11))}
    start_agents(data)
    executor = make_executor(min_reports=4, deadline_s=30)
    over_mqtt = make_process(artifact, executor, epochs=2, seed=5, **options,
                             server_optimizer=SERVER_OPTIMIZERS[algorithm]())
    with InProcessExecutor(num_workers=0) as inline:
        in_process = make_process(artifact, inline, epochs=2, seed=5, **options,
                                  server_optimizer=SERVER_OPTIMIZERS[algorithm]())
        clients = [ClientDataset(x, y, client_id=device) for device, (x, y) in data.items()]
        mqtt_state, local_state = over_mqtt.initialize(), in_process.initialize()
        for _ in range(3):
            mqtt_state, mqtt_metrics = over_mqtt.next(mqtt_state, list(data))
            local_state, local_metrics = in_process.next(local_state, clients)
            assert mqtt_metrics["distributor"]["accepted"] == 4
            assert mqtt_metrics["client_work"]["train"] == pytest.approx(local_metrics["client_work"]["train"])
    assert mqtt_state.round_num == local_state.round_num == 3
    assert mqtt_metrics["finalizer"]["update_norm"] > 0
    assert_same_weights(mqtt_state.global_model_weights, local_state.global_model_weights)


def test_rounds_complete_over_selected_and_accuracy_improves(artifact, start_agents, make_executor, tmp_path):
    data = {f"dev-{i}": toy_data(24, seed=10 + i) for i in range(4)}
    start_agents(data)
    executor = make_executor(clients_per_round=3, min_reports=2, deadline_s=20)  # selects ceil(1.3 * 3) = 4
    process = make_process(artifact, executor, seed=3)
    evaluation = fl.FederatedEvaluation(artifact, InProcessExecutor(num_workers=0))
    held_out = [toy_data(60, seed=99)]
    before = evaluation(process.get_model_weights(process.initialize()), held_out)["eval"]
    settings = ServerSettings(rounds=4, checkpoint_dir=tmp_path / "ckpt", metrics_log=tmp_path / "metrics.jsonl",
                              seed=3, checkin_timeout_s=10, eval_every=2)
    server = FederatedServer(process, executor, settings, evaluation, held_out)
    state = server.run()

    assert state.round_num == 4 and server.rounds_failed == 0
    lines = read_metrics_log(tmp_path / "metrics.jsonl")
    assert [line["round"] for line in lines] == [0, 1, 2, 3]
    for line in lines:
        assert (line["outcome"], line["closed_by"], line["selected"], line["goal"], line["accepted"]) == \
            ("completed", "goal", 4, 3, 3)
        assert set(line["dropped"]) <= {"after_goal", "late", "wrong_round"}  # the over-selected fourth report
        assert line["bytes_up"] > 0 and line["bytes_down"] > 0 and line["train_num_examples"] == 72
        assert set(line["times"]) == {"checkin", "round", "evaluation", "checkpoint", "configure", "reporting"}
        assert line["seconds"] == pytest.approx(sum(line["times"][k] for k in ("checkin", "round", "evaluation",
                                                                                 "checkpoint")))
    assert lines[0]["bytes_published"] > len(artifact.tflite_bytes) > lines[1]["bytes_published"]
    assert ["eval_loss" in line for line in lines] == [False, True, False, True]
    after = lines[-1]
    assert after["eval_loss"] < 0.7 * before["loss"] and after["eval_accuracy"] > max(0.8, before["accuracy"])
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]
    saved = fl.load_state(tmp_path / "ckpt" / "state.npz")
    assert saved.round_num == 4
    assert_same_weights(saved.global_model_weights, state.global_model_weights)


def test_a_fleet_short_of_over_selection_starts_after_the_grace_not_the_checkin_wait(artifact, start_agents,
                                                                                     make_executor, tmp_path, caplog):
    start_agents({f"dev-{i}": toy_data(24, seed=20 + i) for i in range(3)})
    executor = make_executor(clients_per_round=3, over_selection=2.0, deadline_s=20, selection_grace_s=0.5)
    settings = ServerSettings(rounds=3, checkpoint_dir=tmp_path / "ckpt", metrics_log=tmp_path / "metrics.jsonl",
                              checkin_timeout_s=60)  # over-selection asks for 6 of the 3 devices
    with caplog.at_level(logging.INFO, logger="fedge.server.mqtt_executor"):
        state = FederatedServer(make_process(artifact, executor), executor, settings).run()

    assert state.round_num == 3
    lines = read_metrics_log(tmp_path / "metrics.jsonl")
    assert [(line["outcome"], line["selected"]) for line in lines] == [("completed", 3)] * 3
    assert max(line["times"]["checkin"] for line in lines) < 10  # the grace, not the 60 s check-in wait
    said = [r.getMessage() for r in caplog.records if "where over-selection asks for 6" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("3 devices available"), said


def test_the_grace_waits_for_busy_surplus_devices_and_not_for_devices_that_do_not_exist():
    from fedge.server.checkin import DeviceRegistry

    def waited(states: dict[str, str]) -> tuple[float, int]:
        registry = DeviceRegistry()
        for device, state in states.items():
            registry.on_status(device, encode_status(state))
        started = time.monotonic()
        available = registry.wait_for(4, 1.5, threading.Event(), enough=2, settle=0.2)  # over-select 4, goal 2
        return time.monotonic() - started, len(available)

    seconds, available = waited({"a": "online", "b": "online"})  # the whole fleet: 2 devices
    assert available == 2 and 0.2 <= seconds < 1.0
    seconds, available = waited({"a": "online", "b": "online", "c": "training", "d": "training"})
    assert available == 2 and seconds >= 1.5  # c and d come back after their round: worth the check-in wait


def test_selection_draws_ceil_over_selection_times_goal_with_its_seed():
    available = [f"d{i:02d}" for i in range(10)]
    assert over_selected(4, 1.3) == 6 and over_selected(10, 1.3) == 13 and over_selected(3, 1.0) == 3
    chosen = select_devices(reversed(available), 4, 1.3, seed=7)
    assert len(chosen) == 6 and set(chosen) <= set(available) and chosen == sorted(chosen)
    assert select_devices(available, 4, 1.3, seed=7) == chosen  # the seed and the ids decide, not their order
    assert any(select_devices(available, 4, 1.3, seed=s) != chosen for s in range(8, 12))
    assert select_devices(available[:3], 4, 1.3, seed=7) == available[:3]  # fewer available: all of them


def test_bad_late_and_duplicate_updates_are_dropped_and_counted(artifact, make_executor, fake_devices, fleet,
                                                                caplog):
    manifest = artifact.manifest
    fake_devices.announce("a", "b", "c", "d")
    executor = make_executor(min_reports=1, deadline_s=2.5)  # goal: every selected device, so it runs to the deadline
    wait_until(lambda: len(executor.registry.available()) == 4, "the devices to check in")
    process = make_process(artifact, executor)
    start = process.initialize()
    results: queue.Queue = queue.Queue()

    def run_round(state, devices):
        threading.Thread(target=lambda: results.put(process.next(state, devices)), daemon=True).start()
        return fake_devices.next_task()

    caplog.set_level(logging.INFO, logger="fedge.server")
    task = run_round(start, ["a", "b", "c"])
    assert task.selected == ("a", "b", "c") and task.weights_hash is not None
    r, job = task.round, task.run_id
    accepted = fake_update(manifest, fleet, "a", r, job)
    for device, payload in [
        ("a", accepted),
        ("a", accepted),                                                            # replayed: duplicate_update
        ("a", fake_update(manifest, fleet, "a", r, job)),                           # second_update
        ("b", b"\x00" * 64),                                                        # malformed
        ("b", fake_update(manifest, fleet, "b", r, job, model_hash="sha256:" + "0" * 64)),  # wrong_model
        ("b", fake_update(manifest, fleet, "b", r, job, tensors=[np.zeros(3, np.float32)] * 4)),  # malformed
        ("b", fake_update(manifest, fleet, "b", r + 7, job)),                       # wrong_round
        ("b", fake_update(manifest, fleet, "b", r, "a-stopped-job")),               # wrong_job: another job's round r
        ("b", fake_update(manifest, fleet, "c", r, job)),                           # wrong_sender
        ("ghost", fake_update(manifest, fleet, "ghost", r, job)),                   # unknown_device
        ("d", fake_update(manifest, fleet, "d", r, job)),                           # not_selected
    ]:
        fake_devices.publish(update_topic(fleet, device), payload)
    state, metrics = results.get(timeout=TIMEOUT_S)
    distributor = metrics["distributor"]
    assert (distributor["outcome"], distributor["closed_by"], distributor["accepted"]) == ("completed", "deadline", 1)
    assert distributor["dropped"] == {"duplicate_update": 1, "second_update": 1, "malformed": 2, "wrong_model": 1,
                                      "wrong_round": 1, "wrong_job": 1, "wrong_sender": 1, "unknown_device": 1,
                                      "not_selected": 1}
    assert metrics["aggregator"]["num_clients"] == 1 and state.round_num == 1
    assert "dropped an update from ghost: unknown_device" in caplog.text

    fake_devices.publish(update_topic(fleet, "b"), fake_update(manifest, fleet, "b", r, job))  # after r's deadline
    task = run_round(state, ["a"])
    fake_devices.publish(update_topic(fleet, "a"), fake_update(manifest, fleet, "a", task.round, job))
    _, metrics = results.get(timeout=TIMEOUT_S)
    assert metrics["distributor"]["closed_by"] == "goal" and metrics["distributor"]["dropped"] == {"late": 1}
    assert set(distributor["dropped"]) | {"late", "after_goal"} == {r.value for r in DropReason}  # after_goal: the rounds test


def test_an_update_that_would_make_the_weights_insane_is_refused_and_the_server_goes_on(
        artifact, make_executor, fake_devices, fleet, tmp_path, caplog):
    """Finite deltas near float32's maximum with a claimed 2**62 examples dominate the mean: weights of ~3e38, whose
    squares overflow, would be committed (and the next such round would make them Inf). The round is refused, the
    weights stay, the checkpoint stays sane and the next honest round completes."""
    manifest = artifact.manifest
    fake_devices.announce("honest", "hostile")
    executor = make_executor(clients_per_round=2, deadline_s=20, over_selection=1.0)
    wait_until(lambda: len(executor.registry.available()) == 2, "the devices to check in")
    settings = ServerSettings(rounds=2, checkpoint_dir=tmp_path / "ckpt", metrics_log=tmp_path / "metrics.jsonl",
                              checkin_timeout_s=10)
    server = FederatedServer(make_process(artifact, executor), executor, settings)
    start = server.start_state()
    finished: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: finished.put(server.run()), daemon=True).start()

    task = fake_devices.next_task()
    huge = [np.full(w.shape, 3e38, np.float32) for w in manifest.weights]
    fake_devices.publish(update_topic(fleet, "hostile"), fake_update(manifest, fleet, "hostile", task.round,
                                                                     task.run_id, tensors=huge, num_examples=2**62))
    fake_devices.publish(update_topic(fleet, "honest"), fake_update(manifest, fleet, "honest", task.round,
                                                                    task.run_id))
    task = fake_devices.next_task()  # the server goes on to the next round
    for device in ("honest", "hostile"):
        fake_devices.publish(update_topic(fleet, device), fake_update(manifest, fleet, device, task.round,
                                                                      task.run_id))
    state = finished.get(timeout=TIMEOUT_S)

    lines = read_metrics_log(tmp_path / "metrics.jsonl")
    assert [(line["outcome"], line.get("refused"), line["accepted"]) for line in lines] == \
        [("failed", "insane_state", 2), ("completed", None, 2)]
    assert "round 0 refused: its aggregate would make the global weights" in caplog.text
    saved = fl.load_state(tmp_path / "ckpt" / "state.npz")
    assert state.round_num == saved.round_num == 2
    assert all(np.all(np.isfinite(w)) for w in saved.global_model_weights.to_list())
    moved = [np.max(np.abs(a - b)) for a, b in zip(saved.global_model_weights.to_list(),
                                                   start.global_model_weights.to_list(), strict=True)]
    assert 0 < max(moved) < 1  # only the honest second round moved the weights


def test_a_round_short_of_min_reports_fails_cleanly_and_the_next_succeeds(artifact, start_agents, make_executor,
                                                                           fake_devices, tmp_path):
    start_agents({"dev-0": toy_data(12, seed=0), "dev-1": toy_data(12, seed=1)})
    fake_devices.announce("silent")  # checks in, is selected, never reports
    executor = make_executor(clients_per_round=2, min_reports=2, deadline_s=2.0, over_selection=1.0)
    process = make_process(artifact, executor)
    start = process.initialize()
    failed, metrics = process.next(start, ["dev-0", "silent"])
    assert metrics["distributor"]["outcome"] == "failed" and metrics["distributor"]["accepted"] == 1
    assert metrics["aggregator"]["num_clients"] == 0 and metrics["finalizer"]["update_norm"] == 0
    assert failed.round_num == 1  # the round id is spent; the weights are not changed
    assert_same_weights(failed.global_model_weights, start.global_model_weights)
    succeeded, metrics = process.next(failed, ["dev-0", "dev-1"])
    assert metrics["distributor"]["outcome"] == "completed" and metrics["aggregator"]["num_clients"] == 2
    assert succeeded.round_num == 2 and metrics["finalizer"]["update_norm"] > 0


def test_a_restarted_server_resumes_from_its_checkpoint(artifact, broker_url, fleet, start_agents, tmp_path):
    data = {f"dev-{i}": toy_data(10 + 3 * i, seed=20 + i) for i in range(3)}
    start_agents(data)

    def serve(rounds: int) -> tuple[FederatedServer, fl.LearningProcessState]:
        with MqttExecutor(broker_url, fleet, clients_per_round=3, over_selection=1.0, deadline_s=20) as executor:
            settings = ServerSettings(rounds=rounds, checkpoint_dir=tmp_path / "ckpt",
                                      metrics_log=tmp_path / "metrics.jsonl", seed=1)
            server = FederatedServer(make_process(artifact, executor, seed=1), executor, settings)
            return server, server.run()

    _, first = serve(2)
    assert first.round_num == 2 and fl.load_state(tmp_path / "ckpt" / "state.npz").round_num == 2
    _, resumed = serve(4)
    assert resumed.round_num == 4
    assert [line["round"] for line in read_metrics_log(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    with InProcessExecutor(num_workers=0) as inline:  # the same 4 rounds without a stop, in-process
        process = make_process(artifact, inline, seed=1)
        state = process.initialize()
        for _ in range(4):
            state, _ = process.next(state, [ClientDataset(x, y, client_id=d) for d, (x, y) in data.items()])
    assert_same_weights(resumed.global_model_weights, state.global_model_weights)


def test_the_run_id_is_kept_while_a_checkpoint_is_and_renewed_with_a_new_job(tmp_path):
    """A resumed job (its checkpoint there) keeps its run id; a folder without a checkpoint starts a new job."""
    from fedge.server.checkpoint import Checkpoints

    checkpoints = Checkpoints(tmp_path / "job")
    assert checkpoints.run_id("first") == "first"
    assert Checkpoints(tmp_path / "job").run_id("second") == "second"  # no state.npz yet: a new job
    checkpoints.path.write_bytes(b"a checkpoint")  # only its existence matters here
    assert Checkpoints(tmp_path / "job").run_id("third") == "second"  # the restarted server's job
    (tmp_path / "job" / "run_id").write_text("a/b\n")
    with pytest.raises(ValueError, match=r"run_id: run id 'a/b' has .* remove state.npz there"):
        checkpoints.run_id("fourth")


def test_streaming_aggregation_keeps_no_update_per_client():
    """200 updates of a 1M-parameter model through the report checks and the aggregator: memory O(model)."""
    shapes = [[1000, 1000], [1000]]
    manifest = manifest_for(shapes)
    model_bytes = 4 * sum(math.prod(s) for s in shapes)
    delta = [np.full(s, 0.001, np.float32) for s in shapes]
    weights = fl.ModelWeights([np.zeros(s, np.float32) for s in shapes], [])
    state = fl.LearningProcessState(weights, {}, 0)

    def aggregate(count: int) -> tuple[int, dict]:
        devices = [f"dev-{i}" for i in range(count)]
        gate = ReportGate("memory", is_known=lambda device: True)
        gate.open(RoundWindow("memory-run", 0, frozenset(devices), time.time() + 600, count, manifest))
        peaks = []

        def updates() -> Iterator[ClientUpdate]:
            for device in devices:
                peaks.append(tracemalloc.get_traced_memory()[1])
                payload = encode_update(ModelUpdate("memory", 0, device, uuid.uuid4().hex, manifest.content_hash,
                                                    4, {"loss_sum": 2.0, "num_examples": 4.0}, delta, "memory-run"))
                tracemalloc.reset_peak()  # the test's encoding is the devices' memory, not the server's
                update = gate.check(update_topic("memory", device), payload, time.time())
                yield ClientUpdate(update.tensors, update.num_examples, update.metrics, 0, len(payload))

        tracemalloc.start()
        try:
            new_state, metrics = aggregate_round(state, weights, updates(), manifest,
                                                 fl.ClientWeighting.NUM_EXAMPLES, optimizers.SGD(1.0))
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        np.testing.assert_allclose(new_state.global_model_weights.trainable[0], 0.001, rtol=1e-5)
        return max(peaks), metrics

    few_peak, _ = aggregate(10)
    many_peak, metrics = aggregate(200)
    assert metrics["aggregator"]["num_clients"] == 200 and metrics["client_work"]["train"]["loss"] == 0.5
    assert many_peak < few_peak + model_bytes  # nothing grows with the number of clients
    assert many_peak < 8 * model_bytes, f"peak {many_peak / model_bytes:.1f} model sizes"  # 200 kept would be 200+


def test_fedge_serve_converts_a_keras_model_trains_and_stops_on_sigterm(broker_url, fleet, start_agents, tmp_path):
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    model.save(tmp_path / "model.keras")
    x, y = toy_data(40, seed=5)
    np.savez(tmp_path / "held_out.npz", x=x, y=y)
    start_agents({f"dev-{i}": toy_data(16, seed=30 + i) for i in range(3)})
    log = tmp_path / "metrics.jsonl"
    command = [sys.executable, "-m", "fedge.cli", "serve", str(tmp_path / "model.keras"), "--broker", broker_url,
               "--fleet", fleet, "--rounds", "100", "--clients-per-round", "2", "--min-reports", "1",
               "--deadline", "20", "--checkpoint-dir", str(tmp_path / "ckpt"), "--metrics-log", str(log),
               "--loss", "sparse_categorical_crossentropy", "--batch-size", "4", "--learning-rate", "0.1",
               "--eval-data", str(tmp_path / "held_out.npz"), "--checkin-timeout", "5"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    try:
        wait_until(lambda: log.exists() and len(read_metrics_log(log)) >= 2, "two rounds in the metrics log",
                   timeout=90)
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=TIMEOUT_S)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, output[-3000:]
    assert "received SIGTERM" in output and "stopped; the same command resumes" in output
    lines = read_metrics_log(log)
    assert fl.load_state(tmp_path / "ckpt" / "state.npz").round_num == len(lines) >= 2
    assert all(line["selected"] == 3 and line["accepted"] == 2 and "eval_accuracy" in line for line in lines)
    assert (tmp_path / "ckpt" / "model.tflite").exists()


def test_fedge_serve_refuses_bad_arguments_before_connecting(tmp_path, capsys, artifact):
    from fedge.cli import main

    path = tmp_path / "model.tflite"
    path.write_bytes(artifact.tflite_bytes)
    common = ["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--rounds", "1", "--clients-per-round", "2",
              "--checkpoint-dir", str(tmp_path / "ckpt")]
    assert main(["serve", str(path), *common, "--loss", "binary_crossentropy"]) == 2
    assert "model.loss applies to a model that is converted; a .tflite artifact has its own" \
        in capsys.readouterr().err
    assert main(["serve", str(path), *common, "--min-reports", "3"]) == 2
    assert "min_reports (3) cannot exceed clients_per_round (2)" in capsys.readouterr().err
    path.write_bytes(artifact.tflite_bytes[:-10] + b"tampered!!")
    assert main(["serve", str(path), *common]) == 2
    assert "fedge serve: error:" in capsys.readouterr().err
