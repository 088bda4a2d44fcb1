"""Conv2D and DepthwiseConv2D with backward passes made of convolutions the builtins have."""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from converters.layers.base import Lowering, check_common_options, require
from converters.layers.spatial import (crop_spatial, dilate_spatial, pad_spatial, padding_plan,
                                       window_slice)


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


class Conv2DLowering(_WindowedLowering):
    """dx by TRANSPOSE_CONV; the filter gradient as a convolution of transposed operands:
    the batch becomes the channel axis and dy, dilated by the stride, the filter."""

    def __init__(self, layer: Any, weight_indices: list[int]):
        super().__init__(layer, weight_indices)
        require(self, getattr(layer, "groups", 1) == 1, f"groups={layer.groups}")

    def forward(self, ctx, weights, inputs):
        x = inputs[0]
        y = tf.nn.conv2d(x, weights[0], strides=[1, *self.strides, 1], padding=self.layer.padding.upper())
        if self.layer.use_bias:
            y = y + weights[1]
        return y, x

    def backward(self, cache, weights, dy, need_input_grads):
        x, kernel = cache, weights[0]
        kh, kw = self.kernel_hw
        _, pads = self._plan(x)
        xp = pad_spatial(x, pads)
        x_t = tf.transpose(xp, [3, 1, 2, 0])           # [Cin, Hp, Wp, B]
        dy_t = tf.transpose(dy, [1, 2, 0, 3])          # [Ho, Wo, B, Cout]
        grad = tf.nn.conv2d(x_t, dy_t, strides=1, padding="VALID", dilations=list(self.strides))
        grad = tf.transpose(grad[:, :kh, :kw, :], [1, 2, 0, 3])  # [kh, kw, Cin, Cout]
        grads = [grad]
        if self.layer.use_bias:
            grads.append(tf.reduce_sum(dy, axis=[0, 1, 2]))
        dx = None
        if need_input_grads:
            dx = tf.nn.conv2d_transpose(dy, kernel, output_shape=x.shape,
                                        strides=[1, *self.strides, 1], padding=self.layer.padding.upper())
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
