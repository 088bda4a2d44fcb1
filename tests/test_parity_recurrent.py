"""Parity of the recurrent lowerings (SimpleRNN, GRU, LSTM, sequence losses) with Keras.

Each case runs tests/test_parity.py's own parity check: full training steps in LiteRT and in
Keras ``train_on_batch`` from the same weights, every weight and the loss compared after
every step, then a padded partial batch, then inference. Tolerances are test_parity's
(rtol 1e-5, atol 1e-6): back-propagation through time adds no visible error; over 40 steps
the largest |litert - keras| / (atol + rtol * |keras|) measured 0.006 (LSTM) and 0.007 (GRU).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402

from converters import UnsupportedLayerError, convert_keras_model  # noqa: E402
from device_runtime.model import TrainableModel  # noqa: E402

try:  # tests/ may or may not be a package
    from . import test_parity as parity  # type: ignore[no-redef]
except ImportError:
    import test_parity as parity  # type: ignore[no-redef]

L = keras.layers
Case, seq, kref = parity.Case, parity.seq, parity.kref
PAD = 0  # the label id that means "padding" in the masked-sequence cases
SCCE_PADDED = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=PAD)


def sequences(steps, features, n_classes=3, per_position=True):
    """Float sequences [n, steps, features]; a label per position [n, steps] or per sequence [n]."""
    def data(rng, n):
        x = rng.standard_normal((n, steps, features)).astype(np.float32)
        y = rng.randint(0, n_classes, (n, steps) if per_position else n).astype(np.int32)
        return x, y
    return data


def padded_tokens(steps, vocab):
    """Token ids [n, steps] whose sequences end in a random run of PAD, labels the next token (PAD-padded)."""
    def data(rng, n):
        ids = rng.randint(1, vocab, (n, steps + 1))
        for row, length in enumerate(rng.randint(2, steps + 2, n)):
            ids[row, length:] = PAD
        return ids[:, :-1].astype(np.int32), ids[:, 1:].astype(np.int32)
    return data


def rnn_case(kind, return_sequences, **options):
    layer = {"simple_rnn": L.SimpleRNN, "gru": L.GRU, "lstm": L.LSTM}[kind]
    suffix = "".join(f"-{k}{v}" for k, v in options.items())
    return Case(f"{kind}-{'sequences' if return_sequences else 'last'}{suffix}",
                lambda: seq((6, 3), layer(5, return_sequences=return_sequences, **options), L.Dense(3)),
                sequences(6, 3, per_position=return_sequences))


RECURRENT_CASES = [
    *[rnn_case(kind, rs) for kind in ("simple_rnn", "gru", "lstm") for rs in (True, False)],
    rnn_case("gru", True, reset_after=False),
    rnn_case("gru", False, use_bias=False),
    Case("lstm-sequences-40-steps",  # long back-propagation through time
         lambda: seq((40, 3), L.LSTM(16, return_sequences=True), L.Dense(3)), sequences(40, 3)),
    # stacked layers, a TimeDistributed Dense ending in softmax (Keras reshapes the wrapped output,
    # so its loss reads probabilities, not logits); momentum
    Case("lstm-gru-stacked-time-distributed-softmax",
         lambda: seq((6, 3), L.LSTM(4, return_sequences=True), L.GRU(5, return_sequences=True),
                     L.TimeDistributed(L.Dense(3, activation="softmax"))),
         sequences(6, 3), loss=parity.SCCE,
         optimizer=functools.partial(parity.SGD, learning_rate=0.1, momentum=0.9)),
    # the character model of examples/text_generation.py, small: padded positions ignored
    Case("embedding-gru-dense-ignore-pad",
         lambda: seq((12,), L.Embedding(10, 4), L.GRU(8, return_sequences=True), L.Dense(10),
                     dtype="int32"),
         padded_tokens(12, 10), loss=SCCE_PADDED, optimizer=functools.partial(parity.SGD, learning_rate=0.5)),
    Case("embedding-lstm-dense-ignore-pad",
         lambda: seq((12,), L.Embedding(10, 4), L.LSTM(8, return_sequences=True), L.Dense(10),
                     dtype="int32"),
         # not Adam: Keras' Adam squares an Embedding's sparse gradient per occurrence of a
         # token, not per row sum, so it is not the dense Adam the artifact runs
         padded_tokens(12, 10), loss=SCCE_PADDED,
         optimizer=functools.partial(parity.SGD, learning_rate=0.3, momentum=0.9)),
    # a softmax output with ignore_class: Keras' mask hides the softmax, the loss reads probabilities
    Case("embedding-simple_rnn-softmax-ignore-pad",
         lambda: seq((12,), L.Embedding(10, 4), L.SimpleRNN(8, return_sequences=True),
                     L.Dense(10, activation="softmax"), dtype="int32"),
         padded_tokens(12, 10), loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=PAD),
         optimizer=functools.partial(parity.SGD, learning_rate=0.5)),
]
CASES = {case.id: case for case in RECURRENT_CASES}


@pytest.mark.parametrize("case", RECURRENT_CASES, ids=lambda c: c.id)
def test_recurrent_training_parity(case):
    parity.test_training_parity(case)


def test_ignored_positions_take_no_part():
    """Changing the inputs behind PAD labels at the end of a sequence changes no loss or weight
    (a recurrent layer runs forward only, so later inputs cannot reach earlier outputs), and the
    accuracy and loss metrics count only positions whose label is not PAD."""
    case = CASES["embedding-gru-dense-ignore-pad"]
    art = parity.artifact(case)
    rng = np.random.RandomState(21)
    x, y = case.data(rng, case.batch_size)
    y[:, -3:] = PAD
    garbage = x.copy()
    garbage[:, -2:] = rng.randint(1, 10, (case.batch_size, 2))
    runs = []
    for inputs in (x, garbage):
        m = TrainableModel(art.tflite_bytes)
        m.reset_metrics()
        runs.append((m.train_step(inputs, y, parity.ones_mask(case.batch_size)), m.get_weights(), m))
    parity.assert_loss_close(runs[1][0], runs[0][0], "loss with garbage behind PAD labels")
    parity.assert_weights_close(runs[1][1], runs[0][1], art.names, "weights with garbage behind PAD labels")

    m = runs[0][2]
    m.set_weights(art.initial)
    m.reset_metrics()
    predictions = np.argmax(m.predict(x), axis=-1)
    m.evaluate_step(x, y, parity.ones_mask(case.batch_size))
    valid = y != PAD
    expected = np.mean([np.mean((predictions[r] == y[r])[valid[r]]) for r in range(len(y))])
    metrics = m.finalized_metrics(m.report_metrics())
    assert metrics["accuracy"] == pytest.approx(expected, rel=1e-6)
    assert metrics["num_examples"] == case.batch_size


@pytest.mark.parametrize("layer, option", [
    (lambda: L.GRU(4, go_backwards=True, name="bad_rnn"), "go_backwards"),
    (lambda: L.LSTM(4, dropout=0.1, name="bad_rnn"), "dropout=0.1"),
    (lambda: L.LSTM(4, recurrent_dropout=0.2, name="bad_rnn"), "recurrent_dropout=0.2"),
    (lambda: L.SimpleRNN(4, activation="relu", name="bad_rnn"), "activation='relu'"),
    (lambda: L.GRU(4, recurrent_activation="hard_sigmoid", name="bad_rnn"), "recurrent_activation"),
    (lambda: L.SimpleRNN(4, kernel_constraint="non_neg", name="bad_rnn"), "kernel_constraint"),
    (lambda: L.GRU(4, recurrent_regularizer="l2", name="bad_rnn"), "recurrent_regularizer"),
])
def test_refused_options_name_layer_class_and_option(layer, option):
    model = kref.build_model(lambda: seq((5, 3), layer(), L.Dense(2)))
    with pytest.raises(UnsupportedLayerError) as excinfo:
        convert_keras_model(model, loss=parity.SCCE, optimizer="sgd", batch_size=4)
    message = str(excinfo.value)
    assert "bad_rnn" in message and type(model.layers[0]).__name__ in message and option in message


def test_refused_time_distributed_conv_and_unknown_sequence_length():
    model = kref.build_model(lambda: seq((5, 4, 4, 1), L.TimeDistributed(L.Conv2D(2, 3), name="td"),
                                         L.Reshape((5, 8)), L.GRU(3), L.Dense(2)))
    with pytest.raises(UnsupportedLayerError, match=r"'td' \(TimeDistributed\).*Conv2D"):
        convert_keras_model(model, loss=parity.SCCE, optimizer="sgd", batch_size=4)
    model = kref.build_model(lambda: seq((None, 3), L.GRU(3), L.Dense(2)))
    with pytest.raises(parity.ConversionError, match="sequence length"):
        convert_keras_model(model, loss=parity.SCCE, optimizer="sgd", batch_size=4)
