"""Shared training for a whole fleet: a few worker threads, each holding one interpreter per artifact.

An emulated device does not own an interpreter: when it is selected it hands its data, its
task and its starting weights to the pool, and whichever worker is free trains on its behalf
with `device_runtime.train_locally`, restoring everything a fresh interpreter would have
(weights, learning rate, optimizer slots, metrics), so the delta is the one the device would
compute alone. The interpreter releases the GIL while it runs, so workers train in parallel.
Artifacts (verified once) and decoded global weights are shared, not held per device.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from device_runtime.data import LocalData
from device_runtime.model import TrainableModel
from device_runtime.model_cache import DEFAULT_MAX_MODELS
from device_runtime.protocol import Task, decode_weights, payload_hash
from device_runtime.rounds import checked_model, proximal_strength, round_update
from device_runtime.training import LocalResult, train_locally

_WEIGHTS_KEPT = 2
_T = TypeVar("_T")


@dataclass
class _Loaded:
    """An artifact in one worker's interpreter, with what a fresh interpreter would start from."""

    model: TrainableModel
    initial_weights: list[np.ndarray]
    learning_rate: float


class TrainerPool:
    """Worker threads that train, verify and decode on behalf of any emulated device."""

    def __init__(self, workers: int) -> None:
        """Start `workers` threads (each runs its interpreters on one thread)."""
        self.workers = workers
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="fedge-sim-worker")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._artifacts: OrderedDict[str, bytes] = OrderedDict()
        self._weights: OrderedDict[str, list[np.ndarray]] = OrderedDict()

    def has_model(self, model_hash: str) -> bool:
        """Whether the verified artifact with this hash is held."""
        with self._lock:
            return model_hash in self._artifacts

    async def add_model(self, payload: bytes, task: Task) -> None:
        """Verify a fetched artifact against the task (ArtifactError if refused) and keep it."""
        await self._run(checked_model, payload, task)
        with self._lock:
            self._artifacts[task.model_hash] = payload
            self._artifacts.move_to_end(task.model_hash)
            while len(self._artifacts) > DEFAULT_MAX_MODELS:
                self._artifacts.popitem(last=False)

    async def is_payload(self, payload: bytes, expected_hash: str) -> bool:
        """Whether `payload` hashes to `expected_hash` (the task's weights_hash)."""
        return await self._run(lambda: payload_hash(payload) == expected_hash)

    async def global_weights(self, payload: bytes, task: Task, fleet: str) -> list[np.ndarray]:
        """The tensors of a verified global-weights payload, decoded once for the whole fleet (ProtocolError if bad)."""
        return await self._run(self._decoded_weights, payload, task, fleet)

    async def train(self, device_id: str, fleet: str, data: LocalData, task: Task, shuffle_seed: int,
                    initial_weights: Sequence[np.ndarray] | None, max_seconds: float) -> tuple[LocalResult, bytes]:
        """Train one device's round on a free worker; its LocalResult and encoded update payload."""
        return await self._run(self._train, device_id, fleet, data, task, shuffle_seed, initial_weights, max_seconds)

    def close(self) -> None:
        """Stop the workers (a job in progress finishes first)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        """`function(*args)` on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _decoded_weights(self, payload: bytes, task: Task, fleet: str) -> list[np.ndarray]:
        """Decode (or reuse) the global weights named by task.weights_hash, with the artifact's manifest."""
        with self._lock:
            if task.weights_hash in self._weights:
                return self._weights[task.weights_hash]
        tensors = decode_weights(payload, self._loaded(task.model_hash).model.manifest, fleet=fleet).tensors
        with self._lock:
            self._weights[task.weights_hash] = tensors
            while len(self._weights) > _WEIGHTS_KEPT:
                self._weights.popitem(last=False)
        return tensors

    def _train(self, device_id: str, fleet: str, data: LocalData, task: Task, shuffle_seed: int,
               initial_weights: Sequence[np.ndarray] | None, max_seconds: float) -> tuple[LocalResult, bytes]:
        """Worker body: train from the given (or the artifact's) weights and learning rate, then encode the update."""
        loaded = self._loaded(task.model_hash)
        result = train_locally(loaded.model, data, epochs=task.epochs, shuffle_seed=shuffle_seed,
                               max_steps=task.max_steps, max_seconds=max_seconds,
                               learning_rate=loaded.learning_rate if task.learning_rate is None else task.learning_rate,
                               initial_weights=loaded.initial_weights if initial_weights is None else initial_weights,
                               proximal_mu=proximal_strength(task.proximal_mu, loaded.model.manifest))
        _, payload = round_update(fleet, device_id, task, result)
        return result, payload

    def _loaded(self, model_hash: str) -> _Loaded:
        """This worker's interpreter for an artifact, created on first use (the few most recent are kept)."""
        models: OrderedDict[str, _Loaded] = self._local.__dict__.setdefault("models", OrderedDict())
        if model_hash not in models:
            with self._lock:
                artifact = self._artifacts[model_hash]
            model = TrainableModel(artifact, num_threads=1, verify=False)  # verified by add_model
            learning_rate = float(model.manifest["optimizer"]["learning_rate"])
            models[model_hash] = _Loaded(model, model.get_weights(), learning_rate)
            while len(models) > DEFAULT_MAX_MODELS:
                models.popitem(last=False)
        models.move_to_end(model_hash)
        return models[model_hash]
