"""Entry point: a Keras 3 model, loss, optimizer and batch size in; a trainable artifact out.

Also the manifest packaging every entry point shares (converters/custom.py is the other).
"""

from __future__ import annotations

from typing import Any, Iterable

import keras
import numpy as np
import tensorflow as tf

from converters.errors import ConversionError
from converters.graph import build_graph
from converters.losses import LossSpec, loss_spec
from converters.module import ArtifactModule, weight_key
from converters.optimizers import optimizer_config
from converters.tflite_file import convert_signatures, embed_manifest
from converters.trainer import TrainableModule
from device_runtime.artifact import Artifact, read_manifest
from device_runtime.manifest import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION

_ACCURACY_NAMES = {"accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy", "binary_accuracy"}


def tracks_accuracy(metrics: Iterable[Any] | None, loss: LossSpec) -> bool:
    """Whether Keras `metrics` ask for accuracy; ConversionError for any metric the artifact lacks."""
    names = [m if isinstance(m, str) else getattr(m, "name", type(m).__name__) for m in (metrics or [])]
    unknown = [name for name in names if name not in _ACCURACY_NAMES and name != "loss"]
    if unknown:
        raise ConversionError(f"metrics {unknown} are not supported; the artifact always reports loss, "
                              f"examples and batches, and can add accuracy ({sorted(_ACCURACY_NAMES)})")
    if names and loss.name == "mean_squared_error" and any(name in _ACCURACY_NAMES for name in names):
        raise ConversionError("accuracy is not defined for mean_squared_error")
    return any(name in _ACCURACY_NAMES for name in names)


def keras_data_specs(model: keras.Model, loss: LossSpec,
                     batch_size: int | None) -> tuple[tf.TensorSpec, tf.TensorSpec]:
    """The (x, y) specs the artifact of `model` trained with `loss` takes, batch dimension `batch_size`."""
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


def check_batch_size(batch_size: Any) -> None:
    """Raise ConversionError unless `batch_size` is a positive int (the artifact's fixed batch)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConversionError(f"batch_size must be a positive integer, got {batch_size!r}")


def keras_metric_finalizers(metric_variables: list[str]) -> dict[str, list[str]]:
    """How a Keras model's artifact finalizes its metric variables (manifest.metrics.finalizers)."""
    finalizers = {"loss": ["divide", "loss_sum", "num_examples"],
                  "num_examples": ["identity", "num_examples"],
                  "num_batches": ["identity", "num_batches"]}
    if "correct" in metric_variables:
        finalizers["accuracy"] = ["divide", "correct", "num_examples"]
    return finalizers


def package_artifact(module: ArtifactModule, *, model_name: str, weight_names: list[str], loss: dict[str, Any],
                     finalizers: dict[str, list[str]]) -> Artifact:
    """Convert `module`'s signatures (builtin ops only, checked) and embed the manifest of docs/artifact.md.

    Every entry point (a Keras model, a custom fedge Model) ends here, so all artifacts share
    one manifest layout and one content hash.
    """
    model_bytes = convert_signatures(module, module.signature_functions)
    output = module.signature_functions["forward"].get_concrete_function().structured_outputs["output"]
    weights = [{"key": weight_key(i), "name": name, "shape": [int(d) for d in variable.shape],
                "dtype": "float32", "trainable": trainable}
               for i, (name, variable, trainable) in enumerate(zip(weight_names, module.model_weights,
                                                                   module.trainable_flags))]
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "model_name": model_name,
        "batch_size": int(module.x_spec.shape[0]),
        "input": _spec_entry(module.x_spec),
        "label": _spec_entry(module.y_spec),
        "output": _spec_entry(output),
        "weights": weights,
        "num_parameters": int(sum(np.prod(w["shape"], dtype=np.int64) for w in weights)),
        "loss": loss,
        "optimizer": module.optimizer.config,
        "proximal": bool(module.proximal),
        "metrics": {"variables": module.metric_names, "finalizers": finalizers},
        "signatures": sorted(module.signature_functions),
        "producer": f"fedge 0.1.0 (tensorflow {tf.__version__}, keras {keras.__version__})",
    }
    packed = embed_manifest(model_bytes, manifest)
    return Artifact(packed, read_manifest(packed))


def convert_keras_model(model: keras.Model, *, loss: Any, optimizer: Any, batch_size: int,
                        metrics: Iterable[Any] | None = ("accuracy",),
                        model_name: str | None = None, proximal: bool = False) -> Artifact:
    """Lower `model` to a `.tflite` that trains with builtin ops only (docs/artifact.md).

    Unsupported layers, losses and optimizer options raise before anything is converted;
    the Keras model's weights are copied, never changed. `proximal=True` adds FedProx's
    proximal term (strength set with the `set_proximal_mu` signature, anchored at the
    weights last given to `set_weights`).
    """
    check_batch_size(batch_size)
    spec = loss_spec(loss)
    optimizer_entry = optimizer_config(optimizer)
    track_accuracy = tracks_accuracy(metrics, spec)
    graph = build_graph(model)
    x_spec, y_spec = keras_data_specs(model, spec, batch_size)
    module = TrainableModule(graph, spec, optimizer_entry, x_spec, y_spec, track_accuracy, proximal)
    return package_artifact(module, model_name=model_name or model.name,
                            weight_names=[variable.path for variable in graph.weights], loss=spec.manifest(),
                            finalizers=keras_metric_finalizers(module.metric_names))
