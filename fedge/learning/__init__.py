"""Federated learning in the shape of `tff.learning`: models, process builders, evaluation, state.

Every client of a process runs one trainable `.tflite` artifact (what devices run), through
an executor: in-process worker processes by default, devices over MQTT in the server.
The model interface (`Model`, `from_keras_model`) needs TensorFlow and is imported on first
use; the rest is numpy, so a server of a converted `.tflite` never loads TensorFlow.
"""

import importlib
from typing import Any

from fedge.learning import executors, finalizers, metrics, optimizers
from fedge.learning.aggregation import Aggregator, ClientWeighting, MeanAggregator, NormClipping
from fedge.learning.evaluation import FederatedEvaluation, build_federated_evaluation
from fedge.learning.process import (
    LearningProcess,
    build_federated_averaging_process,
    build_weighted_fed_prox,
)
from fedge.learning.privacy import GaussianFixedDP, dp_epsilon
from fedge.learning.robust import CoordinateMedian, TrimmedMean
from fedge.learning.state import LearningProcessState, ModelWeights, load_state, save_state

__all__ = [
    "Aggregator",
    "BatchOutput",
    "ClientWeighting",
    "CoordinateMedian",
    "FederatedEvaluation",
    "GaussianFixedDP",
    "LearningProcess",
    "LearningProcessState",
    "MeanAggregator",
    "Model",
    "ModelWeights",
    "NormClipping",
    "TrimmedMean",
    "build_federated_averaging_process",
    "build_federated_evaluation",
    "build_weighted_fed_prox",
    "dp_epsilon",
    "executors",
    "finalizers",
    "from_keras_model",
    "load_state",
    "metrics",
    "optimizers",
    "save_state",
    "unpack_batch",
]

_NEEDS_TENSORFLOW = {"BatchOutput": "fedge.learning.model", "Model": "fedge.learning.model",
                     "unpack_batch": "fedge.learning.model", "from_keras_model": "fedge.learning.keras_model"}


def __getattr__(name: str) -> Any:
    """Import a name that needs TensorFlow when it is first used (PEP 562)."""
    module = _NEEDS_TENSORFLOW.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(module), name)
    return value
