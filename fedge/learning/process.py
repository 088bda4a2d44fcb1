"""Federated learning processes in TFF's shape: FedAvg (with any server optimizer) and FedProx.

A round is composed of TFF's four parts (its `compose_learning_process`), each replaceable:
the distributor and the client work run in an Executor (global weights out, client updates
back: in-process in client order, over MQTT as devices report), the aggregator (by default a
streaming weighted mean; fedge.learning.aggregation) combines client deltas while client
metrics are summed then finalized, and the finalizer is a server optimizer step;
`aggregate_round` does the last two for every executor. FedProx is FedAvg with a different
client work (the proximal term); FedAdam, FedYogi, ... a different finalizer; DP-FedAvg or a
robust median a different aggregator.

Trainable weights move by the server optimizer's step on the aggregated (by default the
weighted mean) delta. Non-trainable weights (batch-norm moving statistics) become the
aggregate of the clients' final values (by default their weighted mean), so batch norm's
statistics follow the clients' data; TFF keeps them unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from device_runtime import TrainableModel
from device_runtime.artifact import Artifact
from device_runtime.manifest import Manifest
from fedge.learning import optimizers
from fedge.learning.aggregation import Aggregator, ClientWeighting, MeanAggregator
from device_runtime.protocol import ClientWork, RoundConfig
from fedge.learning.executors import ClientUpdate, Executor, RoundFailedError, get_default_executor, round_seed
from fedge.learning.lowering import lower_model_fn
from fedge.learning.metrics import sum_then_finalize
from fedge.learning.state import MAX_WEIGHT_MAGNITUDE, LearningProcessState, ModelWeights, is_sane
from fedge.templates import IterativeProcess

Metrics = dict[str, dict[str, Any]]
logger = logging.getLogger(__name__)


class LearningProcess(IterativeProcess):
    """An IterativeProcess over LearningProcessState whose `next(state, federated_data)` runs one round.

    `artifact` is the trainable .tflite every client runs (what devices get); `next` returns
    (state, metrics) with metrics in TFF's structure: distributor, client_work, aggregator, finalizer.
    """

    def __init__(self, artifact: Artifact, client_work: ClientWork, client_weighting: ClientWeighting,
                 server_optimizer: optimizers.ServerOptimizer, executor: Executor | None,
                 model_aggregator: Aggregator | None = None, *, seed: int | None = 0) -> None:
        """Compose a process from its parts; `executor` None uses the default executor at each round,
        `model_aggregator` None the weighted mean (MeanAggregator). `seed` derives every round's seed
        (clients' shuffling); None trains every client on its examples in their given order."""
        if not isinstance(client_work, ClientWork):
            raise TypeError(f"client_work must be a ClientWork, got {type(client_work).__name__}")
        if client_work.proximal_mu is not None and not artifact.manifest.proximal:
            raise ValueError(f"FedProx's proximal_mu needs an artifact converted with its proximal term "
                             f"(proximal=True, or a job whose process.algorithm is fedprox); "
                             f"{artifact.manifest.model_name} {artifact.content_hash} has none")
        if seed is not None:
            _check_int("seed", seed, 0)
        if not isinstance(client_weighting, ClientWeighting):
            raise TypeError(f"client_weighting must be a ClientWeighting, got {client_weighting!r}")
        model_aggregator = MeanAggregator() if model_aggregator is None else model_aggregator
        if not isinstance(model_aggregator, Aggregator):
            raise TypeError(f"model_aggregator must be a fedge.learning.aggregation.Aggregator, "
                            f"got {type(model_aggregator).__name__}")
        if not isinstance(server_optimizer, optimizers.ServerOptimizer):
            raise TypeError(f"server_optimizer_fn must return a fedge.learning.optimizers optimizer, "
                            f"got {type(server_optimizer).__name__}")
        super().__init__(self._initialize, self._next)
        self._artifact = artifact
        self._client_work = client_work
        self._seed = seed
        self._weighting = client_weighting
        self._server_optimizer = server_optimizer
        self._executor = executor
        self._aggregator = model_aggregator
        initial = TrainableModel(artifact.tflite_bytes, num_threads=1).get_weights()
        self._initial_weights = ModelWeights.from_list(artifact.manifest, initial)

    @property
    def artifact(self) -> Artifact:
        """The trainable artifact (bytes and manifest) every client runs."""
        return self._artifact

    @property
    def client_work(self) -> ClientWork:
        """What every client does in a round."""
        return self._client_work

    def round_config(self, round_num: int) -> RoundConfig:
        """The configuration of round `round_num`: its seed derived from the process seed, the client work."""
        return RoundConfig(round_num, round_seed(self._seed, round_num), self._client_work)

    def get_model_weights(self, state: LearningProcessState) -> ModelWeights:
        """The global model weights of `state`."""
        return state.global_model_weights

    def set_model_weights(self, state: LearningProcessState, model_weights: ModelWeights) -> LearningProcessState:
        """`state` with other global model weights (shapes checked against the artifact)."""
        return replace(state, global_model_weights=model_weights.for_manifest(self._artifact.manifest))

    def _initialize(self) -> LearningProcessState:
        """Round 0: (copies of) the model's initial weights and a fresh server optimizer state."""
        initial = self._initial_weights
        weights = ModelWeights([w.copy() for w in initial.trainable], [w.copy() for w in initial.non_trainable],
                               initial.trainable_mask)
        return LearningProcessState(weights, self._server_optimizer.initialize(weights.trainable), 0)

    def _next(self, state: LearningProcessState,
              federated_data: Iterable[Any]) -> tuple[LearningProcessState, Metrics]:
        """One round: the executor checks its clients and trains them; their updates are aggregated; server step."""
        manifest = self._artifact.manifest
        executor = self._executor if self._executor is not None else get_default_executor()
        clients = executor.prepare(federated_data, manifest)
        weights = state.global_model_weights.for_manifest(manifest)
        self.check_state(state)
        updates = executor.train(self._artifact, weights.to_list(), clients, self.round_config(state.round_num))
        return aggregate_round(state, weights, iter(updates), manifest, self._weighting,
                               self._server_optimizer, self._aggregator)

    def check_state(self, state: LearningProcessState) -> None:
        """ValueError if `state` holds another optimizer's slots (e.g. a state saved by another process)."""
        needed = sorted(self._server_optimizer.initialize([]))
        if sorted(state.server_optimizer_state) != needed:
            raise ValueError(f"the state's server optimizer state has slots {sorted(state.server_optimizer_state)}; "
                             f"{type(self._server_optimizer).__name__} needs {needed}")


class _RoundSums:
    """What one round aggregates: the model aggregator's round, metric sums, payload bytes."""

    def __init__(self, finalizers: Mapping[str, Sequence[str]], weighting: ClientWeighting, aggregator: Aggregator,
                 round_num: int) -> None:
        """Empty sums."""
        self.finalizers, self.weighting = finalizers, weighting
        self.aggregator, self.round_num = aggregator, round_num
        self.bytes_down = self.bytes_up = 0
        self.discard()

    def discard(self) -> None:
        """Forget the deltas and metrics summed so far (a failed round); the byte counts stay, as traffic happened."""
        self.deltas, self.train_metrics = self.aggregator.start(self.round_num), sum_then_finalize(self.finalizers)

    def add(self, update: ClientUpdate) -> None:
        """Fold one client's update in at once; only an aggregator that needs them all (median, ...) keeps its delta."""
        self.deltas.add(update.delta, self.weighting.weight(update.num_examples))
        self.train_metrics.add(update.metrics)
        self.bytes_down += update.bytes_down
        self.bytes_up += update.bytes_up

    def consume(self, updates: Iterator[ClientUpdate]) -> dict[str, Any]:
        """Add every update; returns the executor's round report (the generator's return value, if any)."""
        while True:
            try:
                update = next(updates)
            except StopIteration as stop:
                return dict(stop.value or {})
            self.add(update)


def aggregate_round(state: LearningProcessState, weights: ModelWeights, updates: Iterator[ClientUpdate],
                    manifest: Manifest, weighting: ClientWeighting,
                    server_optimizer: optimizers.ServerOptimizer, model_aggregator: Aggregator | None = None
                    ) -> tuple[LearningProcessState, Metrics]:
    """The aggregator and finalizer of one round, for any executor: fold in updates as they come, then the server step.

    With the default weighted mean (`model_aggregator` None) memory is O(model): each update is
    added to running sums as it arrives and then dropped; the median and trimmed mean hold them all.
    A RoundFailedError from the executor discards what was summed: the weights and optimizer
    state stay as they were and the round id is spent (state.round_num + 1).
    """
    aggregator = MeanAggregator() if model_aggregator is None else model_aggregator
    sums = _RoundSums(manifest.metrics.finalizers, weighting, aggregator, state.round_num)
    try:
        report = sums.consume(updates)
    except RoundFailedError as failure:
        logger.warning("round %d failed: %s; the weights and server optimizer state stay unchanged",
                       state.round_num, failure)
        sums.discard()
        report = failure.report
    new_weights, optimizer_state, update_norm = _server_step(state, weights, sums.deltas.result(), manifest,
                                                             server_optimizer)
    if not is_sane(new_weights, optimizer_state):  # e.g. huge finite deltas with a huge claimed example count
        logger.error("round %d refused: its aggregate would make the global weights non-finite or too large to train "
                     "with (|w| >= %.3g), or the server optimizer's state non-finite; the weights and server "
                     "optimizer state stay unchanged", state.round_num, MAX_WEIGHT_MAGNITUDE)
        new_weights, optimizer_state, update_norm = weights, state.server_optimizer_state, 0.0
        report = {**report, "outcome": "failed", "refused": "insane_state"}
    deltas = sums.deltas
    metrics = {
        "distributor": {"bytes_down": sums.bytes_down, **report},
        "client_work": {"train": sums.train_metrics.result()},
        "aggregator": {"num_clients": deltas.num_clients, "bytes_up": sums.bytes_up,
                       "mean_weight": deltas.total_weight / deltas.num_clients if deltas.num_clients else 0.0,
                       **deltas.measurements()},
        "finalizer": {"update_norm": update_norm},
    }
    return LearningProcessState(new_weights, optimizer_state, state.round_num + 1), metrics


def _server_step(state: LearningProcessState, weights: ModelWeights, mean_delta: list[np.ndarray] | None,
                 manifest: Manifest, server_optimizer: optimizers.ServerOptimizer
                 ) -> tuple[ModelWeights, dict[str, list[np.ndarray]], float]:
    """The server step: (new weights, optimizer state, L2 norm of the mean trainable delta); no-op without deltas."""
    if mean_delta is None:
        return weights, state.server_optimizer_state, 0.0
    delta = ModelWeights.from_list(manifest, mean_delta)
    optimizer_state, trainable = server_optimizer.apply(state.server_optimizer_state, weights.trainable,
                                                        delta.trainable)
    non_trainable = [w + d for w, d in zip(weights.non_trainable, delta.non_trainable)]
    norm = math.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta.trainable))
    return ModelWeights(trainable, non_trainable, weights.trainable_mask), optimizer_state, norm


def build_weighted_fed_avg(
        model_fn: Callable[[], Any], client_optimizer_fn: Callable[[], Any],
        server_optimizer_fn: Callable[[], optimizers.ServerOptimizer] = lambda: optimizers.SGD(1.0),
        client_weighting: ClientWeighting = ClientWeighting.NUM_EXAMPLES, *, batch_size: int | None = None,
        client_epochs: int = 1, max_client_steps: int | None = None, executor: Executor | None = None,
        seed: int | None = 0, model_aggregator: Aggregator | None = None) -> LearningProcess:
    """FedAvg (McMahan et al., 2017), with FedAvgM/FedAdam/FedYogi/FedAdagrad through `server_optimizer_fn`.

    `model_fn` is called once and lowered with `client_optimizer_fn()` (a Keras optimizer) at
    `batch_size` (else the model's batch_size_hint). `seed` derives each client's shuffle seed
    per round; None trains on every client's examples in their given order. `model_aggregator`
    replaces the weighted mean (clipping, median, trimmed mean, DP: fedge.learning.aggregation).
    """
    return _build(model_fn, client_optimizer_fn, server_optimizer_fn, client_weighting, batch_size,
                  _client_work(client_epochs, max_client_steps, None), seed, executor, model_aggregator)


build_federated_averaging_process = build_weighted_fed_avg  # TFF's older name (tff.learning, before 0.50)


def build_weighted_fed_prox(
        model_fn: Callable[[], Any], proximal_strength: float, client_optimizer_fn: Callable[[], Any],
        server_optimizer_fn: Callable[[], optimizers.ServerOptimizer] = lambda: optimizers.SGD(1.0),
        client_weighting: ClientWeighting = ClientWeighting.NUM_EXAMPLES, *, batch_size: int | None = None,
        client_epochs: int = 1, max_client_steps: int | None = None, executor: Executor | None = None,
        seed: int | None = 0, model_aggregator: Aggregator | None = None) -> LearningProcess:
    """FedProx (Li et al., 2020): FedAvg whose clients add mu/2 * ||w - w_global||^2 to their loss.

    The artifact is converted with the proximal term (docs/artifact.md, FedProx); mu = 0 is FedAvg.
    """
    return _build(model_fn, client_optimizer_fn, server_optimizer_fn, client_weighting, batch_size,
                  _client_work(client_epochs, max_client_steps, proximal_strength), seed, executor, model_aggregator)


def _build(model_fn: Callable[[], Any], client_optimizer_fn: Callable[[], Any],
           server_optimizer_fn: Callable[[], optimizers.ServerOptimizer], client_weighting: ClientWeighting,
           batch_size: int | None, client_work: ClientWork, seed: int | None, executor: Executor | None,
           model_aggregator: Aggregator | None) -> LearningProcess:
    """Lower the model once and compose the process."""
    artifact = lower_model_fn(model_fn, batch_size, client_optimizer_fn(), proximal=client_work.proximal_mu is not None)
    return LearningProcess(artifact, client_work, client_weighting, server_optimizer_fn(), executor, model_aggregator,
                           seed=seed)


def _client_work(epochs: int, max_steps: int | None, proximal_mu: float | None) -> ClientWork:
    """The builders' client work, with their argument names in the errors (client_epochs, ...)."""
    try:
        return ClientWork(epochs=epochs, max_steps=max_steps, proximal_mu=proximal_mu)
    except ValueError as error:
        message = str(error)
        for field, argument in (("epochs", "client_epochs"), ("max_steps", "max_client_steps"),
                                ("proximal_mu", "proximal_strength")):
            message = message.replace(field, argument, 1) if message.startswith(field) else message
        raise ValueError(message) from None


def _check_int(name: str, value: Any, minimum: int) -> None:
    """ValueError unless `value` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
