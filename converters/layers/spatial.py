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
    """Remove the padding that pad_spatial added (no-op when the crop keeps the whole tensor: the
    converter would keep an identity slice, a copy)."""
    (top, _), (left, _) = pads
    if (top, left) == (0, 0) and x.shape[1] <= hw[0] and x.shape[2] <= hw[1]:
        return x
    return x[:, top: top + hw[0], left: left + hw[1], :]


def patch_rows(xp: tf.Tensor, kernel_hw: tuple[int, int], out_hw: tuple[int, int],
               strides: tuple[int, int]) -> list[tf.Tensor]:
    """im2col of an already padded NHWC tensor, one block per kernel row.

    [B,Hp,Wp,C] -> kh tensors [B*Ho*Wo, kw*C]; block `row` holds, for every output position,
    the kw*C inputs under kernel row `row`, ordered (col, channel) as kernel[row] reshaped to
    [kw*C, Cout]. A convolution is then kh matmuls; the default XNNPACK delegate runs those
    (BATCH_MATMUL with a non-constant filter), and the full [B*Ho*Wo, kh*kw*C] matrix never
    has to be concatenated.
    """
    (kh, kw), (oh, ow), (sh, sw) = kernel_hw, out_hw, strides
    b, _, _, c = xp.shape
    cols = [xp[:, :, col: col + (ow - 1) * sw + 1: sw, :] for col in range(kw)]
    xp = cols[0] if kw == 1 else tf.concat(cols, axis=-1)                     # [B, Hp, Wo, kw*C]
    return [tf.reshape(xp[:, row: row + (oh - 1) * sh + 1: sh], [b * oh * ow, kw * c]) for row in range(kh)]


def conv_matmul(rows: list[tf.Tensor], kernel: tf.Tensor) -> tf.Tensor:
    """sum over kernel rows of rows[row] @ kernel[row]: [M, kw*Cin] x [kh, kw, Cin, Cout] -> [M, Cout].

    Narrow blocks (a first layer's kw*Cin of a few channels) are joined into one matmul."""
    kh, kw, cin, cout = kernel.shape
    if kw * cin < 64 or kh == 1:
        cols = rows[0] if kh == 1 else tf.concat(rows, axis=-1)
        return tf.matmul(cols, tf.reshape(kernel, [kh * kw * cin, cout]))
    # SPLIT, not kernel[row]: a slice that drops an axis is left to a slow reference kernel.
    kernel_rows = tf.split(tf.reshape(kernel, [kh, kw * cin, cout]), kh, axis=0)
    total = None
    for block, kernel_row in zip(rows, kernel_rows):
        part = tf.matmul(block, tf.reshape(kernel_row, [kw * cin, cout]))
        total = part if total is None else total + part
    return total


def conv_filter_grad(rows: list[tf.Tensor], dy2: tf.Tensor, kernel_shape) -> tf.Tensor:
    """The filter gradient rows^T @ dy, [kh, kw, Cin, Cout], from patch_rows' blocks and dy [M, Cout]."""
    kh, kw, cin, cout = kernel_shape
    if kw * cin < 64 or kh == 1:
        cols = rows[0] if kh == 1 else tf.concat(rows, axis=-1)
        return tf.reshape(tf.matmul(cols, dy2, transpose_a=True), kernel_shape)
    grads = [tf.matmul(block, dy2, transpose_a=True) for block in rows]        # kh x [kw*Cin, Cout]
    return tf.reshape(tf.concat(grads, axis=0), kernel_shape)
