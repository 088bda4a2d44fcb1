"""Shared training for a whole fleet: a few worker threads, each holding one interpreter per artifact.

An emulated device does not own an interpreter: when it is selected it hands its data, its
task and its starting weights to the pool, and whichever worker is free trains on its behalf
with the device's `DeviceRound`, restoring everything a fresh interpreter would have
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
from device_runtime.rounds import DeviceRound, Fetch, RoundOutcome

_WEIGHTS_KEPT = 2
_T = TypeVar("_T")


@dataclass
class _Loaded:
    """An artifact in one worker's interpreter, with the weights a fresh interpreter would start from."""

    model: TrainableModel
    initial_weights: list[np.ndarray]


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

    async def add_model(self, payload: bytes, device_round: DeviceRound) -> None:
        """Verify a fetched artifact against the round's task (ArtifactError if refused) and keep it."""
        await self._run(device_round.check_model, payload)
        model_hash = device_round.task.model_hash
        with self._lock:
            self._artifacts[model_hash] = payload
            self._artifacts.move_to_end(model_hash)
            while len(self._artifacts) > DEFAULT_MAX_MODELS:
                self._artifacts.popitem(last=False)

    async def matches(self, fetch: Fetch, payload: bytes) -> bool:
        """Whether `payload` is the one `fetch` awaits (hashing a large payload off the loop thread)."""
        return await self._run(fetch.matches, payload)

    async def global_weights(self, payload: bytes, device_round: DeviceRound) -> list[np.ndarray]:
        """The round's global weights, decoded once for the whole fleet (ProtocolError if refused)."""
        return await self._run(self._decoded_weights, payload, device_round)

    async def train(self, device_round: DeviceRound, data: LocalData, initial_weights: Sequence[np.ndarray] | None,
                    max_seconds: float | None) -> RoundOutcome:
        """Train one device's round on a free worker; its outcome (the update payload and what training measured)."""
        return await self._run(self._train, device_round, data, initial_weights, max_seconds)

    def close(self) -> None:
        """Stop the workers (a job in progress finishes first)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _run(self, function: Callable[..., _T], *args: Any) -> _T:
        """`function(*args)` on a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _decoded_weights(self, payload: bytes, device_round: DeviceRound) -> list[np.ndarray]:
        """Decode (or reuse) the global weights named by the task's weights_hash, with the artifact's manifest."""
        weights_hash = device_round.task.weights_hash
        with self._lock:
            if weights_hash in self._weights:
                return self._weights[weights_hash]
        tensors = device_round.global_weights(payload, self._loaded(device_round.task.model_hash).model)
        with self._lock:
            self._weights[weights_hash] = tensors
            while len(self._weights) > _WEIGHTS_KEPT:
                self._weights.popitem(last=False)
        return tensors

    def _train(self, device_round: DeviceRound, data: LocalData, initial_weights: Sequence[np.ndarray] | None,
               max_seconds: float | None) -> RoundOutcome:
        """Worker body: the device's round on this worker's interpreter, from the given (or the artifact's) weights."""
        loaded = self._loaded(device_round.task.model_hash)
        return device_round.train(loaded.model, data, loaded.initial_weights if initial_weights is None
                                  else initial_weights, max_seconds)

    def _loaded(self, model_hash: str) -> _Loaded:
        """This worker's interpreter for an artifact, created on first use (the few most recent are kept)."""
        models: OrderedDict[str, _Loaded] = self._local.__dict__.setdefault("models", OrderedDict())
        if model_hash not in models:
            with self._lock:
                artifact = self._artifacts[model_hash]
            model = TrainableModel(artifact, num_threads=1, verify=False)  # verified by add_model
            models[model_hash] = _Loaded(model, model.get_weights())
            while len(models) > DEFAULT_MAX_MODELS:
                models.popitem(last=False)
        models.move_to_end(model_hash)
        return models[model_hash]
