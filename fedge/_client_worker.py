"""One simulated client's work in an in-process executor's worker: a device's round, with files for I/O.

Imports only device_runtime (no TensorFlow), so worker processes stay small and start fast;
it lives outside fedge.learning so that a worker imports none of the process machinery. The
worker reads the artifact and the round's global weights from files named by their hash (the
executor wrote them, so the hashes hold) and runs the device's own `DeviceRound` on the client's
data; the result is the encoded update a device would publish.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np

from device_runtime import TrainableModel, evaluate_locally
from device_runtime.data import LocalData
from device_runtime.protocol import Task, decode_weights
from device_runtime.rounds import DeviceRound

SIMULATION_FLEET = "simulation"


@dataclass(frozen=True)
class ClientTask:
    """One client's share of a round: the files, the task, the fleet and id it trains as, its (checked) examples."""

    artifact_path: str
    weights_path: str
    task: Task
    device_id: str
    x: np.ndarray
    y: np.ndarray
    fleet: str = SIMULATION_FLEET


@functools.lru_cache(maxsize=8)
def _model(artifact_path: str) -> TrainableModel:
    """The artifact at `artifact_path` (named by its hash, so never stale), loaded once per worker."""
    with open(artifact_path, "rb") as f:
        return TrainableModel(f.read(), num_threads=1)


@functools.lru_cache(maxsize=1)
def _weights(weights_path: str, artifact_path: str, fleet: str) -> list[np.ndarray]:
    """The global weights in a payload file (named by its hash), decoded once per worker."""
    with open(weights_path, "rb") as f:
        return decode_weights(f.read(), _model(artifact_path).manifest, fleet=fleet).tensors


def train_client(client: ClientTask) -> bytes:
    """The client's round as a device runs it; the encoded update (a client with no data sends zeros)."""
    model = _model(client.artifact_path)
    device_round = DeviceRound(client.fleet, client.device_id, client.task)
    outcome = device_round.train(model, LocalData(client.x, client.y),
                                 _weights(client.weights_path, client.artifact_path, client.fleet),
                                 device_round.time_budget(time.time()))
    return outcome.payload


def evaluate_client(client: ClientTask) -> dict[str, float]:
    """The unfinalized metrics of the global weights on the client's data (zeros for a client with no data)."""
    model = _model(client.artifact_path)
    if client.x.shape[0] == 0:
        return {name: 0.0 for name in model.manifest.metrics.variables}
    model.set_weights(_weights(client.weights_path, client.artifact_path, client.fleet))
    return evaluate_locally(model, (client.x, client.y))
