"""Keras-side reference for the converter parity tests (tests/test_parity.py).

The reference for "what one training step should do" is Keras itself: the model is
compiled with a fresh optimizer of the same configuration and the same loss, and
``train_on_batch`` is called with the very batches that are fed to the LiteRT artifact.
Imports TensorFlow (through Keras); only converter tests use it.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def build_model(build_fn, seed: int = 0) -> keras.Model:
    """Build a Keras model with deterministic initial weights."""
    keras.utils.set_random_seed(seed)
    return build_fn()


def snapshot(model: keras.Model) -> list[np.ndarray]:
    """Copies of every weight (trainable and not), in ``model.weights`` order."""
    return [np.array(w.numpy(), copy=True) for w in model.weights]


def weight_names(model: keras.Model) -> list[str]:
    return [w.path for w in model.weights]


def make_optimizer(spec):
    """A fresh optimizer from a spec: a string ("sgd", "adam") or a zero-argument factory."""
    if isinstance(spec, str):
        return keras.optimizers.get(spec)
    return spec()


class KerasReference:
    """Trains a Keras model with ``train_on_batch``, the parity reference.

    ``model`` must already hold the initial weights (those the artifact was converted from).
    """

    def __init__(self, model: keras.Model, loss, optimizer_spec):
        self.model = model
        self.loss = loss
        self.optimizer_spec = optimizer_spec
        self._compile()

    def _compile(self) -> None:
        self.model.compile(optimizer=make_optimizer(self.optimizer_spec), loss=self.loss)

    def train_step(self, x, y) -> float:
        """One optimizer step on exactly these rows; returns the batch loss (before the update)."""
        return float(self.model.train_on_batch(x, y))

    def evaluate(self, x, y) -> float:
        """Loss in inference mode (dropout off, batch-norm moving statistics)."""
        return float(self.model.test_on_batch(x, y))

    def predict(self, x) -> np.ndarray:
        return np.asarray(self.model(x, training=False))

    def weights(self) -> list[np.ndarray]:
        return snapshot(self.model)

    def set_learning_rate(self, lr: float) -> None:
        self.model.optimizer.learning_rate.assign(lr)

    def reset_optimizer(self) -> None:
        """A fresh optimizer of the same configuration (zero slots, iterations 0)."""
        self._compile()
