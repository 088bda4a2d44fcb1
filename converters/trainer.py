"""The tf.Module whose tf.functions become the artifact's signatures (docs/artifact.md).

Training runs the lowered graph forward, then each node's hand-written backward pass in
reverse order; no tf.GradientTape is involved, so no TF gradient kernel (ReluGrad,
Conv2DBackpropFilter, ...) reaches the converter and every op stays a TFLite builtin.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from converters.activations import LOGIT_ACTIVATIONS
from converters.graph import ModelGraph, Node
from converters.layers import ForwardContext
from converters.layers.core import ActivationLowering
from converters.losses import CROSS_ENTROPIES, LossSpec, correct_predictions, masked_loss
from converters.optimizers import OptimizerState

METRIC_VARIABLES = ("loss_sum", "num_examples", "num_batches", "correct")


def weight_key(index: int) -> str:
    """Signature name of weight `index` in get_weights/set_weights."""
    return f"w_{index:03d}"


def _signature(function: Any, input_signature: list[tf.TensorSpec]) -> Any:
    """A graph function for one signature; autograph is off because the lowering has no
    tensor-dependent Python control flow (and tracing is about a third faster without it)."""
    return tf.function(function, input_signature=input_signature, autograph=False)


class TrainableModule(tf.Module):
    """Weights, optimizer and metric variables of one model, and its signature functions."""

    def __init__(self, graph: ModelGraph, loss: LossSpec, optimizer: dict[str, Any],
                 x_spec: tf.TensorSpec, y_spec: tf.TensorSpec, track_accuracy: bool, proximal: bool = False):
        super().__init__(name="fedge_model")
        self._graph = graph
        self._loss = loss
        self.model_weights = [tf.Variable(variable.numpy(), name=weight_key(i))
                              for i, variable in enumerate(graph.weights)]
        self._trainable = [i for i, trainable in enumerate(graph.trainable) if trainable]
        self.optimizer = OptimizerState(optimizer, [tuple(self.model_weights[i].shape) for i in self._trainable])
        self._metric_names = [name for name in METRIC_VARIABLES if track_accuracy or name != "correct"]
        self._proximal = proximal
        if proximal:  # FedProx: the weights set by set_weights anchor the proximal term mu/2 ||w - anchor||^2
            self.anchors = [tf.Variable(self.model_weights[i].read_value(), name=f"anchor_{i:03d}")
                            for i in self._trainable]
            self.proximal_mu = tf.Variable(0.0, name="proximal_mu")
        self.metrics = {name: tf.Variable(0.0, name=name) for name in self._metric_names}
        self._logits_node = self._find_logits_node()
        mask_spec = tf.TensorSpec([x_spec.shape[0]], tf.float32, name="mask")
        weight_specs = [tf.TensorSpec(w.shape, w.dtype, name=weight_key(i)) for i, w in enumerate(self.model_weights)]
        self.signature_functions = {
            "train": _signature(self._train, input_signature=[x_spec, y_spec, mask_spec]),
            "evaluate": _signature(self._evaluate, input_signature=[x_spec, y_spec, mask_spec]),
            "forward": _signature(self._predict, input_signature=[x_spec]),
            "report_metrics": _signature(self._report_metrics, input_signature=[]),
            "reset_metrics": _signature(self._reset_metrics, input_signature=[]),
            "get_weights": _signature(self._get_weights, input_signature=[]),
            "set_weights": _signature(self._set_weights, input_signature=weight_specs),
            "set_learning_rate": _signature(self._set_learning_rate, input_signature=[
                tf.TensorSpec([], tf.float32, name="learning_rate")]),
            "reset_optimizer": _signature(self._reset_optimizer, input_signature=[]),
        }
        if proximal:
            self.signature_functions["set_proximal_mu"] = _signature(self._set_proximal_mu, input_signature=[
                tf.TensorSpec([], tf.float32, name="proximal_mu")])

    @property
    def metric_names(self) -> list[str]:
        return list(self._metric_names)

    def _find_logits_node(self) -> Node | None:
        """The final softmax/sigmoid node whose input Keras would use as logits, if any."""
        if self._loss.name not in CROSS_ENTROPIES or not self._graph.nodes:
            return None
        last = self._graph.nodes[self._graph.output - 1]
        if isinstance(last.lowering, ActivationLowering) and last.lowering.name in LOGIT_ACTIVATIONS:
            return last
        return None

    def _run_forward(self, x: tf.Tensor, mask: tf.Tensor, training: bool):
        ctx = ForwardContext(training=training, mask=mask)
        weights = [variable.read_value() for variable in self.model_weights]
        values: dict[int, tf.Tensor] = {0: x}
        caches = []
        for node in self._graph.nodes:
            output, cache = node.lowering.forward(
                ctx, [weights[i] for i in node.lowering.weight_indices], [values[i] for i in node.inputs])
            values[node.output] = output
            caches.append(cache)
        return values, caches, ctx, weights

    def _loss_input(self, values: dict[int, tf.Tensor]) -> tuple[tf.Tensor, bool]:
        if self._logits_node is not None:
            return values[self._logits_node.inputs[0]], True
        return values[self._graph.output], self._loss.from_logits

    def _accumulate_metrics(self, values, y, mask, per_example_loss) -> None:
        self.metrics["loss_sum"].assign_add(tf.reduce_sum(per_example_loss * mask))
        self.metrics["num_examples"].assign_add(tf.reduce_sum(mask))
        self.metrics["num_batches"].assign_add(1.0)
        if "correct" in self.metrics:
            output = values[self._graph.output]
            logits = self._loss.from_logits and self._logits_node is None
            self.metrics["correct"].assign_add(
                tf.reduce_sum(correct_predictions(self._loss, output, y, logits) * mask))

    def _backward(self, caches, weights, d_loss_input: tf.Tensor) -> dict[int, tf.Tensor]:
        """Gradients of the loss for every trainable weight index that the loss depends on."""
        nodes = self._graph.nodes
        if self._logits_node is not None:
            grads_by_value = {self._logits_node.inputs[0]: d_loss_input}
        else:
            grads_by_value = {self._graph.output: d_loss_input}
        weight_grads: dict[int, tf.Tensor] = {}
        for position in reversed(range(len(nodes))):
            node = nodes[position]
            dy = grads_by_value.pop(node.output, None)
            if dy is None:
                continue
            lowering = node.lowering
            input_grads, grads = lowering.backward(
                caches[position], [weights[i] for i in lowering.weight_indices], dy,
                need_input_grads=any(value != 0 for value in node.inputs))
            for value, grad in zip(node.inputs, input_grads):
                if value != 0 and grad is not None:
                    grads_by_value[value] = grads_by_value[value] + grad if value in grads_by_value else grad
            for index, grad in zip(lowering.weight_indices, grads):
                if grad is not None and self._graph.trainable[index]:
                    weight_grads[index] = weight_grads[index] + grad if index in weight_grads else grad
        return weight_grads

    def _train(self, x, y, mask):
        values, caches, ctx, weights = self._run_forward(x, mask, training=True)
        loss_input, logits = self._loss_input(values)
        loss, per_example, d_loss_input = masked_loss(self._loss, loss_input, y, mask, logits)
        weight_grads = self._backward(caches, weights, d_loss_input)
        for index, value in ctx.updates:
            self.model_weights[index].assign(value)
        grads = [weight_grads.get(i, tf.zeros_like(weights[i])) for i in self._trainable]
        if self._proximal:
            mu = self.proximal_mu.read_value()
            grads = [grad + mu * (weights[i] - anchor) for grad, i, anchor in zip(grads, self._trainable, self.anchors)]
        self.optimizer.apply([self.model_weights[i] for i in self._trainable], [weights[i] for i in self._trainable],
                             grads)
        self._accumulate_metrics(values, y, mask, per_example)
        return {"loss": loss}

    def _evaluate(self, x, y, mask):
        values, _, _, _ = self._run_forward(x, mask, training=False)
        loss_input, logits = self._loss_input(values)
        loss, per_example, _ = masked_loss(self._loss, loss_input, y, mask, logits)
        self._accumulate_metrics(values, y, mask, per_example)
        return {"loss": loss}

    def _predict(self, x):
        values, _, _, _ = self._run_forward(x, tf.ones([x.shape[0]]), training=False)
        return {"output": values[self._graph.output]}

    def _report_metrics(self):
        return {name: variable.read_value() for name, variable in self.metrics.items()}

    def _reset_metrics(self):
        report = {name: tf.identity(variable.read_value()) for name, variable in self.metrics.items()}
        for variable in self.metrics.values():
            variable.assign(0.0)
        return report

    def _get_weights(self):
        return {weight_key(i): variable.read_value() for i, variable in enumerate(self.model_weights)}

    def _set_weights(self, *weights):
        for variable, value in zip(self.model_weights, weights):
            variable.assign(value)
        if self._proximal:
            for anchor, i in zip(self.anchors, self._trainable):
                anchor.assign(weights[i])
        return {"num_weights": tf.constant(len(weights), tf.int32)}

    def _set_learning_rate(self, learning_rate):
        self.optimizer.learning_rate.assign(learning_rate)
        return {"learning_rate": self.optimizer.learning_rate.read_value()}

    def _set_proximal_mu(self, proximal_mu):
        self.proximal_mu.assign(proximal_mu)
        return {"proximal_mu": self.proximal_mu.read_value()}

    def _reset_optimizer(self):
        self.optimizer.reset()
        return {"iterations": self.optimizer.iterations.read_value()}
