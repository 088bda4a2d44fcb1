"""Federated evaluation: model weights and client datasets in, metrics summed over clients and finalized out."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from device_runtime.artifact import Artifact
from fedge.learning.executors import Executor, get_default_executor
from fedge.learning.lowering import lower_model_fn
from fedge.learning.metrics import sum_then_finalize
from fedge.learning.state import ModelWeights
from fedge.templates import IterativeProcess


class FederatedEvaluation:
    """`(model_weights, federated_data) -> {"eval": finalized metrics, "num_clients": n}` (TFF's federated evaluation)."""

    def __init__(self, artifact: Artifact, executor: Executor | None) -> None:
        """Evaluate with `artifact`'s `evaluate` signature and metric finalizers; `executor` None uses the default."""
        self._artifact = artifact
        self._executor = executor

    @property
    def artifact(self) -> Artifact:
        """The artifact clients evaluate with."""
        return self._artifact

    def __call__(self, model_weights: ModelWeights, federated_data: Iterable[Any]) -> dict[str, Any]:
        """Every client's metric sums of `model_weights`, summed over clients, then finalized."""
        manifest = self._artifact.manifest
        executor = self._executor if self._executor is not None else get_default_executor()
        clients = executor.prepare(federated_data, manifest)
        weights = model_weights.for_manifest(manifest).to_list()
        aggregator = sum_then_finalize(manifest.metrics.finalizers)
        num_clients = 0
        for metrics in executor.evaluate(self._artifact, weights, clients):
            aggregator.add(metrics)
            num_clients += 1
        return {"eval": aggregator.result(), "num_clients": num_clients}


def build_federated_evaluation(model_fn: Callable[[], Any], batch_size: int | None = None,
                               executor: Executor | None = None) -> FederatedEvaluation:
    """Lower `model_fn`'s model once for evaluation (batch size: given, else the model's batch_size_hint)."""
    import keras  # here, not above: serving a .tflite evaluates without TensorFlow

    artifact = lower_model_fn(model_fn, batch_size, keras.optimizers.SGD())  # evaluation never steps the optimizer
    return FederatedEvaluation(artifact, executor)


class EvaluationProcess(IterativeProcess):
    """Federated evaluation as a process (TFF's `build_fed_eval`): its state is the model weights to evaluate;
    `next(state, federated_data)` returns (state, {"eval": finalized metrics, "num_clients": n})."""

    def __init__(self, evaluation: FederatedEvaluation, initial_weights: ModelWeights) -> None:
        """Evaluate with `evaluation`, starting from `initial_weights`."""
        super().__init__(lambda: initial_weights, lambda state, data: (state, evaluation(state, data)))

    def get_model_weights(self, state: ModelWeights) -> ModelWeights:
        """The weights `state` evaluates."""
        return state

    def set_model_weights(self, state: ModelWeights, model_weights: ModelWeights) -> ModelWeights:
        """A state that evaluates `model_weights` (e.g. a training process's, each round)."""
        return model_weights


def build_fed_eval(model_fn: Callable[[], Any], batch_size: int | None = None,
                   executor: Executor | None = None) -> EvaluationProcess:
    """TFF's `tff.learning.algorithms.build_fed_eval`: an evaluation process over `model_fn`'s model, lowered once."""
    from device_runtime import TrainableModel

    evaluation = build_federated_evaluation(model_fn, batch_size, executor)
    artifact = evaluation.artifact
    initial = TrainableModel(artifact.tflite_bytes, num_threads=1).get_weights()
    return EvaluationProcess(evaluation, ModelWeights.from_list(artifact.manifest, initial))
