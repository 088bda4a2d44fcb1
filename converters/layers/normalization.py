"""BatchNormalization: masked batch statistics in `train`, moving statistics elsewhere."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from converters.layers.base import Lowering, check_common_options, require


class BatchNormalizationLowering(Lowering):
    """Normalizes over every axis but the last; padding rows count neither in the statistics
    nor in the gradient. A frozen layer (trainable=False) always uses moving statistics."""

    def __init__(self, layer: Any, weight_indices: list[int]):
        super().__init__(layer, weight_indices)
        check_common_options(self)
        require(self, not layer.renorm, "renorm=True")
        require(self, not getattr(layer, "synchronized", False), "synchronized=True")
        names = (["gamma"] if layer.scale else []) + (["beta"] if layer.center else [])
        self.slot = {name: i for i, name in enumerate(names + ["moving_mean", "moving_variance"])}

    def _affine(self, weights):
        gamma = weights[self.slot["gamma"]] if self.layer.scale else None
        beta = weights[self.slot["beta"]] if self.layer.center else None
        return gamma, beta

    def forward(self, ctx, weights, inputs):
        x = inputs[0]
        require(self, self.layer.axis in (-1, x.shape.rank - 1), f"axis={self.layer.axis} (only the last axis)")
        gamma, beta = self._affine(weights)
        epsilon = self.layer.epsilon
        reduce_axes = list(range(x.shape.rank - 1))
        if ctx.training and self.layer.trainable:
            rows = ctx.row_mask(x.shape.rank)
            real_rows = tf.reduce_sum(ctx.mask)
            # An all-padding batch has no statistics: divide by 1 instead of 0, keep the moving ones.
            count = tf.maximum(real_rows, 1.0) * float(x.shape[1:-1].num_elements())
            mean = tf.reduce_sum(x * rows, axis=reduce_axes) / count
            centered = x - mean
            variance = tf.reduce_sum(centered * centered * rows, axis=reduce_axes) / count
            momentum = self.layer.momentum
            for name, batch_value in (("moving_mean", mean), ("moving_variance", variance)):
                moving = weights[self.slot[name]]
                updated = moving * momentum + batch_value * (1.0 - momentum)
                ctx.updates.append((self.weight_indices[self.slot[name]], tf.where(real_rows > 0.0, updated, moving)))
        else:
            rows, count = None, None
            mean, variance = weights[self.slot["moving_mean"]], weights[self.slot["moving_variance"]]
            centered = x - mean
        inv_std = tf.math.rsqrt(variance + epsilon)
        x_hat = centered * inv_std
        y = x_hat * gamma if gamma is not None else x_hat
        if beta is not None:
            y = y + beta
        return y, (x_hat, inv_std, rows, count, reduce_axes)

    def backward(self, cache, weights, dy, need_input_grads):
        x_hat, inv_std, rows, count, reduce_axes = cache
        gamma, _ = self._affine(weights)
        grads = []
        if self.layer.scale:
            grads.append(tf.reduce_sum(dy * x_hat, axis=reduce_axes))
        if self.layer.center:
            grads.append(tf.reduce_sum(dy, axis=reduce_axes))
        grads += [None, None]  # moving statistics are updated, not trained
        if not need_input_grads:
            return [None], grads
        dx_hat = dy * gamma if gamma is not None else dy
        if rows is None:  # moving statistics are constants of the step
            return [dx_hat * inv_std], grads
        mean_dx_hat = tf.reduce_sum(dx_hat, axis=reduce_axes) / count
        mean_dx_hat_x_hat = tf.reduce_sum(dx_hat * x_hat * rows, axis=reduce_axes) / count
        dx = (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat) * inv_std * rows
        return [dx], grads
