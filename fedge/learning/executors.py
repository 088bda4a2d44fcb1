"""Where client work runs: the Executor interface and the in-process executor.

An executor is the distributor and transport of a federated process: it turns the round's
`federated_data` into its clients (`prepare`), hands the artifact and the round's global
weights to them, has them train (or evaluate) and yields their results as they are accepted.
The in-process executor runs each client through the same `.tflite` the devices run, with
device_runtime, in parallel worker processes, and yields in CLIENT ORDER, so aggregation
never depends on which client finished first; the MQTT executor (fedge.server) sends the
round to devices and yields their updates as they arrive.

Shuffle seeds are derived alike everywhere: a round seed from (process seed, round), then each
client's seed from (round seed, client id) with the device agent's own `device_shuffle_seed`;
the MQTT task carries the round seed. So the same clients, seeds and data train identically
in-process and on devices.
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from device_runtime.agent import device_shuffle_seed
from device_runtime.artifact import read_manifest
from device_runtime.interpreter import default_num_threads
from device_runtime.protocol import decode_update, encode_weights
from fedge._client_worker import SIMULATION_FLEET, ClientTask, client_id, evaluate_client, train_client
from fedge.learning.federated_data import LocalClient, local_clients

_Result = TypeVar("_Result")


@dataclass(frozen=True)
class TrainConfig:
    """How clients train in one round; `seed` None trains in-process clients on their examples in order.

    `learning_rate` None keeps the artifact's client learning rate.
    """

    round_num: int
    epochs: int = 1
    max_steps: int | None = None
    proximal_mu: float | None = None
    seed: int | None = 0
    learning_rate: float | None = None


@dataclass
class ClientUpdate:
    """One client's round result as the server receives it: delta (manifest order), examples, metric sums, bytes."""

    delta: list[np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    bytes_down: int
    bytes_up: int


class RoundFailedError(Exception):
    """A round that cannot be aggregated (e.g. too few reports before the deadline); `report` says what happened."""

    def __init__(self, message: str, report: Mapping[str, Any]) -> None:
        """Keep the executor's round report (measurements, drop counters) for the round's metrics."""
        super().__init__(message)
        self.report = dict(report)


def round_seed(seed: int | None, round_num: int) -> int | None:
    """The seed of one round (what an MQTT task carries), a 63-bit integer derived from (process seed, round)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, round_num]).generate_state(1, np.uint64)[0]) >> 1


def client_shuffle_seed(seed: int | None, round_num: int, client_id: str) -> int | None:
    """The shuffle seed of one client in one round: the device's derivation from the round seed and its id."""
    task_seed = round_seed(seed, round_num)
    return None if task_seed is None else device_shuffle_seed(task_seed, client_id)


class Executor(abc.ABC):
    """Runs client work: `prepare` the round's clients, then `train` or `evaluate` them.

    `train` yields one ClientUpdate per accepted client and may return (as a generator's return
    value) a dict of measurements that the process adds to the round's "distributor" metrics;
    it raises RoundFailedError when the round cannot be aggregated.
    """

    def prepare(self, federated_data: Iterable[Any], manifest: Mapping[str, Any]) -> Sequence[Any]:
        """The round's clients, checked before any trains: by default client datasets, checked against the manifest."""
        return local_clients(federated_data, manifest)

    @abc.abstractmethod
    def train(self, artifact: bytes, weights: Sequence[np.ndarray], clients: Sequence[Any],
              config: TrainConfig) -> Iterator[ClientUpdate]:
        """Each prepared client trains from `weights` (every weight, manifest order)."""

    @abc.abstractmethod
    def evaluate(self, artifact: bytes, weights: Sequence[np.ndarray],
                 clients: Sequence[Any]) -> Iterator[dict[str, float]]:
        """Each prepared client's unfinalized metrics of `weights`."""


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

    def train(self, artifact: bytes, weights: Sequence[np.ndarray], clients: Sequence[LocalClient],
              config: TrainConfig) -> Iterator[ClientUpdate]:
        """Train every client in parallel; yield their decoded updates in client order."""
        with self._distributed(artifact, weights, config.round_num) as (manifest, artifact_path, weights_path, size):
            tasks = (ClientTask(artifact_path, weights_path, index, config.round_num, client.x, client.y,
                                config.epochs, config.max_steps,
                                client_shuffle_seed(config.seed, config.round_num, client.client_id),
                                config.proximal_mu, config.learning_rate)
                     for index, client in enumerate(clients))
            for index, payload in enumerate(self._ordered(train_client, tasks)):
                update = decode_update(payload, manifest, fleet=SIMULATION_FLEET, device_id=client_id(index))
                yield ClientUpdate(update.tensors, update.num_examples, update.metrics, size, len(payload))

    def evaluate(self, artifact: bytes, weights: Sequence[np.ndarray],
                 clients: Sequence[LocalClient]) -> Iterator[dict[str, float]]:
        """Evaluate every client in parallel; yield their unfinalized metrics in client order."""
        with self._distributed(artifact, weights, 0) as (_, artifact_path, weights_path, _):
            tasks = (ClientTask(artifact_path, weights_path, index, 0, client.x, client.y)
                     for index, client in enumerate(clients))
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
