"""Federated evaluation: model weights and client datasets in, metrics summed over clients and finalized out."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from device_runtime.artifact import Artifact
from fedge.learning.executors import Executor, get_default_executor
from fedge.learning.lowering import lower_model_fn
from fedge.learning.metrics import sum_then_finalize
from fedge.learning.state import ModelWeights


class FederatedEvaluation:
    """`(model_weights, federated_data) -> {"eval": finalized metrics, "num_clients": n}` (TFF's federated evaluation)."""

    def __init__(self, artifact: Artifact, metric_finalizers: dict[str, list[str]],
                 executor: Executor | None) -> None:
        """Evaluate with `artifact`'s `evaluate` signature; `executor` None uses the default executor."""
        self._artifact = artifact
        self._finalizers = metric_finalizers
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
        aggregator = sum_then_finalize(self._finalizers)
        num_clients = 0
        for metrics in executor.evaluate(self._artifact.tflite_bytes, weights, clients):
            aggregator.add(metrics)
            num_clients += 1
        return {"eval": aggregator.result(), "num_clients": num_clients}


def build_federated_evaluation(model_fn: Callable[[], Any], batch_size: int | None = None,
                               executor: Executor | None = None) -> FederatedEvaluation:
    """Lower `model_fn`'s model once for evaluation (batch size: given, else the model's batch_size_hint)."""
    import keras  # here, not above: serving a .tflite evaluates without TensorFlow

    lowered = lower_model_fn(model_fn, batch_size, keras.optimizers.SGD())  # evaluation never steps the optimizer
    return FederatedEvaluation(lowered.artifact, lowered.metric_finalizers, executor)
