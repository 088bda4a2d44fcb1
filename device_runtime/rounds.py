"""A device's round without I/O: which tasks to take, what to fetch, how to train, the update to send.

`DeviceRound` is the one implementation of a round (task in -> fetches needed -> train ->
update out). Three drivers wrap it with their own I/O: the MQTT device agent (a thread),
the fleet simulator's emulated devices (asyncio) and the in-process executor's workers
(files). tests/conformance holds vectors any client, Python or not, can be checked against.
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from collections.abc import Container, Sequence
from dataclasses import dataclass

import numpy as np

from device_runtime.artifact import ArtifactError, verify_content_hash
from device_runtime.data import LocalData
from device_runtime.model import TrainableModel
from device_runtime.protocol import (ModelUpdate, ProtocolError, Task, decode_task, decode_weights, encode_update,
                                     is_selected, payload_hash)
from device_runtime.protocol.topics import hash_hex, model_topic, weights_topic
from device_runtime.signing import SignatureError, TaskVerifier
from device_runtime.training import LocalResult, train_locally

logger = logging.getLogger(__name__)


def device_shuffle_seed(task_seed: int, device_id: str) -> int:
    """The shuffle seed of one device in one round: a 63-bit hash of the task's seed and the device id."""
    digest = hashlib.sha256(f"{task_seed}:{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


# -- which tasks a device takes ---------------------------------------------------------------------


def round_key(task: Task) -> tuple[str, int]:
    """What a device remembers of a round it started: the job's run id and the round number."""
    return task.run_id, task.round


def supersedes(newer: Task, queued: Task) -> bool:
    """Whether a task that arrived later replaces one still queued: another job's, or a round of the same
    job at least as recent (the retained task is republished on reconnect)."""
    return newer.run_id != queued.run_id or newer.round >= queued.round


def skip_reason(task: Task, device_id: str, started_rounds: Container[tuple[str, int]], now: float) -> str | None:
    """Why `device_id` should not train `task` at unix time `now`, or None if it should."""
    if round_key(task) in started_rounds:
        return "already trained (or training) this round"
    if not is_selected(task, device_id):
        return "this device is not selected"
    if task.deadline <= now:
        return f"deadline passed {now - task.deadline:.1f} s ago"
    return None


def task_to_train(payload: bytes, device_id: str, started_rounds: Container[tuple[str, int]], now: float,
                  verifier: TaskVerifier | None = None) -> tuple[Task | None, str | None]:
    """(task, None) if this device should train the task payload, (None, why not) if not, (None, None)
    for an empty payload (the server cleared its retained task). `verifier` checks the signature first
    (None: unsigned operation); a refused signature is also logged as a warning naming the topic."""
    if not payload:
        return None, None
    try:
        task = decode_task(payload if verifier is None else verifier.open(payload))
    except SignatureError as error:
        logger.warning("%s: refusing the task on %s: %s", device_id, verifier.topic, error)
        return None, f"refused task: {error}"
    except ProtocolError as error:
        return None, f"malformed task: {error}"
    reason = skip_reason(task, device_id, started_rounds, now)
    return (None, f"round {task.round}: {reason}") if reason else (task, None)


# -- one round ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fetch:
    """A retained payload a round needs: the model (its topic names its hash) or the round's global weights."""

    what: str
    topic: str
    digest: str  # the model's content hash, or the SHA-256 of the weights payload

    def matches(self, payload: bytes) -> bool:
        """Whether `payload` is the one awaited (a model is checked in full by DeviceRound.check_model)."""
        return bool(payload) and (self.what == "model" or payload_hash(payload) == self.digest)


@dataclass
class RoundOutcome:
    """A trained round: the update as sent, its encoded payload, and what local training measured."""

    update: ModelUpdate
    payload: bytes
    result: LocalResult


class DeviceRound:
    """One device's round of one task, without I/O: the driver fetches `model_fetch` unless it holds the model,
    then `weights_fetch` when the task names global weights, has them checked here, then calls `train`."""

    def __init__(self, fleet: str, device_id: str, task: Task) -> None:
        """The round `task` asks of `device_id` in `fleet` (the driver decided to take it: task_to_train)."""
        self.fleet, self.device_id, self.task = fleet, device_id, task
        self.model_fetch = Fetch("model", model_topic(fleet, task.model_hash), task.model_hash)
        self.weights_fetch = None if task.weights_hash is None else Fetch(
            "global weights", weights_topic(fleet), task.weights_hash)

    def check_model(self, payload: bytes) -> bytes:
        """The fetched artifact if its content hash verifies and is the task's; ArtifactError otherwise."""
        actual = verify_content_hash(payload)
        if hash_hex(actual) != hash_hex(self.task.model_hash):
            raise ArtifactError(f"the task names {self.task.model_hash} but the artifact's content hash is {actual}")
        return payload

    def global_weights(self, payload: bytes, model: TrainableModel) -> list[np.ndarray]:
        """The fetched global weights, checked against the task's hash and the model; ProtocolError otherwise."""
        if self.weights_fetch is None or not self.weights_fetch.matches(payload):
            raise ProtocolError(f"the global weights do not hash to the task's {self.task.weights_hash}")
        return decode_weights(payload, model.manifest, fleet=self.fleet).tensors

    def time_budget(self, now: float) -> float | None:
        """Seconds of training the task allows from unix time `now`: max_seconds capped by the deadline (None: no cap)."""
        limit = self.task.deadline - now
        if self.task.work.max_seconds is not None:
            limit = min(limit, self.task.work.max_seconds)
        return None if math.isinf(limit) else max(0.0, limit)

    def train(self, model: TrainableModel, data: LocalData, global_weights: Sequence[np.ndarray] | None,
              max_seconds: float | None) -> RoundOutcome:
        """Train as the task says from `global_weights` (None: the model's initial weights, which the driver keeps
        in `model`), within `max_seconds`, and encode the update; a device with no data sends a zero update."""
        work = self.task.work
        if data.num_examples == 0:
            result = LocalResult([np.zeros_like(w) for w in global_weights or model.get_weights()], 0,
                                 {name: 0.0 for name in model.manifest.metrics.variables}, 0, 0.0, False)
        else:
            proximal_mu = work.proximal_mu
            if proximal_mu is None and model.manifest.proximal:
                proximal_mu = 0.0  # an interpreter reused across rounds may hold an earlier task's mu
            result = train_locally(
                model, data, epochs=work.epochs, max_steps=work.max_steps, max_seconds=max_seconds,
                shuffle_seed=None if self.task.seed is None else device_shuffle_seed(self.task.seed, self.device_id),
                learning_rate=model.manifest.optimizer.learning_rate if work.learning_rate is None
                else work.learning_rate,
                initial_weights=global_weights, proximal_mu=proximal_mu)
        update = ModelUpdate(fleet=self.fleet, round=self.task.round, device_id=self.device_id,
                             update_id=uuid.uuid4().hex, model_hash=self.task.model_hash,
                             num_examples=result.num_examples, metrics=result.metrics, tensors=result.delta,
                             run_id=self.task.run_id)
        return RoundOutcome(update, encode_update(update, work.encoding, work.topk), result)
