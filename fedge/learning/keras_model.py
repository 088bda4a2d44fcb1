"""from_keras_model: wrap a Keras model as a fedge.learning.Model (tff.learning.from_keras_model's shape).

The wrapper runs the Keras model in TensorFlow for forward_pass/predict_on_batch and keeps
the same metric variables (loss_sum, num_examples, num_batches, correct) and finalizers as
the artifact it lowers to, so its metrics and the devices' metrics aggregate alike.
Everything the converter would refuse (layers, loss, metrics) is refused here, up front.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from converters import convert_keras_model
from converters.convert import keras_data_specs, keras_metric_finalizers, tracks_accuracy
from converters.graph import build_graph
from converters.losses import correct_predictions, loss_spec, valid_positions
from converters.trainer import find_logits_node, metric_variable_names
from device_runtime.artifact import Artifact
from fedge.learning.model import BatchOutput, Model, unpack_batch


def _pair(value: Any, what: str) -> tuple[Any, Any]:
    """(x, y) from an (x, y) pair or a dict with "x" and "y"."""
    if isinstance(value, Mapping) and "x" in value and "y" in value:
        return value["x"], value["y"]
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise ValueError(f"{what} must be an (x, y) pair or a dict with 'x' and 'y', got {value!r}")


def _specs_from_input_spec(input_spec: Any) -> tuple[tf.TensorSpec, tf.TensorSpec]:
    x_spec, y_spec = _pair(input_spec, "input_spec")
    for name, spec in (("x", x_spec), ("y", y_spec)):
        if not isinstance(spec, tf.TensorSpec) or spec.shape.rank is None or spec.shape.rank < 1:
            raise ValueError(f"input_spec {name} must be a tf.TensorSpec with a batch dimension, got {spec!r}")
    if not x_spec.shape[:1].is_compatible_with(y_spec.shape[:1]):
        raise ValueError(f"input_spec x and y have different batch dimensions: {x_spec.shape} and {y_spec.shape}")
    return x_spec, y_spec


def _specs_from_sample_batch(sample_batch: Any) -> tuple[tf.TensorSpec, tf.TensorSpec, int]:
    """Specs (batch dimension None) and row count of a sample (x, y) batch."""
    x, y = (tf.convert_to_tensor(value) for value in _pair(sample_batch, "sample_batch"))
    if x.shape.rank < 1 or y.shape.rank < 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"sample_batch x and y need the same number of rows, got shapes {x.shape} and {y.shape}")
    return (tf.TensorSpec([None, *x.shape[1:]], x.dtype, name="x"),
            tf.TensorSpec([None, *y.shape[1:]], y.dtype, name="y"), int(x.shape[0]))


def _unreduced(loss: Any) -> Any:
    """The Keras loss as a function of (y, predictions) that returns per-example (unreduced) values."""
    if isinstance(loss, str):
        return keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        return type(loss).from_config({**loss.get_config(), "reduction": None})
    return loss


def _check_spec(given: tf.TensorSpec, expected: tf.TensorSpec, name: str, what: str) -> None:
    """Per-example shape equal and dtype of the same kind (integer / floating) as the artifact takes."""
    numeric = given.dtype.is_floating or given.dtype.is_integer
    same_kind = given.dtype.is_integer if expected.dtype.is_integer else numeric
    if given.shape[1:] != expected.shape[1:] or not same_kind:
        kind = "an integer" if expected.dtype.is_integer else "a numeric"
        raise ValueError(f"{name} {given.shape} {given.dtype.name} does not match {what}: expected shape "
                         f"{tf.TensorShape([None, *expected.shape[1:]])} with {kind} dtype")


class KerasModel(Model):
    """A Keras model with its loss and metrics, as a fedge Model."""

    def __init__(self, keras_model: keras.Model, loss: Any, metrics: list[Any] | None,
                 input_spec: tuple[tf.TensorSpec, tf.TensorSpec], data_dtypes: tuple[tf.DType, tf.DType],
                 batch_size_hint: int | None, output_is_logits: bool):
        self._keras_model = keras_model
        self._loss = loss
        self._metrics = metrics
        self._loss_spec = loss_spec(loss)
        self._unreduced_loss = _unreduced(loss)
        self._input_spec = input_spec
        self._data_dtypes = data_dtypes  # what the artifact casts x and y to
        self._batch_size_hint = batch_size_hint
        self._output_is_logits = output_is_logits
        self._metric_variables = {name: tf.Variable(0.0, trainable=False, name=name) for name in
                                  metric_variable_names(tracks_accuracy(metrics, self._loss_spec))}

    @property
    def trainable_variables(self) -> list[tf.Variable]:
        return [variable.value for variable in self._keras_model.trainable_variables]

    @property
    def non_trainable_variables(self) -> list[tf.Variable]:
        return [variable.value for variable in self._keras_model.non_trainable_variables]

    @property
    def local_variables(self) -> list[tf.Variable]:
        return list(self._metric_variables.values())

    @property
    def input_spec(self) -> tuple[tf.TensorSpec, tf.TensorSpec]:
        return self._input_spec

    @property
    def batch_size_hint(self) -> int | None:
        return self._batch_size_hint

    def forward_pass(self, batch_input: Any, training: bool = True) -> BatchOutput:
        """The Keras model and loss on the batch in TensorFlow; the loss is the mean over unmasked rows.

        As in the artifact, x and y are cast to its input and label dtypes and metrics count
        only unmasked rows; unlike it, batch normalization
        in training mode here also sees the padding rows.
        """
        x, y, mask = unpack_batch(batch_input)
        x, y = tf.cast(x, self._data_dtypes[0]), tf.cast(y, self._data_dtypes[1])
        predictions = self._keras_model(x, training=training)
        losses = tf.reshape(self._unreduced_loss(y, predictions), [tf.shape(y)[0], -1])
        if self._loss_spec.ignore_class is None:
            per_example = tf.reduce_mean(losses, axis=1)
        else:  # a row's loss is the mean over its positions that are not padding, as in the artifact
            valid = tf.reshape(valid_positions(self._loss_spec, y), tf.shape(losses))
            per_example = tf.reduce_sum(losses * valid, axis=1) / tf.maximum(tf.reduce_sum(valid, axis=1), 1.0)
        count = tf.reduce_sum(mask)
        loss_sum = tf.reduce_sum(per_example * mask)
        self._metric_variables["loss_sum"].assign_add(loss_sum)
        self._metric_variables["num_examples"].assign_add(count)
        self._metric_variables["num_batches"].assign_add(1.0)
        if "correct" in self._metric_variables:
            hits = correct_predictions(self._loss_spec, predictions, y, self._output_is_logits)
            self._metric_variables["correct"].assign_add(tf.reduce_sum(hits * mask))
        return BatchOutput(loss_sum / tf.maximum(count, 1.0), predictions, tf.cast(count, tf.int32))

    def predict_on_batch(self, x: Any, training: bool = False) -> tf.Tensor:
        return self._keras_model(x, training=training)

    def report_local_unfinalized_metrics(self) -> dict[str, tf.Tensor]:
        return {name: variable.read_value() for name, variable in self._metric_variables.items()}

    def metric_finalizers(self) -> dict[str, list[str]]:
        return keras_metric_finalizers(list(self._metric_variables))

    def lower(self, *, batch_size: int, optimizer: Any, proximal: bool = False) -> Artifact:
        """The Keras lowering of a clone holding the current weights (the user's model is never touched)."""
        clone = keras.models.clone_model(self._keras_model)
        clone.set_weights(self._keras_model.get_weights())
        return convert_keras_model(clone, loss=self._loss, optimizer=optimizer, batch_size=batch_size,
                                   metrics=self._metrics, model_name=self._keras_model.name, proximal=proximal)


def from_keras_model(keras_model: keras.Model, loss: Any, input_spec: Any = None, sample_batch: Any = None,
                     metrics: list[Any] | None = None, loss_weights: Any = None) -> Model:
    """Wrap a Keras model as a fedge Model, as tff.learning.from_keras_model; call it inside model_fn.

    Give exactly one of `input_spec` ((x_spec, y_spec) or {"x": ..., "y": ...} of tf.TensorSpec)
    and `sample_batch` (an (x, y) or {"x", "y"} batch of arrays). `loss` is a Keras loss
    (name, object or function); `metrics` may ask for accuracy, and loss, example and batch
    counts are always reported. Anything the artifact cannot express raises ValueError
    (converters.ConversionError for layers, losses and metrics) here, before any training.
    """
    if loss_weights is not None:
        raise ValueError("loss_weights is not supported: a fedge model has one output and one loss")
    if (input_spec is None) == (sample_batch is None):
        raise ValueError("give exactly one of input_spec and sample_batch")
    if not isinstance(keras_model, keras.Model):
        raise TypeError(f"keras_model must be a keras.Model, got {type(keras_model).__name__}")
    if sample_batch is not None:
        x_spec, y_spec, batch_size_hint = _specs_from_sample_batch(sample_batch)
        what = "sample_batch"
    else:
        x_spec, y_spec = _specs_from_input_spec(input_spec)
        batch_size_hint, what = (None if x_spec.shape[0] is None else int(x_spec.shape[0])), "input_spec"
    graph = build_graph(keras_model)  # single input and output, built, supported layers
    spec = loss_spec(loss)
    metrics = list(metrics) if metrics else None
    expected_x, expected_y = keras_data_specs(keras_model, spec, None)
    _check_spec(x_spec, expected_x, f"{what} x", f"the Keras model's input {keras_model.inputs[0].shape}")
    _check_spec(y_spec, expected_y, f"{what} y",
                f"the labels {spec.name} takes for the Keras model's output {keras_model.outputs[0].shape}")
    output_is_logits = spec.from_logits and find_logits_node(graph, spec) is None
    return KerasModel(keras_model, loss, metrics, (x_spec, y_spec), (expected_x.dtype, expected_y.dtype),
                      batch_size_hint, output_is_logits)
