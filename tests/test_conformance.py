"""The device round exists once: its three drivers pass the same conformance vectors (tests/conformance).

Each vector is a task, the global weights, a model, local data and the update a device must send.
The sans-IO DeviceRound itself, the in-process worker (files), the threaded DeviceAgent and the
fleet simulator's asyncio device (both over a real Mosquitto) must each produce that update: the
same header, example count and metrics, the same deltas within the vector's tolerance.
"""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_runtime import TrainableModel, load_local_data
from device_runtime.agent import DeviceAgent
from device_runtime.protocol import decode_task, decode_update
from device_runtime.protocol.topics import model_topic, task_topic, weights_topic
from device_runtime.rounds import DeviceRound
from fedge._client_worker import ClientTask, train_client
from fedge.broker import EmbeddedBroker
from fedge.simulation.datasets import ClientData
from simulator.fleet import Fleet
from simulator.scenario import Group, Scenario
from test_device_agent import TIMEOUT_S, Server

pytestmark = pytest.mark.device

VECTORS = sorted(path for path in (Path(__file__).parent / "conformance").iterdir() if (path / "task.json").exists())
FLEET = "conformance"


class Vector:
    """One conformance vector's files."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.model_bytes = (folder / "model.tflite").read_bytes()
        self.task_payload = (folder / "task.json").read_bytes()
        self.task = decode_task(self.task_payload)
        self.weights_payload = (folder / "weights.bin").read_bytes()
        with np.load(folder / "data.npz") as data:
            self.x, self.y = data["x"], data["y"]
        self.expected = json.loads((folder / "expected.json").read_text())
        self.manifest = TrainableModel(self.model_bytes, num_threads=1).manifest

    def check(self, payload: bytes) -> None:
        """`payload` is the update this vector expects (the update id aside, which is fresh per update)."""
        want = decode_update((self.folder / "update.bin").read_bytes(), self.manifest)
        got = decode_update(payload, self.manifest, fleet=self.expected["fleet"], device_id=self.expected["device_id"])
        assert (got.run_id, got.round, got.model_hash, got.num_examples) == \
            (self.task.run_id, self.expected["round"], self.expected["model_hash"], self.expected["num_examples"])
        assert got.metrics == pytest.approx(self.expected["metrics"], rel=1e-5)
        for index, (delta, reference) in enumerate(zip(got.tensors, want.tensors, strict=True)):
            np.testing.assert_allclose(delta, reference, rtol=self.expected["rtol"], atol=self.expected["atol"],
                                       err_msg=f"{self.folder.name}: tensor {index}")


@pytest.fixture(params=VECTORS, ids=[path.name for path in VECTORS])
def vector(request: pytest.FixtureRequest) -> Vector:
    return Vector(request.param)


@pytest.fixture
def broker() -> Any:
    """A private Mosquitto per test: the vectors' fleet id is fixed, so no retained message may linger."""
    with EmbeddedBroker("mosquitto") as private:
        yield private


def test_the_vectors_cover_every_encoding_and_fedprox() -> None:
    tasks = [Vector(folder).task for folder in VECTORS]
    assert {task.work.encoding for task in tasks} == {"float32", "float16", "int8"}
    assert any(task.work.proximal_mu for task in tasks) and any(task.work.max_steps for task in tasks)


def test_device_round_sans_io(vector: Vector) -> None:
    """The round as a driver sees it: what to fetch, the checks, then training."""
    device_round = DeviceRound(FLEET, vector.expected["device_id"], vector.task)
    assert (device_round.model_fetch.what, device_round.weights_fetch.what) == ("model", "global weights")
    assert device_round.model_fetch.topic == model_topic(FLEET, vector.task.model_hash)
    assert device_round.weights_fetch.topic == weights_topic(FLEET)
    assert device_round.weights_fetch.matches(vector.weights_payload)
    assert not device_round.weights_fetch.matches(vector.weights_payload + b"x")
    model = TrainableModel(device_round.check_model(vector.model_bytes), num_threads=1)
    weights = device_round.global_weights(vector.weights_payload, model)
    outcome = device_round.train(model, load_local_data((vector.x, vector.y), model.manifest), weights,
                                 device_round.time_budget(time.time()))
    assert outcome.result.steps == vector.expected["steps"]
    vector.check(outcome.payload)


def test_in_process_worker(vector: Vector, tmp_path: Path) -> None:
    """fedge's in-process executor: a worker reads the model and weights from files and runs the device round."""
    (tmp_path / "model.tflite").write_bytes(vector.model_bytes)
    (tmp_path / "weights.bin").write_bytes(vector.weights_payload)
    vector.check(train_client(ClientTask(str(tmp_path / "model.tflite"), str(tmp_path / "weights.bin"), vector.task,
                                         vector.expected["device_id"], vector.x, vector.y, FLEET)))


def _publish_round(server: Server, vector: Vector) -> None:
    """What the fedge server retains for a round: model, global weights, task."""
    server.publish(model_topic(FLEET, vector.task.model_hash), vector.model_bytes)
    server.publish(weights_topic(FLEET), vector.weights_payload)
    server.publish(task_topic(FLEET), vector.task_payload)


def _update(server: Server) -> bytes:
    """The one update the round brings."""
    try:
        topic, payload = server.updates.get(timeout=TIMEOUT_S)
    except queue.Empty:
        pytest.fail("no update arrived")
    return payload


def test_threaded_device_agent(vector: Vector, broker: Any, tmp_path: Path) -> None:
    """fedge-device's agent over MQTT: fetch by hash, verify, train, publish."""
    np.savez(tmp_path / "data.npz", x=vector.x, y=vector.y)
    server = Server(broker.host, broker.port, FLEET)
    agent = DeviceAgent(broker.url, FLEET, vector.expected["device_id"], tmp_path / "data.npz",
                        cache_dir=tmp_path / "cache", num_threads=1)
    try:
        agent.start()
        _publish_round(server, vector)
        vector.check(_update(server))
    finally:
        agent.stop(timeout=TIMEOUT_S)
        server.client.disconnect()


def test_simulated_device(vector: Vector, broker: Any) -> None:
    """The fleet simulator's asyncio device, training on the fleet's shared interpreters."""
    server = Server(broker.host, broker.port, FLEET)
    device_id = vector.expected["device_id"]
    group, _ = device_id.rsplit("-", 1)
    clients = ClientData.from_arrays({"only": (vector.x, vector.y)})
    fleet = Fleet(Scenario(FLEET, 0, (Group(group, 1),)), broker.url, clients, workers=1)
    assert fleet.device_ids == [device_id]
    try:
        fleet.start()
        _publish_round(server, vector)
        vector.check(_update(server))
    finally:
        fleet.stop()
        server.client.disconnect()
