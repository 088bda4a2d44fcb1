"""Where client work runs: the Executor interface and the in-process executor.

An executor is the distributor and transport of a federated process: it hands the artifact
and the round's global weights to the clients, has them train (or evaluate) and yields their
results in CLIENT ORDER, so aggregation never depends on which client finished first. The
in-process executor runs each client through the same `.tflite` the devices run, with
device_runtime, in parallel worker processes; an MQTT executor plugs into the same interface.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import hashlib
import multiprocessing
import sys
import tempfile
import types
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from device_runtime.artifact import read_manifest
from device_runtime.interpreter import default_num_threads
from device_runtime.protocol import decode_update, encode_weights
from fedge._client_worker import SIMULATION_FLEET, ClientTask, client_id, evaluate_client, train_client

ClientArrays = tuple[np.ndarray, np.ndarray]
_Result = TypeVar("_Result")


@dataclass(frozen=True)
class TrainConfig:
    """How clients train in one round; `seed` None trains on every client's examples in their order."""

    round_num: int
    epochs: int = 1
    max_steps: int | None = None
    proximal_mu: float | None = None
    seed: int | None = 0


@dataclass
class ClientUpdate:
    """One client's round result as the server receives it: delta (manifest order), examples, metric sums, bytes."""

    delta: list[np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    bytes_down: int
    bytes_up: int


def client_shuffle_seed(seed: int | None, round_num: int, client_index: int) -> int | None:
    """The shuffle seed of one client in one round, derived from (process seed, round, client index)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, round_num, client_index]).generate_state(1)[0])


class Executor(abc.ABC):
    """Runs client work; results come back in client order."""

    @abc.abstractmethod
    def train(self, artifact: bytes, weights: Sequence[np.ndarray], clients: Sequence[ClientArrays],
              config: TrainConfig) -> Iterator[ClientUpdate]:
        """Each client trains from `weights` (every weight, manifest order) on its checked (x, y)."""

    @abc.abstractmethod
    def evaluate(self, artifact: bytes, weights: Sequence[np.ndarray],
                 clients: Sequence[ClientArrays]) -> Iterator[dict[str, float]]:
        """Each client's unfinalized metrics of `weights` on its checked (x, y)."""


class InProcessExecutor(Executor):
    """Clients run the artifact with device_runtime in `num_workers` worker processes (0: in this process).

    Workers are started once, with the 'spawn' method (this process has TensorFlow loaded, so
    forking it is unsafe) and import only device_runtime; each loads an artifact once and runs
    its interpreter on one thread. The artifact and each round's weights payload are written to
    a private temporary folder, named by hash, and read by the workers, as devices fetch them
    by hash; client deltas come back as the float32 FlatBuffers updates devices publish and are
    decoded with the server's checks, so `bytes_up` and `bytes_down` are real payload sizes.
    """

    def __init__(self, num_workers: int | None = None) -> None:
        """`num_workers` None uses one worker per available core; 0 runs clients inline (debugging, tests)."""
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                        or num_workers < 0):
            raise ValueError(f"num_workers must be an integer >= 0 or None, got {num_workers!r}")
        self.num_workers = default_num_threads() if num_workers is None else num_workers
        self._folder = tempfile.TemporaryDirectory(prefix="fedge-executor-")
        self._pool: Any = None

    def train(self, artifact: bytes, weights: Sequence[np.ndarray], clients: Sequence[ClientArrays],
              config: TrainConfig) -> Iterator[ClientUpdate]:
        """Train every client in parallel; yield their decoded updates in client order."""
        with self._distributed(artifact, weights, config.round_num) as (manifest, artifact_path, weights_path, size):
            tasks = (ClientTask(artifact_path, weights_path, index, config.round_num, x, y, config.epochs,
                                config.max_steps, client_shuffle_seed(config.seed, config.round_num, index),
                                config.proximal_mu)
                     for index, (x, y) in enumerate(clients))
            for index, payload in enumerate(self._ordered(train_client, tasks)):
                update = decode_update(payload, manifest, fleet=SIMULATION_FLEET, device_id=client_id(index))
                yield ClientUpdate(update.tensors, update.num_examples, update.metrics, size, len(payload))

    def evaluate(self, artifact: bytes, weights: Sequence[np.ndarray],
                 clients: Sequence[ClientArrays]) -> Iterator[dict[str, float]]:
        """Evaluate every client in parallel; yield their unfinalized metrics in client order."""
        with self._distributed(artifact, weights, 0) as (_, artifact_path, weights_path, _):
            tasks = (ClientTask(artifact_path, weights_path, index, 0, x, y) for index, (x, y) in enumerate(clients))
            yield from self._ordered(evaluate_client, tasks)

    def close(self) -> None:
        """Stop the workers and delete the temporary folder."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        self._folder.cleanup()

    def __enter__(self) -> InProcessExecutor:
        """Use as a context manager that closes the executor."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the executor."""
        self.close()

    def _file(self, name: str, content: bytes) -> str:
        """Path of `content` in the private folder, written once under a name derived from its hash."""
        path = Path(self._folder.name) / name
        if not path.exists():
            temp = path.with_suffix(".tmp")
            temp.write_bytes(content)
            temp.replace(path)
        return str(path)

    @contextlib.contextmanager
    def _distributed(self, artifact: bytes, weights: Sequence[np.ndarray],
                     round_num: int) -> Iterator[tuple[dict[str, Any], str, str, int]]:
        """Artifact and weights payload as files for the workers: (manifest, paths, payload size); weights for one round."""
        manifest = read_manifest(artifact)
        payload = encode_weights(SIMULATION_FLEET, round_num, manifest["content_hash"], list(weights),
                                 manifest["metrics"]["variables"])
        artifact_path = self._file(manifest["content_hash"].removeprefix("sha256:") + ".tflite", artifact)
        weights_path = self._file(f"weights-{hashlib.sha256(payload).hexdigest()}.bin", payload)
        try:
            yield manifest, artifact_path, weights_path, len(payload)
        finally:
            Path(weights_path).unlink(missing_ok=True)

    def _ordered(self, work: Callable[[ClientTask], _Result], tasks: Iterable[ClientTask]) -> Iterator[_Result]:
        """Results of `work` on every task, in task order, with at most 2 * num_workers tasks in flight."""
        if self.num_workers == 0:
            for task in tasks:
                yield _client_result(task.client_index, lambda: work(task))
            return
        pool = self._started_pool()
        pending: collections.deque[tuple[int, Any]] = collections.deque()
        for task in tasks:
            pending.append((task.client_index, pool.apply_async(work, (task,))))
            if len(pending) >= 2 * self.num_workers:
                index, result = pending.popleft()
                yield _client_result(index, result.get)
        while pending:
            index, result = pending.popleft()
            yield _client_result(index, result.get)

    def _started_pool(self) -> Any:
        """The worker pool, started on first use."""
        if self._pool is None:
            with _workers_without_main_module():
                self._pool = multiprocessing.get_context("spawn").Pool(self.num_workers)
            weakref.finalize(self, self._pool.terminate)  # an executor dropped unclosed stops its workers
        return self._pool


def _client_result(index: int, get: Callable[[], _Result]) -> _Result:
    """`get()`, with any error re-raised as a RuntimeError naming the client."""
    try:
        return get()
    except Exception as error:
        raise RuntimeError(f"client {index} failed: {type(error).__name__}: {error}") from error


@contextlib.contextmanager
def _workers_without_main_module() -> Iterator[None]:
    """Start processes that skip re-running the caller's main script, which spawn does by default.

    A user's script usually imports TensorFlow at the top; re-running it in every worker would
    load TensorFlow there too. Workers need nothing from it: their work lives in fedge._client_worker.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


_default_executor: Executor | None = None


def set_default_executor(executor: Executor | None) -> None:
    """Make `executor` the one processes use when built without one (None: back to an in-process executor)."""
    global _default_executor
    _default_executor = executor


def get_default_executor() -> Executor:
    """The default executor; an InProcessExecutor with one worker per core unless set otherwise."""
    global _default_executor
    if _default_executor is None:
        _default_executor = InProcessExecutor()
    return _default_executor
