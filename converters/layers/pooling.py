"""Max, average and global average pooling with window-by-window backward passes."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from converters.activations import positive_step
from converters.layers.base import Lowering, check_common_options, require
from converters.layers.spatial import crop_spatial, pad_spatial, padding_plan, scatter_window, window_slice

_LOWEST_FLOAT32 = float(np.finfo(np.float32).min)


class _PoolingLowering(Lowering):
    def __init__(self, layer: Any, weight_indices: list[int]):
        super().__init__(layer, weight_indices)
        check_common_options(self)
        require(self, layer.padding in ("same", "valid"), f"padding='{layer.padding}'")
        self.pool = tuple(int(p) for p in layer.pool_size)
        self.strides = tuple(int(s) for s in (layer.strides or layer.pool_size))

    def _plan(self, x: tf.Tensor):
        return padding_plan(x.shape, self.pool, self.strides, self.layer.padding)

    def _offsets(self):
        return [(row, col) for row in range(self.pool[0]) for col in range(self.pool[1])]

    def _tiled(self) -> bool:
        """Windows that tile the input (pool == strides): every element is in at most one window."""
        return self.pool == self.strides

    def _window_elements(self, x, out_hw, pads, fill: float = 0.0):
        """A function (row, col) -> element (row, col) of every window, [B,Ho,Wo,C] or, when the
        windows tile the input, [B*Ho,1,Wo,C] taken from one reshape with unit-stride slices
        (the default delegate runs those; strided slices fall back to slow builtin kernels)."""
        if not self._tiled():
            xp = pad_spatial(x, pads, fill)
            return lambda row, col: window_slice(xp, row, col, out_hw, self.strides)
        (oh, ow), (ph, pw), (b, _, _, c) = out_hw, self.pool, x.shape
        xp = pad_spatial(x, pads, fill)
        if tuple(xp.shape[1:3]) != (oh * ph, ow * pw):
            xp = xp[:, : oh * ph, : ow * pw, :]                           # whole windows only (VALID)
        blocks = tf.reshape(xp, [b * oh, ph, ow, pw * c])
        return lambda row, col: blocks[:, row: row + 1, :, col * c: (col + 1) * c]

    def _per_window(self, t, out_hw):
        """A [B,Ho,Wo,C] tensor in the layout of _window_elements."""
        if not self._tiled():
            return t
        return tf.reshape(t, [t.shape[0] * out_hw[0], 1, out_hw[1], t.shape[3]])

    def _gather_back(self, contributions, x, pads, out_hw):
        """Sum per-offset gradients (layout of _window_elements) back onto the input's positions."""
        if not self._tiled():
            hp = x.shape[1] + sum(pads[0])
            wp = x.shape[2] + sum(pads[1])
            total = tf.add_n([scatter_window(g, row, col, self.strides, (hp, wp))
                              for (row, col), g in contributions])
            return crop_spatial(total, pads, (x.shape[1], x.shape[2]))
        (oh, ow), (ph, pw), (b, h, w, c) = out_hw, self.pool, x.shape
        by_offset = dict(contributions)
        rows = [tf.concat([by_offset[(row, col)] for col in range(pw)], axis=-1) if pw > 1 else by_offset[(row, 0)]
                for row in range(ph)]
        total = tf.concat(rows, axis=1) if ph > 1 else rows[0]            # [B*Ho, ph, Wo, pw*C]
        total = tf.reshape(total, [b, oh * ph, ow * pw, c])
        total = crop_spatial(total, pads, (h, w))
        missing_h, missing_w = h - total.shape[1], w - total.shape[2]  # VALID: rows no window covers
        if missing_h or missing_w:
            total = tf.pad(total, [[0, 0], [0, missing_h], [0, missing_w], [0, 0]])
        return total


class MaxPooling2DLowering(_PoolingLowering):
    """The gradient goes to the first maximum of each window, as TensorFlow's MaxPoolGrad does."""

    def forward(self, ctx, weights, inputs):
        x = inputs[0]
        y = tf.nn.max_pool2d(x, list(self.pool), list(self.strides), self.layer.padding.upper())
        return y, (x, y)

    def backward(self, cache, weights, dy, need_input_grads):
        x, y = cache
        out_hw, pads = self._plan(x)
        element = self._window_elements(x, out_hw, pads, _LOWEST_FLOAT32)
        y, dy = self._per_window(y, out_hw), self._per_window(dy, out_hw)
        taken = tf.zeros_like(y)
        contributions = []
        for row, col in self._offsets():
            is_max = 1.0 - positive_step(y - element(row, col))        # element <= y, so y == element
            first = is_max * (1.0 - taken)
            taken = taken + first
            contributions.append(((row, col), dy * first))
        return [self._gather_back(contributions, x, pads, out_hw)], []


class AveragePooling2DLowering(_PoolingLowering):
    """Each window's gradient is spread over its real (unpadded) elements, as TF averages them."""

    def forward(self, ctx, weights, inputs):
        x = inputs[0]
        return tf.nn.avg_pool2d(x, list(self.pool), list(self.strides), self.layer.padding.upper()), x

    def _window_sizes(self, x) -> np.ndarray:
        """How many real elements each output window covers, [1, Ho, Wo, 1]."""
        (oh, ow), pads = self._plan(x)
        real = np.pad(np.ones(x.shape[1:3], np.float32), pads)
        sizes = np.zeros((oh, ow), np.float32)
        for row, col in self._offsets():
            sizes += real[row: row + (oh - 1) * self.strides[0] + 1: self.strides[0],
                          col: col + (ow - 1) * self.strides[1] + 1: self.strides[1]]
        return sizes[None, :, :, None]

    def backward(self, cache, weights, dy, need_input_grads):
        x = cache
        out_hw, pads = self._plan(x)
        share = self._per_window(dy / self._window_sizes(x), out_hw)
        return [self._gather_back([(offset, share) for offset in self._offsets()], x, pads, out_hw)], []


class GlobalAveragePooling2DLowering(Lowering):
    """Mean over height and width; the gradient is dy / (H*W) broadcast back."""

    def __init__(self, layer: Any, weight_indices: list[int]):
        super().__init__(layer, weight_indices)
        check_common_options(self)

    def forward(self, ctx, weights, inputs):
        x = inputs[0]
        return tf.reduce_mean(x, axis=[1, 2], keepdims=bool(self.layer.keepdims)), x.shape

    def backward(self, cache, weights, dy, need_input_grads):
        b, h, w, c = cache
        dy = tf.reshape(dy, [b, 1, 1, c]) / float(h * w)
        return [tf.broadcast_to(dy, cache)], []
