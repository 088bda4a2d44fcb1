"""The lowered Keras graph as an ArtifactModule whose tf.functions become the artifact's signatures.

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
from converters.module import ArtifactModule, weight_key

METRIC_VARIABLES = ("loss_sum", "num_examples", "num_batches", "correct")


def metric_variable_names(track_accuracy: bool) -> list[str]:
    """The unfinalized metric variables a Keras model's artifact reports, in report order."""
    return [name for name in METRIC_VARIABLES if track_accuracy or name != "correct"]


def find_logits_node(graph: ModelGraph, loss: LossSpec) -> Node | None:
    """The final softmax/sigmoid node whose input Keras would use as logits for `loss`, if any."""
    if loss.name not in CROSS_ENTROPIES or not graph.nodes or loss.ignore_class is not None:
        return None  # Keras' ignore_class masks the output first, which hides the softmax from it
    last = graph.nodes[graph.output - 1]
    if isinstance(last.lowering, ActivationLowering) and last.lowering.name in LOGIT_ACTIVATIONS \
            and not getattr(last.lowering, "hides_logits", False):
        return last
    return None


class TrainableModule(ArtifactModule):
    """A lowered Keras graph: its weights, metric variables and hand-written training step."""

    def __init__(self, graph: ModelGraph, loss: LossSpec, optimizer: dict[str, Any],
                 x_spec: tf.TensorSpec, y_spec: tf.TensorSpec, track_accuracy: bool, proximal: bool = False):
        model_weights = [tf.Variable(variable.numpy(), name=weight_key(i)) for i, variable in enumerate(graph.weights)]
        super().__init__(model_weights, graph.trainable, optimizer, x_spec, y_spec, proximal)
        self._graph = graph
        self._loss = loss
        self._metric_names = metric_variable_names(track_accuracy)
        self.metrics = {name: tf.Variable(0.0, name=name) for name in self._metric_names}
        self._logits_node = find_logits_node(graph, loss)

    @property
    def metric_names(self) -> list[str]:
        return list(self._metric_names)

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
        self.apply_gradients(weights, weight_grads)
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

    def metric_values(self) -> dict[str, tf.Tensor]:
        return {name: variable.read_value() for name, variable in self.metrics.items()}

    def zero_metrics(self) -> None:
        for variable in self.metrics.values():
            variable.assign(0.0)
