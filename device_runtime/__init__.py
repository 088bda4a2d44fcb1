"""Runs fedge trainable .tflite artifacts on a device.

Depends only on the standard library, numpy, a TFLite interpreter (ai-edge-litert or
tflite-runtime) and paho-mqtt; never on tensorflow, keras, fedge, converters or simulator.
"""

from device_runtime.interpreter import interpreter_backend_name, load_interpreter
from device_runtime.model import TrainableModel, finalize_metrics, iterate_batches

__all__ = [
    "TrainableModel",
    "finalize_metrics",
    "interpreter_backend_name",
    "iterate_batches",
    "load_interpreter",
]
