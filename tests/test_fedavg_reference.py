"""FedAvg through fedge (artifact, device runtime, codec, aggregation) equals FedAvg written by hand in numpy."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import fedge.learning as fl
from fedge.learning.executors import InProcessExecutor

BATCH, LEARNING_RATE, ROUNDS, CLASSES = 4, 0.3, 3, 3
CLIENT_SIZES = (7, 10, 5, 13)  # none a multiple of the batch size: every client ends on a partial batch


def _model_fn() -> fl.Model:
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu"),
                              keras.layers.Dense(CLASSES, activation="softmax")])
    return fl.from_keras_model(model, loss=keras.losses.SparseCategoricalCrossentropy(),
                               input_spec=(tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None], tf.int32)),
                               metrics=["accuracy"])


def _client_data() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    clients = []
    for size in CLIENT_SIZES:
        x = rng.normal(size=(size, 4)).astype(np.float32)
        clients.append((x, (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1).astype(np.int32)))
    return clients


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _reference_client(weights: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Local SGD on batches of BATCH in order (last one partial), mean sparse cross-entropy; returns the delta."""
    w1, b1, w2, b2 = (w.astype(np.float64) for w in weights)
    for start in range(0, len(x), BATCH):
        xb, yb = x[start:start + BATCH].astype(np.float64), y[start:start + BATCH]
        pre = xb @ w1 + b1
        hidden = np.maximum(pre, 0.0)
        grad_logits = (_softmax(hidden @ w2 + b2) - np.eye(CLASSES)[yb]) / len(xb)
        grad_hidden = (grad_logits @ w2.T) * (pre > 0)
        w2 = w2 - LEARNING_RATE * hidden.T @ grad_logits
        b2 = b2 - LEARNING_RATE * grad_logits.sum(axis=0)
        w1 = w1 - LEARNING_RATE * xb.T @ grad_hidden
        b1 = b1 - LEARNING_RATE * grad_hidden.sum(axis=0)
    return [after - before for after, before in zip((w1, b1, w2, b2), weights)]


def _reference_fedavg(weights: list[np.ndarray], clients: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """ROUNDS of FedAvg: example-weighted mean of client deltas, applied with server learning rate 1."""
    weights = [w.astype(np.float64) for w in weights]
    total = sum(len(x) for x, _ in clients)
    for _ in range(ROUNDS):
        deltas = [_reference_client(weights, x, y) for x, y in clients]
        weights = [w + sum(len(x) * d[i] for (x, _), d in zip(clients, deltas)) / total
                   for i, w in enumerate(weights)]
    return weights


def test_fedavg_matches_a_numpy_reference():
    with InProcessExecutor(num_workers=0) as executor:
        process = fl.build_federated_averaging_process(
            _model_fn, lambda: keras.optimizers.SGD(LEARNING_RATE), batch_size=BATCH, executor=executor, seed=None)
        shapes = [spec.shape for spec in process.artifact.manifest.weights]
        assert shapes == [(4, 5), (5,), (5, CLASSES), (CLASSES,)]  # the order the reference unpacks
        clients = _client_data()
        state = process.initialize()
        initial = process.get_model_weights(state).trainable
        for _ in range(ROUNDS):
            state, metrics = process.next(state, clients)

    expected = _reference_fedavg(initial, clients)
    final = process.get_model_weights(state)
    assert state.round_num == ROUNDS and final.non_trainable == []
    for got, want, start in zip(final.trainable, expected, initial, strict=True):
        assert np.max(np.abs(want - start)) > 1e-2  # the weights really moved
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    train = metrics["client_work"]["train"]
    assert train["num_examples"] == sum(CLIENT_SIZES)
    assert train["num_batches"] == sum(-(-size // BATCH) for size in CLIENT_SIZES)
