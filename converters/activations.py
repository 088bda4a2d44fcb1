"""Elementwise activations: forward and gradient written with TFLite builtin ops only."""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

ActivationGrad = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]


def positive_step(t: tf.Tensor) -> tf.Tensor:
    """1.0 where t > 0, 0.0 where t == 0, for t >= 0: ceil(min(t, 1)).

    The same values as cast(t > 0) but made of ops the default XNNPACK delegate runs, so a
    backward pass that needs a mask is not cut into pieces by builtin GREATER and CAST kernels.
    """
    return tf.math.ceil(tf.minimum(t, 1.0))


def _relu_grad(x: tf.Tensor, y: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    return dy * positive_step(y)                          # y = max(x, 0) > 0 exactly where x > 0


def _relu6_grad(x: tf.Tensor, y: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    return dy * (positive_step(y) * positive_step(6.0 - y))   # 0 < y < 6 exactly where 0 < x < 6


def _sigmoid_grad(x: tf.Tensor, y: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    return dy * y * (1.0 - y)


def _tanh_grad(x: tf.Tensor, y: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    return dy * (1.0 - y * y)


def _softmax_grad(x: tf.Tensor, y: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    return y * (dy - tf.reduce_sum(dy * y, axis=-1, keepdims=True))


def _linear_grad(x: tf.Tensor, y: tf.Tensor, dy: tf.Tensor) -> tf.Tensor:
    return dy


ACTIVATIONS: dict[str, tuple[Callable[[tf.Tensor], tf.Tensor], ActivationGrad]] = {
    "relu": (tf.nn.relu, _relu_grad),
    "relu6": (tf.nn.relu6, _relu6_grad),
    "sigmoid": (tf.math.sigmoid, _sigmoid_grad),
    "tanh": (tf.math.tanh, _tanh_grad),
    "softmax": (lambda x: tf.nn.softmax(x, axis=-1), _softmax_grad),
    "linear": (tf.identity, _linear_grad),
}

# Activations whose input Keras uses as logits when a cross-entropy loss follows them.
LOGIT_ACTIVATIONS = ("softmax", "sigmoid")


def activation_name(activation: object) -> str:
    """The name of a Keras activation given as a string or as a keras.activations function."""
    if activation is None:
        return "linear"
    name = activation if isinstance(activation, str) else getattr(activation, "__name__", repr(activation))
    return {"relu_6": "relu6"}.get(name, name)
