"""FedProx's proximal term in the artifact: mu * (w - anchor) added to every trainable gradient."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from converters import convert_keras_model
from device_runtime import TrainableModel


def _artifact(proximal: bool) -> TrainableModel:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(3)])
    result = convert_keras_model(model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                 optimizer=keras.optimizers.SGD(0.1), batch_size=4, proximal=proximal)
    assert result.manifest.proximal is proximal
    assert ("set_proximal_mu" in result.manifest.signatures) is proximal
    return TrainableModel(result.tflite_bytes)


def test_proximal_term_pulls_trainable_weights_towards_the_anchor():
    model = _artifact(proximal=True)
    rng = np.random.default_rng(0)
    anchor = [w + rng.normal(size=w.shape).astype(np.float32) for w in model.get_weights()]
    model.set_weights(anchor)
    assert model.set_proximal_mu(0.5) == 0.5
    x, y = rng.normal(size=(4, 5)).astype(np.float32), np.array([0, 1, 2, 1], np.int32)
    model.train_step(x, y, np.ones(4, np.float32))
    moved = model.get_weights()
    # An all-padding batch has no loss gradient: only the proximal term acts, w -= lr * mu * (w - anchor).
    model.train_step(x, y, np.zeros(4, np.float32))
    trainable = [spec.trainable for spec in model.weight_specs]
    for after, before, start, is_trainable in zip(model.get_weights(), moved, anchor, trainable, strict=True):
        expected = before - 0.1 * 0.5 * (before - start) if is_trainable else before
        np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-7)


def test_mu_zero_is_plain_training_and_plain_artifacts_refuse_mu():
    proximal, plain = _artifact(proximal=True), _artifact(proximal=False)
    rng = np.random.default_rng(1)
    start = [w + 0.3 for w in plain.get_weights()]
    for model in (proximal, plain):
        model.set_weights(start)
    for _ in range(3):
        x, y = rng.normal(size=(4, 5)).astype(np.float32), rng.integers(0, 3, 4).astype(np.int32)
        assert proximal.train_batch(x, y) == plain.train_batch(x, y)
    for a, b in zip(proximal.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="proximal=True"):
        plain.set_proximal_mu(0.1)
