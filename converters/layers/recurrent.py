"""SimpleRNN, GRU and LSTM: unrolled over the fixed sequence length, back-propagation through time by hand.

The input projection x @ kernel (+ input bias) is one matmul over every time step; each step
then adds its recurrent term h @ recurrent_kernel. The backward pass walks the steps in
reverse, collects the per-step gradients of the input projection and of the recurrent term,
and turns them into weight gradients with one matmul each, so the unrolled graph grows by a
few elementwise ops per step, not by a weight-sized matmul per step.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from converters.activations import activation_name
from converters.layers.base import Lowering, require

_CELL_PENALTIES = ("kernel_regularizer", "recurrent_regularizer", "bias_regularizer",
                   "kernel_constraint", "recurrent_constraint", "bias_constraint")

State = tuple[tf.Tensor, ...]
# (operand [B, U], gradient [B, k]) pairs: recurrent_kernel's gradient is the concatenation,
# along its columns, of operand^T @ gradient summed over the steps
RecurrentTerms = tuple[tuple[tf.Tensor, tf.Tensor], ...]


def check_recurrent_options(lowering: Lowering) -> None:
    """Refuse what the unrolled lowering cannot honor: reversed or stateful runs, dropout, other activations."""
    layer, cell = lowering.layer, lowering.layer.cell
    require(lowering, not layer.go_backwards, "go_backwards=True")
    require(lowering, not layer.stateful, "stateful=True")
    require(lowering, not layer.return_state, "return_state=True")
    require(lowering, float(cell.dropout) == 0.0, f"dropout={cell.dropout}")
    require(lowering, float(cell.recurrent_dropout) == 0.0, f"recurrent_dropout={cell.recurrent_dropout}")
    for attribute in _CELL_PENALTIES:
        require(lowering, getattr(cell, attribute, None) is None, attribute)
    require(lowering, layer.activity_regularizer is None, "activity_regularizer")
    require(lowering, layer.compute_dtype == "float32",
            f"dtype policy '{layer.dtype_policy.name}' (only float32)")
    activation = activation_name(cell.activation)
    require(lowering, activation == "tanh", f"activation='{activation}' (only 'tanh')")
    if hasattr(cell, "recurrent_activation"):
        recurrent = activation_name(cell.recurrent_activation)
        require(lowering, recurrent == "sigmoid", f"recurrent_activation='{recurrent}' (only 'sigmoid')")


def _sigmoid_slope(y: tf.Tensor) -> tf.Tensor:
    """d sigmoid(x) / dx from the output y = sigmoid(x)."""
    return y * (1.0 - y)


def _tanh_slope(y: tf.Tensor) -> tf.Tensor:
    """d tanh(x) / dx from the output y = tanh(x)."""
    return 1.0 - y * y


class RecurrentLowering(Lowering):
    """The unrolled loop shared by the cells; a subclass writes one step forward and backward."""

    state_size = 1  # tensors of shape [B, units] carried between steps; the first is the output h

    def __init__(self, layer: Any, weight_indices: list[int]):
        super().__init__(layer, weight_indices)
        check_recurrent_options(self)
        self.units = int(layer.cell.units)
        self.use_bias = bool(layer.cell.use_bias)

    def input_bias(self, bias: tf.Tensor) -> tf.Tensor:
        """The part of the bias added to the input projection."""
        return bias

    def step(self, projected: tf.Tensor, state: State, recurrent_kernel: tf.Tensor,
             bias: tf.Tensor | None) -> tuple[State, Any]:
        """The next state from this step's input projection; and what step_backward needs."""
        raise NotImplementedError

    def step_backward(self, d_state: State, cache: Any, recurrent_kernel: tf.Tensor
                      ) -> tuple[tf.Tensor, RecurrentTerms, State]:
        """(d projected, recurrent-kernel terms, d previous state) from the gradient of the new state."""
        raise NotImplementedError

    def bias_grad(self, d_projected: tf.Tensor, d_recurrent: list[tf.Tensor]) -> tf.Tensor:
        """The bias gradient from d projected [N, G] and the recurrent terms' gradients, stacked over steps."""
        return tf.reduce_sum(d_projected, axis=0)

    def forward(self, ctx, weights, inputs):
        x = inputs[0]
        batch, steps, features = x.shape
        kernel, recurrent_kernel = weights[0], weights[1]
        bias = weights[2] if self.use_bias else None
        x2 = tf.reshape(x, [-1, features])
        projected = tf.matmul(x2, kernel)
        if bias is not None:
            projected = projected + self.input_bias(bias)
        projected = tf.unstack(tf.reshape(projected, [batch, steps, kernel.shape[-1]]), axis=1)
        state: State = tuple(tf.zeros([batch, self.units]) for _ in range(self.state_size))
        caches, outputs = [], []
        for t in range(steps):
            state, cache = self.step(projected[t], state, recurrent_kernel, bias)
            caches.append(cache)
            outputs.append(state[0])
        y = tf.stack(outputs, axis=1) if self.layer.return_sequences else outputs[-1]
        return y, (x2, x.shape, caches)

    def backward(self, cache, weights, dy, need_input_grads):
        x2, x_shape, caches = cache
        kernel, recurrent_kernel = weights[0], weights[1]
        steps = len(caches)
        dys = tf.unstack(dy, axis=1) if self.layer.return_sequences else None
        d_state: State = tuple(tf.zeros([dy.shape[0], self.units]) for _ in range(self.state_size))
        d_projected: list[tf.Tensor] = [None] * steps  # type: ignore[list-item]
        terms: list[RecurrentTerms] = [()] * steps
        for t in reversed(range(steps)):
            d_output = dys[t] if dys else (dy if t == steps - 1 else None)
            if d_output is not None:
                d_state = (d_state[0] + d_output, *d_state[1:])
            d_projected[t], terms[t], d_state = self.step_backward(d_state, caches[t], recurrent_kernel)
        d_proj = tf.reshape(tf.stack(d_projected, axis=1), [-1, kernel.shape[-1]])  # rows in x2's order
        d_recurrent, columns = [], []
        for block in range(len(terms[0])):
            operand = tf.concat([terms[t][block][0] for t in range(steps)], axis=0)
            grad = tf.concat([terms[t][block][1] for t in range(steps)], axis=0)
            d_recurrent.append(grad)
            columns.append(tf.matmul(operand, grad, transpose_a=True))
        grads = [tf.matmul(x2, d_proj, transpose_a=True),
                 columns[0] if len(columns) == 1 else tf.concat(columns, axis=1)]
        if self.use_bias:
            grads.append(self.bias_grad(d_proj, d_recurrent))
        dx = tf.reshape(tf.matmul(d_proj, kernel, transpose_b=True), x_shape) if need_input_grads else None
        return [dx], grads


class SimpleRNNLowering(RecurrentLowering):
    """h' = tanh(x @ kernel + h @ recurrent_kernel + bias)."""

    def step(self, projected, state, recurrent_kernel, bias):
        h = state[0]
        new_h = tf.math.tanh(projected + tf.matmul(h, recurrent_kernel))
        return (new_h,), (h, new_h)

    def step_backward(self, d_state, cache, recurrent_kernel):
        h, new_h = cache
        d_pre = d_state[0] * _tanh_slope(new_h)
        return d_pre, ((h, d_pre),), (tf.matmul(d_pre, recurrent_kernel, transpose_b=True),)


class LSTMLowering(RecurrentLowering):
    """Keras' LSTM: gates i, f, c, o in that column order; state (h, c)."""

    state_size = 2

    def step(self, projected, state, recurrent_kernel, bias):
        h, c = state
        z = projected + tf.matmul(h, recurrent_kernel)
        z_i, z_f, z_g, z_o = tf.split(z, 4, axis=1)
        i, f, g, o = tf.math.sigmoid(z_i), tf.math.sigmoid(z_f), tf.math.tanh(z_g), tf.math.sigmoid(z_o)
        new_c = f * c + i * g
        tanh_c = tf.math.tanh(new_c)
        return (o * tanh_c, new_c), (h, c, i, f, g, o, tanh_c)

    def step_backward(self, d_state, cache, recurrent_kernel):
        h, c, i, f, g, o, tanh_c = cache
        d_h, d_c = d_state
        d_c = d_c + d_h * o * _tanh_slope(tanh_c)
        d_z = tf.concat([d_c * g * _sigmoid_slope(i), d_c * c * _sigmoid_slope(f),
                         d_c * i * _tanh_slope(g), d_h * tanh_c * _sigmoid_slope(o)], axis=1)
        return d_z, ((h, d_z),), (tf.matmul(d_z, recurrent_kernel, transpose_b=True), d_c * f)


class GRULowering(RecurrentLowering):
    """Keras' GRU: gates z, r, h in that column order. With reset_after (Keras 3's default) the
    reset gate scales h @ recurrent_kernel_h and the bias has an input row and a recurrent row;
    without it the reset gate scales h before its product with recurrent_kernel_h."""

    def __init__(self, layer: Any, weight_indices: list[int]):
        super().__init__(layer, weight_indices)
        self.reset_after = bool(layer.cell.reset_after)

    def input_bias(self, bias):
        return bias[0] if self.reset_after else bias

    def step(self, projected, state, recurrent_kernel, bias):
        h = state[0]
        x_z, x_r, x_h = tf.split(projected, 3, axis=1)
        units = self.units
        if self.reset_after:
            inner = tf.matmul(h, recurrent_kernel)
            if bias is not None:
                inner = inner + bias[1]
            inner_z, inner_r, inner_h = tf.split(inner, 3, axis=1)
            z, r = tf.math.sigmoid(x_z + inner_z), tf.math.sigmoid(x_r + inner_r)
            candidate = tf.math.tanh(x_h + r * inner_h)
            cache = (h, z, r, candidate, inner_h)
        else:
            inner_z, inner_r = tf.split(tf.matmul(h, recurrent_kernel[:, :2 * units]), 2, axis=1)
            z, r = tf.math.sigmoid(x_z + inner_z), tf.math.sigmoid(x_r + inner_r)
            reset_h = r * h
            candidate = tf.math.tanh(x_h + tf.matmul(reset_h, recurrent_kernel[:, 2 * units:]))
            cache = (h, z, r, candidate, reset_h)
        return (z * h + (1.0 - z) * candidate,), cache

    def step_backward(self, d_state, cache, recurrent_kernel):
        h, z, r, candidate, extra = cache
        d_new = d_state[0]
        d_zpre = d_new * (h - candidate) * _sigmoid_slope(z)
        d_hpre = d_new * (1.0 - z) * _tanh_slope(candidate)
        d_h = d_new * z
        units = self.units
        if self.reset_after:
            inner_h = extra
            d_rpre = d_hpre * inner_h * _sigmoid_slope(r)
            d_inner = tf.concat([d_zpre, d_rpre, d_hpre * r], axis=1)
            d_projected = tf.concat([d_zpre, d_rpre, d_hpre], axis=1)
            d_h = d_h + tf.matmul(d_inner, recurrent_kernel, transpose_b=True)
            return d_projected, ((h, d_inner),), (d_h,)
        reset_h = extra
        d_reset_h = tf.matmul(d_hpre, recurrent_kernel[:, 2 * units:], transpose_b=True)
        d_rpre = d_reset_h * h * _sigmoid_slope(r)
        d_zr = tf.concat([d_zpre, d_rpre], axis=1)
        d_h = d_h + d_reset_h * r + tf.matmul(d_zr, recurrent_kernel[:, :2 * units], transpose_b=True)
        d_projected = tf.concat([d_zpre, d_rpre, d_hpre], axis=1)
        return d_projected, ((h, d_zr), (reset_h, d_hpre)), (d_h,)

    def bias_grad(self, d_projected, d_recurrent):
        d_input = tf.reduce_sum(d_projected, axis=0)
        if not self.reset_after:
            return d_input
        return tf.stack([d_input, tf.reduce_sum(d_recurrent[0], axis=0)])
