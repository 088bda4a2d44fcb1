"""Losses with their gradients, written to match Keras 3's TensorFlow backend exactly.

Keras computes a cross-entropy from the logits whenever the model's output comes out of a
softmax or sigmoid (it finds them through `_keras_logits` or the Softmax op), whatever
`from_logits` says; the lowering does the same, so the fused gradient (softmax - one-hot)
is also the one Keras takes. Every loss is reduced like Keras' `sum_over_batch_size`:
the mean over every element, here over the unmasked examples only.

Sparse cross-entropy may name an `ignore_class` (Keras' own option): label positions equal
to it (padding of a sequence) take no part in the loss, its gradient or accuracy, and the
loss is the mean over the remaining positions of the unmasked rows, as Keras reduces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from converters.errors import ConversionError

EPSILON = 1e-7  # keras.config.epsilon(), Keras' clipping bound for probabilities
_ALIASES = {
    "sparse_categorical_crossentropy": "sparse_categorical_crossentropy",
    "categorical_crossentropy": "categorical_crossentropy",
    "binary_crossentropy": "binary_crossentropy",
    "mean_squared_error": "mean_squared_error",
    "mse": "mean_squared_error",
}
CROSS_ENTROPIES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy")


@dataclass(frozen=True)
class LossSpec:
    """Which loss, whether the model's output is to be read as logits, and the label id that means padding."""

    name: str
    from_logits: bool
    ignore_class: int | None = None

    def manifest(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": self.name, "from_logits": self.from_logits}
        if self.ignore_class is not None:
            entry["ignore_class"] = self.ignore_class
        return entry


def loss_spec(loss: Any) -> LossSpec:
    """Resolve a Keras loss (a name, a keras.losses.Loss or a keras.losses function)."""
    if isinstance(loss, str):
        name, from_logits, config = loss, False, {}
    elif isinstance(loss, keras.losses.Loss) and callable(getattr(loss, "fn", None)):  # LossFunctionWrapper
        config = loss.get_config()
        name, from_logits = loss.fn.__name__, bool(config.get("from_logits", False))
    elif callable(loss) and hasattr(loss, "__name__"):
        name, from_logits, config = loss.__name__, False, {}
    else:
        raise ConversionError(f"loss {loss!r} is not supported; use one of {sorted(set(_ALIASES.values()))}")
    if name not in _ALIASES:
        raise ConversionError(f"loss '{name}' is not supported; use one of {sorted(set(_ALIASES.values()))}")
    ignore_class = config.get("ignore_class")
    if ignore_class is not None and (name != "sparse_categorical_crossentropy" or not isinstance(ignore_class, int)):
        raise ConversionError(f"loss '{name}': ignore_class={ignore_class!r} is not supported "
                              "(only an int, with sparse_categorical_crossentropy)")
    for option, default in (("label_smoothing", 0.0), ("axis", -1)):
        if config.get(option, default) != default:
            raise ConversionError(f"loss '{name}': {option}={config[option]} is not supported")
    if config.get("reduction", "sum_over_batch_size") != "sum_over_batch_size":
        raise ConversionError(f"loss '{name}': reduction='{config['reduction']}' is not supported "
                              "(only 'sum_over_batch_size')")
    return LossSpec(_ALIASES[name], from_logits, ignore_class)


def _clip_mask(p: tf.Tensor) -> tf.Tensor:
    """Derivative of clip(p, EPSILON, 1 - EPSILON)."""
    return tf.cast(tf.logical_and(p > EPSILON, p < 1.0 - EPSILON), p.dtype)


def elementwise_loss(spec: LossSpec, out: tf.Tensor, y: tf.Tensor, logits: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """Keras' unreduced loss (shape [B, ...]) and its derivative with respect to `out`.

    `logits` says whether `out` holds logits (pre-softmax/sigmoid values) or model outputs.
    """
    name = spec.name
    if name in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
        classes = out.shape[-1]
        target = tf.one_hot(tf.cast(y, tf.int32), classes, dtype=out.dtype) \
            if name == "sparse_categorical_crossentropy" else y
        if logits:
            log_p = tf.nn.log_softmax(out, axis=-1)
            loss = -tf.reduce_sum(target * log_p, axis=-1)
            grad = tf.exp(log_p) * tf.reduce_sum(target, axis=-1, keepdims=True) - target
            return loss, grad
        if name == "sparse_categorical_crossentropy":  # softmax CE of log(clip(p))
            clipped = tf.clip_by_value(out, EPSILON, 1.0 - EPSILON)
            total = tf.reduce_sum(clipped, axis=-1, keepdims=True)
            loss = -tf.reduce_sum(target * tf.math.log(clipped), axis=-1) + tf.math.log(total[..., 0])
            grad = (1.0 / total - target / clipped) * _clip_mask(out)
            return loss, grad
        total = tf.reduce_sum(out, axis=-1, keepdims=True)  # CE of clip(p / sum p)
        normalized = out / total
        clipped = tf.clip_by_value(normalized, EPSILON, 1.0 - EPSILON)
        loss = -tf.reduce_sum(target * tf.math.log(clipped), axis=-1)
        d_normalized = -target / clipped * _clip_mask(normalized)
        grad = (d_normalized - tf.reduce_sum(d_normalized * normalized, axis=-1, keepdims=True)) / total
        return loss, grad
    k = float(out.shape[-1])
    if name == "binary_crossentropy":
        if logits:
            loss = tf.nn.relu(out) - out * y + tf.math.log(1.0 + tf.exp(-tf.abs(out)))
            grad = tf.math.sigmoid(out) - y
        else:
            clipped = tf.clip_by_value(out, EPSILON, 1.0 - EPSILON)
            loss = -(y * tf.math.log(clipped) + (1.0 - y) * tf.math.log(1.0 - clipped))
            grad = (-(y / clipped) + (1.0 - y) / (1.0 - clipped)) * _clip_mask(out)
        return tf.reduce_mean(loss, axis=-1), grad / k
    diff = out - y  # mean_squared_error
    return tf.reduce_mean(diff * diff, axis=-1), 2.0 * diff / k


def valid_positions(spec: LossSpec, y: tf.Tensor) -> tf.Tensor:
    """1.0 where a label takes part in the loss (is not `ignore_class`), else 0.0; shape of y."""
    return tf.cast(tf.not_equal(tf.cast(y, tf.int32), spec.ignore_class), tf.float32)


def _ignoring_loss(spec: LossSpec, elementwise: tf.Tensor, grad: tf.Tensor, y: tf.Tensor,
                   mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """masked_loss with `ignore_class`: the mean over valid positions of unmasked rows (Keras'
    reduction); a row's own loss is the mean over its valid positions (0 when it has none)."""
    valid = valid_positions(spec, y) * tf.reshape(mask, [-1] + [1] * (y.shape.rank - 1))
    kept = tf.reshape(elementwise * valid, [elementwise.shape[0], -1])
    per_row = tf.reduce_sum(tf.reshape(valid, [valid.shape[0], -1]), axis=1)
    per_example = tf.reduce_sum(kept, axis=1) / tf.maximum(per_row, 1.0)
    count = tf.maximum(tf.reduce_sum(per_row), 1.0)
    return tf.reduce_sum(kept) / count, per_example, grad * tf.expand_dims(valid / count, -1)


def masked_loss(spec: LossSpec, out: tf.Tensor, y: tf.Tensor, mask: tf.Tensor,
                logits: bool) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(mean loss over unmasked examples, per-example losses [B], d mean_loss / d out)."""
    elementwise, grad = elementwise_loss(spec, out, y, logits)
    if spec.ignore_class is not None:
        return _ignoring_loss(spec, elementwise, grad, y, mask)
    positions = float(elementwise.shape[1:].num_elements())
    per_example = tf.reshape(elementwise, [elementwise.shape[0], -1])
    per_example = tf.reduce_sum(per_example, axis=1) / positions if positions > 1 else per_example[:, 0]
    count = tf.maximum(tf.reduce_sum(mask), 1.0)
    weight = tf.reshape(mask / (count * positions), [-1] + [1] * (grad.shape.rank - 1))
    return tf.reduce_sum(per_example * mask) / count, per_example, grad * weight


def correct_predictions(spec: LossSpec, out: tf.Tensor, y: tf.Tensor, logits: bool) -> tf.Tensor:
    """Per-example accuracy in [0, 1] (the mean over positions for sequence outputs, over the
    positions whose label is not `ignore_class` when the loss has one), [B]."""
    if spec.name == "sparse_categorical_crossentropy":
        hits = tf.equal(tf.argmax(out, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32))
    elif spec.name == "categorical_crossentropy":
        hits = tf.equal(tf.argmax(out, axis=-1, output_type=tf.int32),
                        tf.argmax(y, axis=-1, output_type=tf.int32))
    elif spec.name == "binary_crossentropy":
        hits = tf.equal(out > (0.0 if logits else 0.5), y > 0.5)
    else:
        raise ConversionError(f"accuracy is not defined for loss '{spec.name}'")
    hits = tf.reshape(tf.cast(hits, tf.float32), [out.shape[0], -1])
    if spec.ignore_class is not None:
        valid = tf.reshape(valid_positions(spec, y), [out.shape[0], -1])
        return tf.reduce_sum(hits * valid, axis=1) / tf.maximum(tf.reduce_sum(valid, axis=1), 1.0)
    return tf.reduce_mean(hits, axis=1)
