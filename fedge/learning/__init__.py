"""Federated learning in the shape of `tff.learning`: models, process builders, evaluation, state.

Every client of a process runs one trainable `.tflite` artifact (what devices run), through
an executor: in-process worker processes by default, devices over MQTT in the server.
The model interface (`Model`, `from_keras_model`) needs TensorFlow and is imported on first
use; the rest is numpy, so a server of a converted `.tflite` never loads TensorFlow.
"""

from typing import Any

from device_runtime.protocol import ClientWork, RoundConfig
from fedge.learning import algorithms, executors, finalizers, metrics, models, optimizers
from fedge.learning.aggregation import Aggregator, ClientWeighting, MeanAggregator, NormClipping
from fedge.learning.evaluation import EvaluationProcess, FederatedEvaluation, build_fed_eval, build_federated_evaluation
from fedge.learning.process import (
    LearningProcess,
    build_federated_averaging_process,
    build_weighted_fed_avg,
    build_weighted_fed_prox,
)
from fedge.learning.privacy import GaussianFixedDP, dp_epsilon
from fedge.learning.robust import CoordinateMedian, TrimmedMean
from fedge.learning.state import LearningProcessState, ModelWeights, load_state, save_state

__all__ = [
    "Aggregator",
    "BatchOutput",
    "ClientWeighting",
    "ClientWork",
    "CoordinateMedian",
    "EvaluationProcess",
    "FederatedEvaluation",
    "GaussianFixedDP",
    "LearningProcess",
    "LearningProcessState",
    "MeanAggregator",
    "Model",
    "ModelWeights",
    "NormClipping",
    "RoundConfig",
    "TrimmedMean",
    "algorithms",
    "build_fed_eval",
    "build_federated_averaging_process",
    "build_federated_evaluation",
    "build_weighted_fed_avg",
    "build_weighted_fed_prox",
    "dp_epsilon",
    "executors",
    "finalizers",
    "from_keras_model",
    "load_state",
    "metrics",
    "models",
    "optimizers",
    "save_state",
    "unpack_batch",
]

def __getattr__(name: str) -> Any:
    """The model interface (Model, from_keras_model, ...), which needs TensorFlow, from fedge.learning.models on
    first use (PEP 562)."""
    if name not in models.__all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(models, name)
    return value
