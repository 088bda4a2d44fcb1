"""Runs fedge trainable .tflite artifacts on a device and speaks the fedge MQTT protocol.

Depends only on the standard library, numpy, flatbuffers, a TFLite interpreter
(ai-edge-litert or tflite-runtime) and paho-mqtt; never on tensorflow, keras, fedge,
converters or simulator.
"""

from device_runtime.data import LocalData, load_local_data
from device_runtime.interpreter import interpreter_backend_name, load_interpreter
from device_runtime.model import TrainableModel, finalize_metrics, iterate_batches
from device_runtime.training import LocalResult, evaluate_locally, train_locally

__all__ = [
    "LocalData",
    "LocalResult",
    "TrainableModel",
    "evaluate_locally",
    "finalize_metrics",
    "interpreter_backend_name",
    "iterate_batches",
    "load_interpreter",
    "load_local_data",
    "train_locally",
]
