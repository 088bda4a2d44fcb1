"""Dense, activations, shape changes, dropout and embedding."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from converters.activations import ACTIVATIONS
from converters.layers.base import Lowering, check_common_options, require


class DenseLowering(Lowering):
    """y = x @ kernel + bias over the last axis (any leading shape); activation is its own node."""

    def __init__(self, layer: Any, weight_indices: list[int]):
        super().__init__(layer, weight_indices)
        check_common_options(self)

    def forward(self, ctx, weights, inputs):
        x = inputs[0]
        kernel = weights[0]
        x2 = tf.reshape(x, [-1, x.shape[-1]])
        y2 = tf.matmul(x2, kernel)
        if self.layer.use_bias:
            y2 = y2 + weights[1]
        return tf.reshape(y2, x.shape[:-1] + [kernel.shape[-1]]), (x, x2)

    def backward(self, cache, weights, dy, need_input_grads):
        x, x2 = cache
        kernel = weights[0]
        dy2 = tf.reshape(dy, [-1, kernel.shape[-1]])
        grads = [tf.matmul(x2, dy2, transpose_a=True)]
        if self.layer.use_bias:
            grads.append(tf.reduce_sum(dy2, axis=0))
        dx = tf.reshape(tf.matmul(dy2, kernel, transpose_b=True), x.shape) if need_input_grads else None
        return [dx], grads


class ActivationLowering(Lowering):
    """An elementwise activation, from an Activation/ReLU/Softmax layer or a layer's `activation=`."""

    def __init__(self, layer: Any, weight_indices: list[int], name: str):
        super().__init__(layer, weight_indices)
        require(self, name in ACTIVATIONS,
                f"activation '{name}' (supported: {', '.join(sorted(ACTIVATIONS))})")
        self.name = name
        self.function, self.gradient = ACTIVATIONS[name]

    def forward(self, ctx, weights, inputs):
        y = self.function(inputs[0])
        return y, (inputs[0], y)

    def backward(self, cache, weights, dy, need_input_grads):
        x, y = cache
        return [self.gradient(x, y, dy)], []


class ReshapeLowering(Lowering):
    """Flatten and Reshape: a reshape forward, the inverse reshape backward."""

    def forward(self, ctx, weights, inputs):
        x = inputs[0]
        target = [int(d) for d in self.layer.compute_output_shape(tuple(x.shape))[1:]]
        return tf.reshape(x, [x.shape[0]] + target), x.shape

    def backward(self, cache, weights, dy, need_input_grads):
        return [tf.reshape(dy, cache)], []


class DropoutLowering(Lowering):
    """Inverted dropout in `train` (builtin RANDOM_UNIFORM, a fresh draw per call), identity elsewhere."""

    def __init__(self, layer: Any, weight_indices: list[int]):
        super().__init__(layer, weight_indices)
        require(self, layer.noise_shape is None, "noise_shape")
        require(self, 0.0 <= layer.rate < 1.0, f"rate={layer.rate}")

    def forward(self, ctx, weights, inputs):
        x = inputs[0]
        if not ctx.training or self.layer.rate == 0.0:
            return x, None
        keep = tf.cast(tf.random.uniform(x.shape) >= self.layer.rate, x.dtype) / (1.0 - self.layer.rate)
        return x * keep, keep

    def backward(self, cache, weights, dy, need_input_grads):
        return [dy if cache is None else dy * cache], []


class EmbeddingLowering(Lowering):
    """Row lookup (GATHER); the gradient is one_hot(ids)^T @ dy, a matmul instead of a scatter."""

    def __init__(self, layer: Any, weight_indices: list[int]):
        super().__init__(layer, weight_indices)
        check_common_options(self)
        require(self, not layer.mask_zero, "mask_zero=True")

    def forward(self, ctx, weights, inputs):
        ids = tf.cast(inputs[0], tf.int32)
        return tf.gather(weights[0], ids), ids

    def backward(self, cache, weights, dy, need_input_grads):
        vocabulary, dim = weights[0].shape
        one_hot = tf.reshape(tf.one_hot(cache, vocabulary, dtype=dy.dtype), [-1, vocabulary])
        grad = tf.matmul(one_hot, tf.reshape(dy, [-1, dim]), transpose_a=True)
        return [None], [grad]
