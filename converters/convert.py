"""Entry point: a Keras 3 model, loss, optimizer and batch size in; a trainable artifact out."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import keras
import numpy as np
import tensorflow as tf

from converters.errors import ConversionError
from converters.graph import build_graph
from converters.losses import LossSpec, loss_spec
from converters.optimizers import optimizer_config
from converters.tflite_file import convert_signatures, embed_manifest
from converters.trainer import TrainableModule, weight_key

FORMAT_VERSION = 1
_ACCURACY_NAMES = {"accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy"}


@dataclass(frozen=True)
class ConversionResult:
    """The artifact's bytes and the manifest embedded in them."""

    tflite_bytes: bytes
    manifest: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        """Write the `.tflite` file and return its path."""
        path = Path(path)
        path.write_bytes(self.tflite_bytes)
        return path


def _tracks_accuracy(metrics: Iterable[Any] | None, loss: LossSpec) -> bool:
    names = [m if isinstance(m, str) else getattr(m, "name", type(m).__name__) for m in (metrics or [])]
    unknown = [name for name in names if name not in _ACCURACY_NAMES and name != "loss"]
    if unknown:
        raise ConversionError(f"metrics {unknown} are not supported; the artifact always reports loss, "
                              f"examples and batches, and can add accuracy ({sorted(_ACCURACY_NAMES)})")
    if names and loss.name == "mean_squared_error" and any(name in _ACCURACY_NAMES for name in names):
        raise ConversionError("accuracy is not defined for mean_squared_error")
    return any(name in _ACCURACY_NAMES for name in names)


def _tensor_specs(model: keras.Model, loss: LossSpec, batch_size: int) -> tuple[tf.TensorSpec, tf.TensorSpec]:
    input_shape, output_shape = model.inputs[0].shape[1:], model.outputs[0].shape[1:]
    if None in input_shape or None in output_shape:
        raise ConversionError(f"input and output shapes must be fully known, got input {input_shape} "
                              f"and output {output_shape} (fix the sequence length in keras.Input)")
    x_spec = tf.TensorSpec([batch_size, *input_shape], tf.as_dtype(model.inputs[0].dtype), name="x")
    if loss.name == "sparse_categorical_crossentropy":
        y_spec = tf.TensorSpec([batch_size, *output_shape[:-1]], tf.int32, name="y")
    else:
        y_spec = tf.TensorSpec([batch_size, *output_shape], tf.float32, name="y")
    return x_spec, y_spec


def _spec_entry(spec: tf.TensorSpec) -> dict[str, Any]:
    return {"shape": [int(d) for d in spec.shape[1:]], "dtype": spec.dtype.name}


def convert_keras_model(model: keras.Model, *, loss: Any, optimizer: Any, batch_size: int,
                        metrics: Iterable[Any] | None = ("accuracy",),
                        model_name: str | None = None, proximal: bool = False) -> ConversionResult:
    """Lower `model` to a `.tflite` that trains with builtin ops only (docs/artifact.md).

    Unsupported layers, losses and optimizer options raise before anything is converted;
    the Keras model's weights are copied, never changed. `proximal=True` adds FedProx's
    proximal term (strength set with the `set_proximal_mu` signature, anchored at the
    weights last given to `set_weights`).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConversionError(f"batch_size must be a positive integer, got {batch_size!r}")
    spec = loss_spec(loss)
    optimizer_entry = optimizer_config(optimizer)
    track_accuracy = _tracks_accuracy(metrics, spec)
    graph = build_graph(model)
    x_spec, y_spec = _tensor_specs(model, spec, batch_size)
    module = TrainableModule(graph, spec, optimizer_entry, x_spec, y_spec, track_accuracy, proximal)
    model_bytes = convert_signatures(module, module.signature_functions)
    finalizers = {"loss": ["divide", "loss_sum", "num_examples"],
                  "num_examples": ["identity", "num_examples"],
                  "num_batches": ["identity", "num_batches"]}
    if track_accuracy:
        finalizers["accuracy"] = ["divide", "correct", "num_examples"]
    weights = [{"key": weight_key(i), "name": variable.path, "shape": [int(d) for d in variable.shape],
                "dtype": "float32", "trainable": trainable}
               for i, (variable, trainable) in enumerate(zip(graph.weights, graph.trainable))]
    manifest = {
        "format": "fedge-trainable",
        "format_version": FORMAT_VERSION,
        "model_name": model_name or model.name,
        "batch_size": batch_size,
        "input": _spec_entry(x_spec),
        "label": _spec_entry(y_spec),
        "output": {"shape": [int(d) for d in model.outputs[0].shape[1:]], "dtype": "float32"},
        "weights": weights,
        "num_parameters": int(sum(np.prod(w["shape"], dtype=np.int64) for w in weights)),
        "loss": spec.manifest(),
        "optimizer": optimizer_entry,
        "proximal": bool(proximal),
        "metrics": {"variables": module.metric_names, "finalizers": finalizers},
        "signatures": sorted(module.signature_functions),
        "producer": f"fedge 0.1.0 (tensorflow {tf.__version__}, keras {keras.__version__})",
    }
    packed = embed_manifest(model_bytes, manifest)
    from device_runtime.artifact import read_manifest
    return ConversionResult(packed, read_manifest(packed))
