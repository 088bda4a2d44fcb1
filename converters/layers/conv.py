"""Conv2D and DepthwiseConv2D with backward passes made of convolutions the builtins have."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from converters.layers.base import Lowering, check_common_options, require
from converters.layers.spatial import (conv_filter_grad, conv_matmul, crop_spatial, dilate_spatial,
                                       pad_spatial, padding_plan, patch_rows, window_slice)


class _WindowedLowering(Lowering):
    """Options shared by the convolutions: strides, padding, no dilation, no groups."""

    def __init__(self, layer: Any, weight_indices: list[int]):
        super().__init__(layer, weight_indices)
        check_common_options(self)
        require(self, tuple(layer.dilation_rate) == (1, 1), f"dilation_rate={layer.dilation_rate}")
        require(self, layer.padding in ("same", "valid"), f"padding='{layer.padding}'")
        self.strides = tuple(int(s) for s in layer.strides)
        self.kernel_hw = tuple(int(k) for k in layer.kernel_size)

    def _plan(self, x: tf.Tensor):
        return padding_plan(x.shape, self.kernel_hw, self.strides, self.layer.padding)


def _column_block(xp: tf.Tensor, kw: int, ow: int) -> tf.Tensor:
    """[B, Hp, Wp, C] -> [B, Hp, Wo, kw*C]: the kw stride-1 column windows side by side.

    patch_rows builds the same tensor before slicing it into kernel-row blocks, and the
    converter merges the two, so keeping it for the backward pass costs no extra work.
    """
    return tf.concat([xp[:, :, col: col + ow, :] for col in range(kw)], axis=-1)


def _filter_grad_from_columns(cols: tf.Tensor, dy: tf.Tensor, kernel_shape) -> tf.Tensor:
    """Filter gradient of a stride-1 convolution from its column block [B, Ho+kh-1, Wo, kw*Cin].

    Kernel row r's gradient is cols^T @ (dy moved down r rows, zero elsewhere). Caching the
    column block instead of the kh im2col blocks keeps about 1/kh of their memory alive
    between the passes, and the shifted dy exists only in the backward pass, so the converter
    cannot hoist these matmuls (and their inputs) into the forward pass's delegate partition.
    """
    kh, kw, cin, cout = kernel_shape
    hp, oh = cols.shape[1], dy.shape[1]
    flat_cols = tf.reshape(cols, [-1, kw * cin])
    shifted = tf.concat([tf.pad(dy, [[0, 0], [r, hp - oh - r], [0, 0], [0, 0]]) for r in range(kh)], axis=-1)
    grads = tf.matmul(flat_cols, tf.reshape(shifted, [-1, kh * cout]), transpose_a=True)   # [kw*Cin, kh*Cout]
    return tf.transpose(tf.reshape(grads, [kw, cin, kh, cout]), [2, 0, 1, 3])


class Conv2DLowering(_WindowedLowering):
    """Convolution as im2col + MATMUL, forward and backward.

    The filter lives in a resource variable, so the builtin CONV_2D and TRANSPOSE_CONV see a
    non-constant filter: the default XNNPACK delegate refuses them and the builtin kernels
    run several times slower than Keras. BATCH_MATMUL with two non-constant operands is
    delegated, so every convolution here is matmuls over im2col blocks (spatial.patch_rows):
    forward patches @ W, filter gradient patches^T @ dy (patches cached from the forward
    pass; for stride 1 and wide blocks, the smaller column block, see _filter_grad_from_columns),
    input gradient patches(dy dilated by the stride, padded for a full correlation)
    @ W flipped and transposed.
    """

    def __init__(self, layer: Any, weight_indices: list[int]):
        super().__init__(layer, weight_indices)
        require(self, getattr(layer, "groups", 1) == 1, f"groups={layer.groups}")

    def forward(self, ctx, weights, inputs):
        x, kernel = inputs[0], weights[0]
        (oh, ow), pads = self._plan(x)
        xp = pad_spatial(x, pads)
        rows = patch_rows(xp, self.kernel_hw, (oh, ow), self.strides)
        y = tf.reshape(conv_matmul(rows, kernel), [x.shape[0], oh, ow, kernel.shape[3]])
        if self.layer.use_bias:
            y = y + weights[1]
        (kh, kw), cin = self.kernel_hw, x.shape[-1]
        if self.strides == (1, 1) and kh > 1 and kw * cin >= 64:  # conv_matmul's row-by-row case
            return y, (x.shape, pads, _column_block(xp, kw, ow))
        return y, (x.shape, pads, rows)

    def backward(self, cache, weights, dy, need_input_grads):
        x_shape, pads, patches = cache  # im2col blocks, or the column block they come from
        kernel = weights[0]
        kh, kw, cin, cout = kernel.shape
        b, oh, ow, _ = dy.shape
        dy2 = tf.reshape(dy, [b * oh * ow, cout])
        if isinstance(patches, list):
            grads = [conv_filter_grad(patches, dy2, kernel.shape)]
        else:
            grads = [_filter_grad_from_columns(patches, dy, kernel.shape)]
        if self.layer.use_bias:
            grads.append(tf.reduce_sum(dy2, axis=0))
        dx = None
        if need_input_grads:
            h, w = x_shape[1], x_shape[2]
            g = dilate_spatial(dy, self.strides)
            # dx[h] = sum_i g[h + top - (kh-1) + i] * W[kh-1-i]: pad g so output row h reads
            # rows h..h+kh-1, then a VALID correlation with the flipped kernel.
            top, left = kh - 1 - pads[0][0], kw - 1 - pads[1][0]
            g = tf.pad(g, [[0, 0], [top, h + kh - 1 - top - g.shape[1]],
                           [left, w + kw - 1 - left - g.shape[2]], [0, 0]])
            flipped = tf.transpose(tf.reverse(kernel, axis=[0, 1]), [0, 1, 3, 2])   # [kh, kw, Cout, Cin]
            dx = tf.reshape(conv_matmul(patch_rows(g, (kh, kw), (h, w), (1, 1)), flipped), x_shape)
        return [dx], grads


class DepthwiseConv2DLowering(_WindowedLowering):
    """Filter gradient as a sum over the kernel's window offsets; dx as a full depthwise
    convolution of the dilated dy with the flipped kernel."""

    def forward(self, ctx, weights, inputs):
        x = inputs[0]
        y = tf.nn.depthwise_conv2d(x, weights[0], strides=[1, *self.strides, 1],
                                   padding=self.layer.padding.upper())
        if self.layer.use_bias:
            y = y + weights[1]
        return y, x

    def backward(self, cache, weights, dy, need_input_grads):
        x, kernel = cache, weights[0]
        kh, kw, channels, multiplier = kernel.shape
        (oh, ow), pads = self._plan(x)
        xp = pad_spatial(x, pads)
        dy5 = tf.reshape(dy, [dy.shape[0], oh, ow, channels, multiplier])
        taps = []
        for row in range(kh):
            for col in range(kw):
                xs = window_slice(xp, row, col, (oh, ow), self.strides)
                taps.append(tf.reduce_sum(tf.expand_dims(xs, -1) * dy5, axis=[0, 1, 2]))
        grads = [tf.reshape(tf.stack(taps), kernel.shape)]
        if self.layer.use_bias:
            grads.append(tf.reduce_sum(dy, axis=[0, 1, 2]))
        dx = None
        if need_input_grads:
            hp, wp = xp.shape[1], xp.shape[2]
            g = dilate_spatial(dy, self.strides)
            g = tf.pad(g, [[0, 0], [kh - 1, hp - g.shape[1]], [kw - 1, wp - g.shape[2]], [0, 0]])
            flipped = tf.reshape(tf.reverse(kernel, axis=[0, 1]), [kh, kw, channels * multiplier, 1])
            full = tf.nn.depthwise_conv2d(g, flipped, strides=[1, 1, 1, 1], padding="VALID")
            full = tf.reduce_sum(tf.reshape(full, [x.shape[0], hp, wp, channels, multiplier]), axis=-1)
            dx = crop_spatial(full, pads, (x.shape[1], x.shape[2]))
        return [dx], grads
