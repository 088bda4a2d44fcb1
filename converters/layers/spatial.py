"""Index arithmetic shared by convolutions and pooling: SAME padding, strided scatter."""

from __future__ import annotations

import tensorflow as tf


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """(output size, pad before, pad after) of TensorFlow's SAME padding along one axis."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, total // 2, total - total // 2


def padding_plan(shape: list[int], kernel: tuple[int, int], strides: tuple[int, int],
                 padding: str) -> tuple[tuple[int, int], tuple[tuple[int, int], tuple[int, int]]]:
    """Output (height, width) and ((top, bottom), (left, right)) padding of an NHWC window op."""
    outs, pads = [], []
    for size, k, s in zip(shape[1:3], kernel, strides):
        if padding == "same":
            out, before, after = same_padding(size, k, s)
        else:
            out, before, after = (size - k) // s + 1, 0, 0
        outs.append(out)
        pads.append((before, after))
    return (outs[0], outs[1]), (pads[0], pads[1])


def pad_spatial(x: tf.Tensor, pads, value: float = 0.0) -> tf.Tensor:
    """Pad the H and W axes of an NHWC tensor (no-op when there is nothing to pad)."""
    if not any(sum(p) for p in pads):
        return x
    return tf.pad(x, [[0, 0], list(pads[0]), list(pads[1]), [0, 0]], constant_values=value)


def dilate_spatial(g: tf.Tensor, strides: tuple[int, int]) -> tf.Tensor:
    """Insert stride-1 zeros between rows and columns: [B,H,W,C] -> [B,(H-1)sh+1,(W-1)sw+1,C]."""
    b, h, w, c = g.shape
    sh, sw = strides
    if sh > 1:
        g = tf.reshape(g, [b, h, 1, w * c])
        g = tf.pad(g, [[0, 0], [0, 0], [0, sh - 1], [0, 0]])
        g = tf.reshape(g, [b, h * sh, w, c])[:, : (h - 1) * sh + 1]
    if sw > 1:
        rows = g.shape[1]
        g = tf.reshape(g, [b * rows, w, 1, c])
        g = tf.pad(g, [[0, 0], [0, 0], [0, sw - 1], [0, 0]])
        g = tf.reshape(g, [b, rows, w * sw, c])[:, :, : (w - 1) * sw + 1]
    return g


def window_slice(xp: tf.Tensor, row: int, col: int, out_hw: tuple[int, int],
                 strides: tuple[int, int]) -> tf.Tensor:
    """Element (row, col) of every window: xp[:, row::sh, col::sw] cut to the output size."""
    (oh, ow), (sh, sw) = out_hw, strides
    return xp[:, row: row + (oh - 1) * sh + 1: sh, col: col + (ow - 1) * sw + 1: sw, :]


def scatter_window(g: tf.Tensor, row: int, col: int, strides: tuple[int, int],
                   padded_hw: tuple[int, int]) -> tf.Tensor:
    """Inverse of window_slice: put g[:, i, j] at (row + i*sh, col + j*sw) of a zero [B,Hp,Wp,C]."""
    g = dilate_spatial(g, strides)
    hp, wp = padded_hw
    return tf.pad(g, [[0, 0], [row, hp - row - g.shape[1]], [col, wp - col - g.shape[2]], [0, 0]])


def crop_spatial(x: tf.Tensor, pads, hw: tuple[int, int]) -> tf.Tensor:
    """Remove the padding that pad_spatial added."""
    (top, _), (left, _) = pads
    return x[:, top: top + hw[0], left: left + hw[1], :]
