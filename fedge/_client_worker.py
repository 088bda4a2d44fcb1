"""One simulated client's work in an in-process executor's worker: what a device does in a round.

Imports only device_runtime (no TensorFlow), so worker processes stay small and start fast;
it lives outside fedge.learning so that a worker imports none of the process machinery. The
worker reads the artifact and the round's global weights from files named by their hash
(as a device fetches them by hash), decodes the weights with the wire codec, trains with
`train_locally` and returns its delta encoded as the FlatBuffers update a device publishes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from device_runtime import TrainableModel, evaluate_locally, train_locally
from device_runtime.protocol import ModelUpdate, decode_weights, encode_update
from device_runtime.rounds import proximal_strength

SIMULATION_FLEET = "simulation"


@dataclass(frozen=True)
class ClientTask:
    """Everything one client needs for one round; `x`, `y` are already checked against the manifest."""

    artifact_path: str
    weights_path: str
    client_index: int
    round_num: int
    x: np.ndarray
    y: np.ndarray
    epochs: int = 1
    max_steps: int | None = None
    shuffle_seed: int | None = None
    proximal_mu: float | None = None
    learning_rate: float | None = None


def client_id(index: int) -> str:
    """The device id a simulated client uses in its updates."""
    return f"client-{index}"


@functools.lru_cache(maxsize=8)
def _model(artifact_path: str) -> TrainableModel:
    """The artifact at `artifact_path` (named by its hash, so never stale), loaded once per worker."""
    with open(artifact_path, "rb") as f:
        return TrainableModel(f.read(), num_threads=1)


@functools.lru_cache(maxsize=1)
def _weights(weights_path: str, artifact_path: str) -> list[np.ndarray]:
    """The round's global weights decoded from their payload file (named by its hash), once per worker."""
    with open(weights_path, "rb") as f:
        return decode_weights(f.read(), _model(artifact_path).manifest, fleet=SIMULATION_FLEET).tensors


def train_client(task: ClientTask) -> bytes:
    """Train from the global weights on the client's data; the encoded float32 update (a client with no data sends zeros)."""
    model = _model(task.artifact_path)
    weights = _weights(task.weights_path, task.artifact_path)
    if task.x.shape[0] == 0:
        delta = [np.zeros_like(w) for w in weights]
        num_examples, metrics = 0, {name: 0.0 for name in model.manifest["metrics"]["variables"]}
    else:
        learning_rate = task.learning_rate  # None: the artifact's own (the cached model may hold an earlier task's)
        if learning_rate is None:
            learning_rate = model.manifest["optimizer"]["learning_rate"]
        result = train_locally(model, (task.x, task.y), epochs=task.epochs, shuffle_seed=task.shuffle_seed,
                               max_steps=task.max_steps, learning_rate=learning_rate, initial_weights=weights,
                               proximal_mu=proximal_strength(task.proximal_mu, model.manifest))
        delta, num_examples, metrics = result.delta, result.num_examples, result.metrics
    update = ModelUpdate(fleet=SIMULATION_FLEET, round=task.round_num, device_id=client_id(task.client_index),
                         update_id=f"{task.round_num}-{task.client_index}", model_hash=model.content_hash,
                         num_examples=num_examples, metrics=metrics, tensors=delta)
    return encode_update(update, "float32")


def evaluate_client(task: ClientTask) -> dict[str, float]:
    """The unfinalized metrics of the global weights on the client's data (zeros for a client with no data)."""
    model = _model(task.artifact_path)
    if task.x.shape[0] == 0:
        return {name: 0.0 for name in model.manifest["metrics"]["variables"]}
    model.set_weights(_weights(task.weights_path, task.artifact_path))
    return evaluate_locally(model, (task.x, task.y))
