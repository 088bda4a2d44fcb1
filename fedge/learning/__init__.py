"""Federated learning in the shape of `tff.learning`: models, process builders, evaluation, state.

Every client of a process runs one trainable `.tflite` artifact (what devices run), through
an executor: in-process worker processes by default, devices over MQTT in the server.
"""

from fedge.learning import executors, finalizers, metrics, optimizers
from fedge.learning.aggregation import Aggregator, ClientWeighting, MeanAggregator, NormClipping
from fedge.learning.evaluation import FederatedEvaluation, build_federated_evaluation
from fedge.learning.keras_model import from_keras_model
from fedge.learning.model import BatchOutput, Model, unpack_batch
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
