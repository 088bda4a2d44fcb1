"""fedge.learning.Model: the model interface of tff.learning, plus lowering to the trainable artifact.

A Model holds its weights and local metric variables as TensorFlow variables and runs its
forward pass in TensorFlow, as in TFF. fedge adds `lower()`, which compiles the model into
the `.tflite` artifact (docs/artifact.md) that clients, in-process or on devices, train.
A custom subclass is lowered by converters.custom (gradients by tf.GradientTape, then the
builtin-only check); `from_keras_model` (fedge/learning/keras_model.py) by the Keras lowering.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, NamedTuple

import tensorflow as tf

from converters.custom import convert_custom_model
from device_runtime.artifact import Artifact


class BatchOutput(NamedTuple):
    """What forward_pass returns: the batch's mean loss, the predictions, the number of real examples."""

    loss: tf.Tensor
    predictions: tf.Tensor
    num_examples: tf.Tensor


def unpack_batch(batch_input: Any) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(x, y, mask) of a batch given as (x, y), (x, y, mask) or a dict with "x", "y" and optional "mask".

    `mask` (float32, 1 for real rows, 0 for padding) defaults to all ones; fedge passes it
    when it pads the last partial batch to the artifact's fixed batch size.
    """
    if isinstance(batch_input, Mapping):
        missing = [key for key in ("x", "y") if key not in batch_input]
        if missing:
            raise ValueError(f"batch_input dict lacks {missing}; it needs 'x', 'y' and optionally 'mask'")
        x, y, mask = batch_input["x"], batch_input["y"], batch_input.get("mask")
    elif isinstance(batch_input, (tuple, list)) and len(batch_input) in (2, 3):
        x, y, mask = batch_input[0], batch_input[1], batch_input[2] if len(batch_input) == 3 else None
    else:
        raise ValueError(f"batch_input must be (x, y), (x, y, mask) or a dict with 'x' and 'y', "
                         f"got {type(batch_input).__name__}")
    x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
    mask = tf.ones(tf.shape(x)[:1], tf.float32) if mask is None else tf.cast(mask, tf.float32)
    return x, y, mask


class Model(abc.ABC):
    """A federated model, shaped like tff.learning.Model; fedge calls a no-argument model_fn to build one.

    Subclass it to write a model directly in TensorFlow: list the variables, compute a
    masked mean loss in `forward_pass` while accumulating the local metric variables, and
    say how to finalize them (fedge.learning.finalizers). `lower()` then compiles it.
    """

    @property
    @abc.abstractmethod
    def trainable_variables(self) -> list[tf.Variable]:
        """The weights the client optimizer trains."""

    @property
    @abc.abstractmethod
    def non_trainable_variables(self) -> list[tf.Variable]:
        """Weights that are part of the model but not trained by the optimizer (e.g. moving statistics)."""

    @property
    @abc.abstractmethod
    def local_variables(self) -> list[tf.Variable]:
        """The local metric accumulators (sums and counts), reset with reset_metrics()."""

    @property
    @abc.abstractmethod
    def input_spec(self) -> tuple[tf.TensorSpec, tf.TensorSpec]:
        """The (x, y) batch specs; the batch dimension is None or a fixed int."""

    @abc.abstractmethod
    def forward_pass(self, batch_input: Any, training: bool = True) -> BatchOutput:
        """Loss and predictions of a batch ((x, y) or {"x", "y", "mask"}), accumulating the local metrics.

        The loss must weight rows by `mask` (see unpack_batch) for padded batches to train exactly.
        """

    @abc.abstractmethod
    def predict_on_batch(self, x: Any, training: bool = False) -> tf.Tensor:
        """The model's predictions for a batch of inputs."""

    @abc.abstractmethod
    def report_local_unfinalized_metrics(self) -> dict[str, tf.Tensor]:
        """The local metric variables by name, as scalars the server can sum across clients."""

    @abc.abstractmethod
    def metric_finalizers(self) -> dict[str, list[str]]:
        """How to finalize summed metrics: {name: ["divide", a, b] | ["identity", a]}, as in the manifest."""

    def reset_metrics(self) -> None:
        """Set every local metric variable to zero."""
        for variable in self.local_variables:
            variable.assign(tf.zeros_like(variable))

    @property
    def batch_size_hint(self) -> int | None:
        """The batch size the data suggests (input_spec's fixed batch dimension), or None."""
        batch = self.input_spec[0].shape[0]
        return None if batch is None else int(batch)

    def lower(self, *, batch_size: int, optimizer: Any, proximal: bool = False) -> Artifact:
        """Compile the model, with its current weights, into the builtin-only trainable artifact.

        `optimizer` is a keras SGD/Adam instance or "sgd"/"adam"; `proximal=True` adds FedProx's
        term. Raises converters.ConversionError naming any op without a TFLite builtin.
        """
        return convert_custom_model(self, optimizer=optimizer, batch_size=batch_size, proximal=proximal)
