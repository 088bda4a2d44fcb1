"""The tf.Module behind every artifact: the weight, optimizer and metric signatures all lowerings share.

A lowering (the Keras graph in converters/trainer.py, a custom fedge Model in
converters/custom.py) subclasses `ArtifactModule` and supplies how a batch trains,
evaluates and predicts, and where its metric variables live; everything else in
docs/artifact.md (get/set weights, learning rate, optimizer reset, FedProx) is here once.
"""

from __future__ import annotations

import abc
from typing import Any

import tensorflow as tf

from converters.optimizers import OptimizerState


def weight_key(index: int) -> str:
    """Signature name of weight `index` in get_weights/set_weights."""
    return f"w_{index:03d}"


class ArtifactModule(tf.Module, abc.ABC):
    """Weights (trainable and not), optimizer state, FedProx anchors and the shared signatures."""

    # The Keras lowering has no tensor-dependent Python control flow, and tracing is about a
    # third faster without autograph; a custom model's forward pass may need it.
    autograph = False

    def __init__(self, model_weights: list[tf.Variable], trainable: list[bool], optimizer: dict[str, Any],
                 x_spec: tf.TensorSpec, y_spec: tf.TensorSpec, proximal: bool):
        super().__init__(name="fedge_model")
        self.model_weights = list(model_weights)
        self.trainable_flags = list(trainable)
        self.x_spec, self.y_spec = x_spec, y_spec
        self.trainable_indices = [i for i, flag in enumerate(trainable) if flag]
        self.optimizer = OptimizerState(optimizer, [tuple(self.model_weights[i].shape) for i in self.trainable_indices])
        self.proximal = proximal
        if proximal:  # FedProx: the weights set by set_weights anchor the proximal term mu/2 ||w - anchor||^2
            self.anchors = [tf.Variable(self.model_weights[i].read_value(), name=f"anchor_{i:03d}")
                            for i in self.trainable_indices]
            self.proximal_mu = tf.Variable(0.0, name="proximal_mu")
        mask_spec = tf.TensorSpec([x_spec.shape[0]], tf.float32, name="mask")
        weight_specs = [tf.TensorSpec(w.shape, w.dtype, name=weight_key(i)) for i, w in enumerate(self.model_weights)]
        self.signature_functions = {
            "train": self._signature(self._train, [x_spec, y_spec, mask_spec]),
            "evaluate": self._signature(self._evaluate, [x_spec, y_spec, mask_spec]),
            "forward": self._signature(self._predict, [x_spec]),
            "report_metrics": self._signature(self.metric_values, []),
            "reset_metrics": self._signature(self._reset_metrics, []),
            "get_weights": self._signature(self._get_weights, []),
            "set_weights": self._signature(self._set_weights, weight_specs),
            "set_learning_rate": self._signature(self._set_learning_rate, [
                tf.TensorSpec([], tf.float32, name="learning_rate")]),
            "reset_optimizer": self._signature(self._reset_optimizer, []),
        }
        if proximal:
            self.signature_functions["set_proximal_mu"] = self._signature(self._set_proximal_mu, [
                tf.TensorSpec([], tf.float32, name="proximal_mu")])

    def _signature(self, function: Any, input_signature: list[tf.TensorSpec]) -> Any:
        return tf.function(function, input_signature=input_signature, autograph=self.autograph)

    @property
    @abc.abstractmethod
    def metric_names(self) -> list[str]:
        """Names of the unfinalized metric variables, in report order."""

    @abc.abstractmethod
    def metric_values(self) -> dict[str, tf.Tensor]:
        """The unfinalized metrics as float32 scalars (the `report_metrics` signature)."""

    @abc.abstractmethod
    def zero_metrics(self) -> None:
        """Set every metric variable to zero."""

    @abc.abstractmethod
    def _train(self, x, y, mask) -> dict[str, tf.Tensor]:
        """One optimizer step on the unmasked rows; accumulates metrics; returns {"loss": ...}."""

    @abc.abstractmethod
    def _evaluate(self, x, y, mask) -> dict[str, tf.Tensor]:
        """Accumulates metrics without changing weights; returns {"loss": ...}."""

    @abc.abstractmethod
    def _predict(self, x) -> dict[str, tf.Tensor]:
        """Inference; returns {"output": ...}."""

    def apply_gradients(self, weights: list[tf.Tensor], grads: dict[int, tf.Tensor]) -> None:
        """One optimizer step for every trainable weight, plus FedProx's term when converted with it.

        `weights` are the weight values already read for this step; `grads` maps weight index to
        gradient, a trainable weight the loss does not depend on taking a zero gradient.
        """
        grad_list = [grads[i] if i in grads else tf.zeros_like(weights[i]) for i in self.trainable_indices]
        if self.proximal:
            mu = self.proximal_mu.read_value()
            grad_list = [grad + mu * (weights[i] - anchor)
                         for grad, i, anchor in zip(grad_list, self.trainable_indices, self.anchors)]
        self.optimizer.apply([self.model_weights[i] for i in self.trainable_indices],
                             [weights[i] for i in self.trainable_indices], grad_list)

    def _reset_metrics(self):
        report = {name: tf.identity(value) for name, value in self.metric_values().items()}
        self.zero_metrics()
        return report

    def _get_weights(self):
        return {weight_key(i): variable.read_value() for i, variable in enumerate(self.model_weights)}

    def _set_weights(self, *weights):
        for variable, value in zip(self.model_weights, weights):
            variable.assign(value)
        if self.proximal:
            for anchor, i in zip(self.anchors, self.trainable_indices):
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
