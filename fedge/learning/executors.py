"""Where client work runs: the Executor interface and the in-process executor.

An executor is the distributor and transport of a federated process: it turns the round's
`federated_data` into its clients (`prepare`), hands the artifact and the round's global
weights to them, has them train (or evaluate) and yields their results as they are accepted.
The in-process executor runs each client through the same `.tflite` the devices run, with
device_runtime, in parallel worker processes, and yields in CLIENT ORDER, so aggregation
never depends on which client finished first; the MQTT executor (fedge.server) sends the
round to devices and yields their updates as they arrive.

Both train from a `RoundConfig` (device_runtime.protocol): the in-process executor hands it to
every worker inside a `Task`, as the MQTT executor hands it to devices, and every client runs
the device's own `DeviceRound`; each derives its shuffle seed from the round's seed and its id.
So the same clients, seeds and data train identically in-process and on devices.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import hashlib
import math
import os
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

from device_runtime.artifact import Artifact
from device_runtime.interpreter import default_num_threads
from device_runtime.manifest import Manifest
from device_runtime.protocol import (ClientWork, ProtocolError, RoundConfig, Task, check_id, decode_update,
                                     encode_weights, payload_hash)
from fedge._client_worker import SIMULATION_FLEET, ClientTask, evaluate_client, train_client
from fedge.learning.federated_data import LocalClient, local_clients

_Result = TypeVar("_Result")
IN_PROCESS_RUN = "in-process"  # the run id of the tasks in-process clients train (no device remembers it)


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


class RoundInterruptedError(Exception):
    """The round in progress was abandoned because the server is stopping (FleetExecutor.interrupt)."""


def round_seed(seed: int | None, round_num: int) -> int | None:
    """The seed of one round (what an MQTT task carries), a 63-bit integer derived from (process seed, round)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([seed, round_num]).generate_state(1, np.uint64)[0]) >> 1


class Executor(abc.ABC):
    """Runs client work: `prepare` the round's clients, then `train` or `evaluate` them.

    `train` yields one ClientUpdate per accepted client and may return (as a generator's return
    value) a dict of measurements that the process adds to the round's "distributor" metrics;
    it raises RoundFailedError when the round cannot be aggregated.
    """

    def prepare(self, federated_data: Iterable[Any], manifest: Manifest) -> Sequence[Any]:
        """The round's clients, checked before any trains: by default client datasets, checked against the manifest."""
        return local_clients(federated_data, manifest)

    @abc.abstractmethod
    def train(self, artifact: Artifact, weights: Sequence[np.ndarray], clients: Sequence[Any],
              config: RoundConfig) -> Iterator[ClientUpdate]:
        """Each prepared client trains from `weights` (every weight, manifest order) as `config` says."""

    @abc.abstractmethod
    def evaluate(self, artifact: Artifact, weights: Sequence[np.ndarray],
                 clients: Sequence[Any]) -> Iterator[dict[str, float]]:
        """Each prepared client's unfinalized metrics of `weights`."""


class FleetExecutor(Executor):
    """An executor whose clients are a live fleet of devices that check in: what a FederatedServer drives.

    A round's `federated_data` is the list of selected device ids. Besides training, such an
    executor says who is available, selects with over-selection, keeps a job's run id, may
    journal updates so a killed server loses none, and can be interrupted by a stopping server.
    """

    run_id: str  # the job's id, in every task (devices train each (run_id, round) once)
    min_reports: int  # a round with fewer accepted reports fails

    @abc.abstractmethod
    def start(self) -> None:
        """Connect to the fleet; ConnectionError when it cannot be reached."""

    @abc.abstractmethod
    def close(self) -> None:
        """Disconnect for good."""

    @abc.abstractmethod
    def wait_for_devices(self, timeout: float) -> list[str]:
        """The available devices once enough to select a round from are there, or what is available at `timeout`."""

    @abc.abstractmethod
    def select(self, seed: int | None, round_num: int) -> list[str]:
        """The devices to ask for round `round_num`, drawn with the round's seed."""

    @abc.abstractmethod
    def interrupt(self) -> None:
        """Abandon the round in progress and any wait, soon (the server is stopping)."""

    def use_journal(self, path: str | os.PathLike[str]) -> None:
        """Journal every accepted update to `path` before acknowledging it, replaying a killed run's (default: none)."""

    def checkpointed(self) -> None:
        """The round just ended is checkpointed: its journal is no longer needed (default: nothing to do)."""

    def __enter__(self) -> FleetExecutor:
        """Connect, as a context manager that closes the executor."""
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Close the executor."""
        self.close()


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

    def train(self, artifact: Artifact, weights: Sequence[np.ndarray], clients: Sequence[LocalClient],
              config: RoundConfig) -> Iterator[ClientUpdate]:
        """Train every client in parallel; yield their decoded updates in client order."""
        with self._distributed(artifact, weights, config.round) as (artifact_path, weights_path, payload):
            task = Task(IN_PROCESS_RUN, config, artifact.content_hash, payload_hash(payload), math.inf)
            device_ids = [_device_id(index, client) for index, client in enumerate(clients)]
            tasks = (ClientTask(artifact_path, weights_path, task, device_id, client.x, client.y)
                     for device_id, client in zip(device_ids, clients))
            for device_id, update_payload in zip(device_ids, self._ordered(train_client, tasks)):
                update = decode_update(update_payload, artifact.manifest, fleet=SIMULATION_FLEET, device_id=device_id)
                yield ClientUpdate(update.tensors, update.num_examples, update.metrics, len(payload),
                                   len(update_payload))

    def evaluate(self, artifact: Artifact, weights: Sequence[np.ndarray],
                 clients: Sequence[LocalClient]) -> Iterator[dict[str, float]]:
        """Evaluate every client in parallel; yield their unfinalized metrics in client order."""
        with self._distributed(artifact, weights, 0) as (artifact_path, weights_path, payload):
            task = Task(IN_PROCESS_RUN, RoundConfig(0, None, ClientWork()), artifact.content_hash,
                        payload_hash(payload), math.inf)
            tasks = (ClientTask(artifact_path, weights_path, task, _device_id(index, client), client.x, client.y)
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
    def _distributed(self, artifact: Artifact, weights: Sequence[np.ndarray],
                     round_num: int) -> Iterator[tuple[str, str, bytes]]:
        """Artifact and weights payload as files for the workers: (their paths, the payload); weights for one round."""
        manifest = artifact.manifest
        payload = encode_weights(SIMULATION_FLEET, round_num, manifest.content_hash, list(weights),
                                 manifest.metrics.variables, run_id=IN_PROCESS_RUN)
        artifact_path = self._file(manifest.content_hash.hex + ".tflite", artifact.tflite_bytes)
        weights_path = self._file(f"weights-{hashlib.sha256(payload).hexdigest()}.bin", payload)
        try:
            yield artifact_path, weights_path, payload
        finally:
            Path(weights_path).unlink(missing_ok=True)

    def _ordered(self, work: Callable[[ClientTask], _Result], tasks: Iterable[ClientTask]) -> Iterator[_Result]:
        """Results of `work` on every task, in task order, with at most 2 * num_workers tasks in flight."""
        if self.num_workers == 0:
            for index, task in enumerate(tasks):
                yield _client_result(index, lambda: work(task))
            return
        pool = self._started_pool()
        pending: collections.deque[tuple[int, Any]] = collections.deque()
        for index, task in enumerate(tasks):
            pending.append((index, pool.apply_async(work, (task,))))
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


def _device_id(index: int, client: LocalClient) -> str:
    """The device id a client trains as: its client id when that is a valid device id, else client-<index>."""
    try:
        return check_id(client.client_id)
    except ProtocolError:
        return f"client-{index}"


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
