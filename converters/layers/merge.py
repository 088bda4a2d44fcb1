"""Add and Concatenate, the joins of functional models."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from converters.layers.base import Lowering, require


class AddLowering(Lowering):
    """Sum of same-shaped inputs; each input receives dy unchanged."""

    def forward(self, ctx, weights, inputs):
        shapes = {tuple(x.shape) for x in inputs}
        require(self, len(shapes) == 1, f"inputs of different shapes {sorted(shapes)} (no broadcasting)")
        return tf.add_n(inputs), len(inputs)

    def backward(self, cache, weights, dy, need_input_grads):
        return [dy] * cache, []


class ConcatenateLowering(Lowering):
    """Concatenation along an axis; dy is split back into the inputs' sizes."""

    def __init__(self, layer: Any, weight_indices: list[int]):
        super().__init__(layer, weight_indices)
        self.axis = layer.axis

    def forward(self, ctx, weights, inputs):
        return tf.concat(inputs, axis=self.axis), [x.shape[self.axis] for x in inputs]

    def backward(self, cache, weights, dy, need_input_grads):
        return list(tf.split(dy, cache, axis=self.axis)), []
