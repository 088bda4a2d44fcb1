"""Parity of the trainable LiteRT artifact with Keras.

For every supported layer, loss and optimizer: N training steps in LiteRT (the converted
``.tflite`` run by ``device_runtime.model.TrainableModel``) and in Keras
(``model.train_on_batch``) from the same initial weights give the same weights and the same
per-step losses; a partial batch, padded and masked by the artifact, gives the result Keras
gives on the unpadded batch; inference (``forward``/``evaluate``) equals Keras inference.

This is a converter test: it imports TensorFlow (through Keras). The device runtime itself
never does.

Every parity case ends its training with a partial batch (``partial`` real rows of
``batch_size``), so masking is checked for every layer type; weights are compared after
every step, so a failure names the first step (and the weights) that diverge.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402

from converters import ConversionError, UnsupportedLayerError, convert_keras_model  # noqa: E402
from device_runtime.artifact import list_operators  # noqa: E402
from device_runtime.model import TrainableModel  # noqa: E402

try:  # tests/ may or may not be a package
    from . import keras_reference as kref  # type: ignore[no-redef]
except ImportError:
    import keras_reference as kref  # type: ignore[no-redef]

L = keras.layers

# Tolerances. Both sides compute in float32, but TF's CPU kernels (oneDNN matmul/conv,
# Eigen reductions) and LiteRT's kernels (XNNPACK/ruy) sum in different orders, and the
# artifact's hand-written backward pass (e.g. softmax - one_hot, a conv filter gradient as a
# conv of transposed operands) is a different but mathematically equal formula to TF's
# autodiff. Each step therefore differs by a few float32 ulps (~1e-7 relative) of the
# summed magnitudes, and that accumulates over the 4-6 steps of a case. Measured on every
# case here: the largest |litert - keras| / (atol + rtol * |keras|) is about 0.2 (0.03 for
# most cases), so there is headroom of 5x or more, while any real mistake (a
# missing term, a wrong scale, a masked row leaking into a mean or batch statistics, an
# off-by-one in SAME padding) shows up at 1e-3 or larger. atol=1e-6 covers entries that are
# (near) zero, e.g. biases and moving means after a few steps, where relative error means
# nothing.
RTOL = 1e-5
ATOL = 1e-6


# ----------------------------------------------------------------------------- data

def sparse_labels(shape, n_classes=3):
    def data(rng, n):
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        return x, rng.randint(0, n_classes, n).astype(np.int32)
    return data


def onehot_labels(shape, n_classes=3):
    def data(rng, n):
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        return x, np.eye(n_classes, dtype=np.float32)[rng.randint(0, n_classes, n)]
    return data


def binary_labels(shape):
    def data(rng, n):
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        return x, rng.randint(0, 2, (n, 1)).astype(np.float32)
    return data


def regression_targets(shape, k=3):
    def data(rng, n):
        x = rng.standard_normal((n, *shape)).astype(np.float32)
        return x, rng.standard_normal((n, k)).astype(np.float32)
    return data


def token_ids(length, vocab, n_classes=3):
    def data(rng, n):
        x = rng.randint(0, vocab, (n, length)).astype(np.int32)
        return x, rng.randint(0, n_classes, n).astype(np.int32)
    return data


# ----------------------------------------------------------------------------- models

def seq(input_shape, *layers, dtype="float32"):
    return keras.Sequential([keras.Input(input_shape, dtype=dtype), *layers])


def mlp(out_units=3, out_activation=None):
    return seq((6,), L.Dense(8, activation="relu"), L.Dense(out_units, activation=out_activation))


def functional_add():
    inp = keras.Input((6,))
    a = L.Dense(5, activation="relu")(inp)
    b = L.Dense(5, activation="tanh")(inp)
    out = L.Dense(3)(L.Add()([a, b]))
    return keras.Model(inp, out)


def functional_concat():
    inp = keras.Input((8, 8, 1))
    a = L.Conv2D(2, 3, padding="same")(inp)
    b = L.Conv2D(3, 1, activation="relu")(inp)
    out = L.Dense(3)(L.Flatten()(L.Concatenate(axis=-1)([a, b])))
    return keras.Model(inp, out)


def residual_block():
    inp = keras.Input((8, 8, 2))
    h = L.Conv2D(4, 3, padding="same", activation="relu")(inp)
    # no bias before batch norm (as in real ResNets): BN cancels it, so its gradient is 0 up
    # to float32 cancellation noise (~1e-7 a step, amplified by momentum), which TF and
    # LiteRT round differently; with a bias this case reached 0.64 of the tolerance
    r = L.Conv2D(4, 3, padding="same", use_bias=False)(h)
    r = L.BatchNormalization()(r)
    h = L.ReLU()(L.Add()([h, r]))
    out = L.Dense(3)(L.GlobalAveragePooling2D()(h))
    return keras.Model(inp, out)


# ----------------------------------------------------------------------------- cases

SGD = keras.optimizers.SGD
ADAM = keras.optimizers.Adam
SCCE = "sparse_categorical_crossentropy"
SCCE_LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[], Any]           # builds the Keras model (random seed set before)
    data: Callable[[np.random.RandomState, int], tuple]
    loss: Any = SCCE_LOGITS            # most cases end in a linear Dense
    optimizer: Any = functools.partial(SGD, learning_rate=0.1)  # factory or "sgd"/"adam"
    batch_size: int = 8
    steps: int = 3                     # full batches, then one partial batch
    partial: int | None = 5            # real rows of the final, partial batch
    metrics: tuple = ("accuracy",)
    seed: int = field(default=0)


def conv_case(k, s, pad, hw, cin, use_bias=True):
    cid = f"conv2d-k{k}-s{s}-{pad}-cin{cin}-{hw}x{hw}" + ("" if use_bias else "-nobias")
    return Case(cid, lambda: seq((hw, hw, cin),
                                 L.Conv2D(3, k, strides=s, padding=pad, use_bias=use_bias),
                                 L.Flatten(), L.Dense(3)),
                sparse_labels((hw, hw, cin)))


def depthwise_case(s, pad, dm, hw, cin):
    return Case(f"depthwise-k3-s{s}-{pad}-dm{dm}-{hw}x{hw}x{cin}",
                lambda: seq((hw, hw, cin),
                            L.DepthwiseConv2D(3, strides=s, padding=pad, depth_multiplier=dm),
                            L.Flatten(), L.Dense(3)),
                sparse_labels((hw, hw, cin)))


def pool_case(kind, p, s, pad, hw):
    layer = {"max": L.MaxPooling2D, "avg": L.AveragePooling2D}[kind]
    # a 1x1 conv in front so the pooling backward pass reaches a weight
    return Case(f"{kind}pool-p{p}-s{s}-{pad}-{hw}x{hw}",
                lambda: seq((hw, hw, 2), L.Conv2D(2, 1),
                            layer(pool_size=p, strides=s, padding=pad),
                            L.Flatten(), L.Dense(3)),
                sparse_labels((hw, hw, 2)))


def dense_activation_case(act):
    return Case(f"dense-{act}", lambda: seq((6,), L.Dense(8, activation=act), L.Dense(3)),
                sparse_labels((6,)))


# Conversion (~1-1.5 s a model) dominates the run time, so each model covers one thing and
# nothing twice: the "linear" activation is every case's output Dense, plain SGD (lr 0.1) is
# every case's default optimizer, Flatten is in most conv cases.
LAYER_CASES = [
    *[dense_activation_case(a) for a in ["relu", "relu6", "sigmoid", "tanh", "softmax"]],
    # activations as separate layers; the final Softmax layer's logits feed the loss
    Case("activation-layers",
         lambda: seq((6,), L.Dense(8), L.Activation("tanh"), L.Dense(8), L.ReLU(),
                     L.Dense(3), L.Softmax()),
         sparse_labels((6,)), loss=SCCE),
    conv_case(3, 1, "same", 8, 1),
    conv_case(3, 2, "same", 9, 3),     # odd size, stride 2: SAME pads 1 / 1
    conv_case(5, 2, "same", 8, 3),     # even size, stride 2: SAME pads 1 / 2 (asymmetric)
    conv_case(5, 1, "valid", 9, 1, use_bias=False),
    # stride 1 with kw * cin >= 64: the filter gradient from the cached column block
    conv_case(3, 1, "same", 6, 24),
    conv_case(5, 1, "valid", 9, 16, use_bias=False),
    conv_case(3, 2, "valid", 9, 3),
    depthwise_case(1, "same", 1, 8, 3),
    depthwise_case(2, "same", 2, 9, 2),
    depthwise_case(1, "valid", 2, 8, 2),
    pool_case("max", 3, 2, "same", 8),  # asymmetric SAME padding, overlapping windows
    pool_case("avg", 3, 2, "same", 9),  # padded cells excluded from the average
    pool_case("max", 2, 2, "valid", 9),  # pool 2 stride 2 valid; odd size drops the last row/col
    pool_case("avg", 2, 2, "valid", 9),
    Case("global-average-pooling-2d",
         lambda: seq((8, 8, 2), L.Conv2D(4, 3, padding="same", activation="relu"),
                     L.GlobalAveragePooling2D(), L.Dense(3)),
         sparse_labels((8, 8, 2))),
    Case("reshape-flatten",
         lambda: seq((6,), L.Dense(16), L.Reshape((4, 4, 1)), L.Conv2D(2, 3), L.Flatten(),
                     L.Dense(3)),
         regression_targets((6,)), loss="mean_squared_error", metrics=()),
    Case("dropout-0.0",
         lambda: seq((6,), L.Dense(8, activation="relu"), L.Dropout(0.0), L.Dense(3)),
         sparse_labels((6,)), optimizer="adam"),
    Case("batchnorm-dense",
         lambda: seq((6,), L.Dense(8), L.BatchNormalization(), L.ReLU(), L.Dense(3)),
         sparse_labels((6,))),
    # momentum 0.8 so that the moving statistics move visibly in a few steps
    Case("batchnorm-conv2d",
         lambda: seq((8, 8, 2), L.Conv2D(4, 3, padding="same"),
                     L.BatchNormalization(momentum=0.8), L.ReLU(), L.Flatten(), L.Dense(3)),
         sparse_labels((8, 8, 2)),
         optimizer=functools.partial(SGD, learning_rate=0.1, momentum=0.9)),
    # 8 rows x 6 tokens from a vocabulary of 20: repeated ids, whose gradients must add up
    Case("embedding",
         lambda: seq((6,), L.Embedding(20, 4), L.Flatten(), L.Dense(3), dtype="int32"),
         token_ids(6, 20), optimizer=functools.partial(SGD, learning_rate=0.5)),
    Case("functional-add", functional_add, sparse_labels((6,))),
    Case("functional-concatenate", functional_concat, sparse_labels((8, 8, 1)),
         optimizer="adam"),
    Case("functional-residual-block", residual_block, sparse_labels((8, 8, 2)),
         optimizer=functools.partial(SGD, learning_rate=0.1, momentum=0.9)),
]

LOSS_CASES = [
    # sparse CE with softmax probabilities: the optimizer cases; with logits: the dense cases
    Case("loss-categorical-ce-softmax", lambda: mlp(3, "softmax"), onehot_labels((6,)),
         loss="categorical_crossentropy"),
    Case("loss-categorical-ce-logits", lambda: mlp(3), onehot_labels((6,)),
         loss=keras.losses.CategoricalCrossentropy(from_logits=True)),
    Case("loss-binary-ce-sigmoid", lambda: mlp(1, "sigmoid"), binary_labels((6,)),
         loss="binary_crossentropy"),
    Case("loss-binary-ce-logits", lambda: mlp(1), binary_labels((6,)),
         loss=keras.losses.BinaryCrossentropy(from_logits=True)),
    Case("loss-mse", lambda: mlp(3), regression_targets((6,)), loss="mse", metrics=()),
]

# plain SGD: the default of the layer cases above
OPTIMIZER_CASES = [
    Case(f"opt-{name}", lambda: mlp(3, "softmax"), sparse_labels((6,)), loss=SCCE,
         optimizer=opt, steps=5)
    for name, opt in [
        ("sgd-momentum", functools.partial(SGD, learning_rate=0.1, momentum=0.9)),
        ("sgd-nesterov", functools.partial(SGD, learning_rate=0.1, momentum=0.9, nesterov=True)),
        ("adam-lr0.001", functools.partial(ADAM, learning_rate=1e-3)),
        ("adam-lr0.01", functools.partial(ADAM, learning_rate=0.01)),
    ]
]

PARITY_CASES = LAYER_CASES + LOSS_CASES + OPTIMIZER_CASES
CASES = {c.id: c for c in PARITY_CASES}
assert len(CASES) == len(PARITY_CASES), "duplicate case ids"

DROPOUT_CASE = Case(
    "dropout-0.5",
    # all-ones kernel, no bias: the training-mode loss has a closed-form expectation
    lambda: seq((8,), L.Dropout(0.5), L.Dense(1, use_bias=False, kernel_initializer="ones")),
    regression_targets((8,), k=1), loss="mse", metrics=())


# ----------------------------------------------------------------------------- helpers

@dataclass
class Artifact:
    tflite_bytes: bytes
    manifest: dict
    initial: list          # Keras weights at conversion time, model.weights order
    names: list


_ARTIFACTS: dict[str, Artifact] = {}


def convert(case: Case, model):
    # the converter gets its own optimizer instance (or the string), Keras a fresh one
    opt = case.optimizer if isinstance(case.optimizer, str) else case.optimizer()
    return convert_keras_model(model, loss=case.loss, optimizer=opt,
                               batch_size=case.batch_size, metrics=list(case.metrics))


def _field(op, key):
    return op[key] if isinstance(op, dict) else getattr(op, key)


def assert_builtin_only(tflite_bytes: bytes, what: str) -> None:
    ops = list_operators(tflite_bytes)
    assert ops, f"{what}: no operators listed"
    bad = [(_field(op, "name"), _field(op, "count")) for op in ops if not _field(op, "builtin")]
    assert not bad, f"{what}: non-builtin (custom/Flex) operators {bad}"
    # a builtin code this LiteRT's schema does not name (or the 127 placeholder left where the
    # extended builtin_code field is missing) will not load in a stock interpreter either
    unknown = [_field(op, "name") for op in ops
               if _field(op, "name").startswith(("BUILTIN_", "PLACEHOLDER_FOR_GREATER_OP_CODES"))]
    assert not unknown, f"{what}: operator codes unknown to this LiteRT: {unknown}"


def artifact(case: Case) -> Artifact:
    """Convert the case's model once per session; checks that apply to every conversion."""
    if case.id not in _ARTIFACTS:
        model = kref.build_model(case.build, case.seed)
        before = kref.snapshot(model)
        names = kref.weight_names(model)
        result = convert(case, model)
        for n, b, a in zip(names, before, kref.snapshot(model)):
            np.testing.assert_array_equal(a, b, err_msg=f"{case.id}: converter mutated {n}")
        manifest = result.manifest
        assert manifest.batch_size == case.batch_size
        assert [tuple(w.shape) for w in manifest.weights] == [b.shape for b in before]
        assert [bool(w.trainable) for w in manifest.weights] == \
            [w.trainable for w in model.weights]
        assert_builtin_only(result.tflite_bytes, case.id)
        _ARTIFACTS[case.id] = Artifact(result.tflite_bytes, manifest, before, names)
    return _ARTIFACTS[case.id]


def keras_reference(case: Case, art: Artifact) -> kref.KerasReference:
    """A fresh Keras model holding the artifact's initial weights, compiled like the artifact."""
    model = kref.build_model(case.build, case.seed)
    model.set_weights(art.initial)
    return kref.KerasReference(model, case.loss, case.optimizer)


def _describe(i, name, a, e) -> str:
    if a.shape != e.shape:
        return f"  [{i}] {name}: shape {a.shape} != {e.shape}"
    err = np.abs(a.astype(np.float64) - e.astype(np.float64))
    bad = ~(err <= ATOL + RTOL * np.abs(e))  # catches NaN too
    rel = err / np.maximum(np.abs(e), 1e-30)
    worst = np.unravel_index(np.argmax(np.where(bad, err, -1)), a.shape) if a.ndim else ()
    return (f"  [{i}] {name} {a.shape}: {int(bad.sum())}/{a.size} elements off, "
            f"max abs err {np.nanmax(err):.3g}, max rel err {np.nanmax(rel):.3g}; "
            f"worst at {tuple(int(j) for j in worst)}: litert {a[worst]!r} keras {e[worst]!r}")


def assert_weights_close(actual, expected, names, context: str) -> None:
    assert len(actual) == len(expected), f"{context}: {len(actual)} weights, expected {len(expected)}"
    problems = []
    for i, (a, e, n) in enumerate(zip(actual, expected, names)):
        a, e = np.asarray(a), np.asarray(e)
        if a.shape != e.shape or not np.allclose(a, e, rtol=RTOL, atol=ATOL):
            problems.append(_describe(i, n, a, e))
    if problems:
        pytest.fail(f"{context}: weights differ from Keras (rtol={RTOL}, atol={ATOL})\n"
                    + "\n".join(problems), pytrace=False)


def assert_weights_equal(actual, expected, names, context: str) -> None:
    assert len(actual) == len(expected), context
    for a, e, n in zip(actual, expected, names):
        np.testing.assert_array_equal(np.asarray(a), e, err_msg=f"{context}: {n}")


def assert_loss_close(lite: float, keras_loss: float, context: str) -> None:
    assert np.isfinite(lite), f"{context}: LiteRT loss {lite}"
    assert float(lite) == pytest.approx(keras_loss, rel=RTOL, abs=ATOL), \
        f"{context}: loss LiteRT {float(lite)!r} vs Keras {keras_loss!r}"


def max_change(ref, before) -> float:
    """Largest change of a trainable Keras weight since ``before``."""
    return max(float(np.max(np.abs(w - b))) for w, b, v in
               zip(ref.weights(), before, ref.model.weights) if v.trainable)


def ones_mask(n):
    return np.ones(n, np.float32)


def step_both(m, ref, x, y, case, context, names):
    """One step on both sides (a full batch via train_step, fewer rows via train_batch)."""
    if len(x) == case.batch_size:
        lite = m.train_step(x, y, ones_mask(len(x)))
    else:
        lite = m.train_batch(x, y)
    kl = ref.train_step(x, y)
    assert_loss_close(lite, kl, context)
    assert_weights_close(m.get_weights(), ref.weights(), names, context)
    return float(lite)


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: c.id)
def test_training_parity(case: Case):
    art = artifact(case)
    ref = keras_reference(case, art)
    m = TrainableModel(art.tflite_bytes)
    assert_weights_equal(m.get_weights(), art.initial, art.names, f"{case.id}: initial weights")

    rng = np.random.RandomState(1234)
    B = case.batch_size
    for step in range(case.steps):
        x, y = case.data(rng, B)
        step_both(m, ref, x, y, case, f"{case.id} step {step + 1} (full batch of {B})", art.names)
    if case.partial:
        x, y = case.data(rng, case.partial)
        before = ref.weights()
        step_both(m, ref, x, y, case,
                  f"{case.id} step {case.steps + 1} (partial batch {case.partial}/{B}, masked)",
                  art.names)

        # the masked step is not vacuous: it moved the reference weights
        assert max_change(ref, before) > 1e-5, f"{case.id}: the partial step changed nothing"

    # the test is not vacuous: the reference weights did move
    assert max_change(ref, art.initial) > 1e-4, f"{case.id}: reference weights barely moved"

    # inference after training: forward on a number of rows that is not a multiple of B,
    # evaluate on a partial batch (dropout off, batch-norm moving statistics)
    x, y = case.data(rng, B + 3)
    np.testing.assert_allclose(m.predict(x), ref.predict(x), rtol=RTOL, atol=ATOL,
                               err_msg=f"{case.id}: predict")
    assert_loss_close(m.evaluate_batch(x[:B - 2], y[:B - 2]), ref.evaluate(x[:B - 2], y[:B - 2]),
                      f"{case.id}: evaluate_batch")


def test_masked_rows_take_no_part():
    """Padding rows full of large garbage, interleaved with real rows, change nothing:
    not the loss, the gradient, nor the batch-norm batch statistics or moving statistics."""
    case = CASES["batchnorm-conv2d"]
    art = artifact(case)
    ref = keras_reference(case, art)
    m = TrainableModel(art.tflite_bytes)
    rng = np.random.RandomState(7)
    B = case.batch_size
    mask = np.array([1, 0, 1, 1, 0, 1, 0, 1], np.float32)
    for step in range(3):
        n = int(mask.sum())
        x, y = case.data(rng, n)
        gx, gy = case.data(rng, B)
        xp, yp = 100.0 * gx, gy
        xp[mask == 1], yp[mask == 1] = x, y
        lite = m.train_step(xp, yp, mask)
        kl = ref.train_step(x, y)
        context = f"masked step {step + 1} ({n} of {B} rows, garbage padding)"
        assert_loss_close(lite, kl, context)
        assert_weights_close(m.get_weights(), ref.weights(), art.names, context)


def test_partial_batch_metrics():
    """Batches of 8 and 5 rows: 13 examples, 2 batches, loss_sum = sum(batch loss * rows)."""
    case = CASES["conv2d-k3-s1-same-cin1-8x8"]
    art = artifact(case)
    ref = keras_reference(case, art)
    m = TrainableModel(art.tflite_bytes)
    m.reset_metrics()
    zero = m.report_metrics()
    assert float(zero["num_examples"]) == 0 and float(zero["loss_sum"]) == 0
    assert float(zero["num_batches"]) == 0 and float(zero["correct"]) == 0

    rng = np.random.RandomState(11)
    expected_loss_sum, expected_correct = 0.0, 0
    for n in (8, 5):
        x, y = case.data(rng, n)
        # no dropout / batch norm: the training forward pass is the inference forward pass
        expected_correct += int(np.sum(np.argmax(ref.predict(x), axis=-1) == y))
        loss = step_both(m, ref, x, y, case, f"train_batch of {n} rows", art.names)
        expected_loss_sum += loss * n
    metrics = m.report_metrics()
    assert float(metrics["num_examples"]) == 13
    assert float(metrics["num_batches"]) == 2
    assert float(metrics["loss_sum"]) == pytest.approx(expected_loss_sum, rel=RTOL)
    assert float(metrics["correct"]) == expected_correct

    # evaluate accumulates too, and changes no weight
    m.reset_metrics()
    x, y = case.data(rng, 5)
    w = m.get_weights()
    loss = m.evaluate_batch(x, y)
    assert_loss_close(loss, ref.evaluate(x, y), "evaluate_batch of 5 rows")
    assert_weights_equal(m.get_weights(), w, art.names, "evaluate_batch changed weights")
    metrics = m.report_metrics()
    assert float(metrics["num_examples"]) == 5
    assert float(metrics["num_batches"]) == 1
    assert float(metrics["loss_sum"]) == pytest.approx(5 * float(loss), rel=RTOL)
    assert float(metrics["correct"]) == int(np.sum(np.argmax(ref.predict(x), axis=-1) == y))


def test_set_learning_rate():
    """lr 0 leaves the weights exactly unchanged; changing lr mid-run matches Keras."""
    case = CASES["opt-sgd-momentum"]
    art = artifact(case)
    ref = keras_reference(case, art)
    m = TrainableModel(art.tflite_bytes)
    rng = np.random.RandomState(3)
    for step, lr in enumerate([0.0, 0.1, 0.1, 0.02, 0.02, 0.3]):
        m.set_learning_rate(lr)
        ref.set_learning_rate(lr)
        before = m.get_weights()
        x, y = case.data(rng, case.batch_size)
        step_both(m, ref, x, y, case, f"step {step + 1} at lr={lr}", art.names)
        if lr == 0.0:
            assert_weights_equal(m.get_weights(), before, art.names, "train step at lr=0")


@pytest.mark.parametrize("case_id", ["opt-sgd-momentum", "opt-adam-lr0.01"])
def test_reset_optimizer(case_id):
    """After momentum/Adam steps, reset_optimizer then a step equals a fresh Keras optimizer."""
    case = CASES[case_id]
    art = artifact(case)
    ref = keras_reference(case, art)
    m = TrainableModel(art.tflite_bytes)
    rng = np.random.RandomState(5)
    for step in range(3):
        x, y = case.data(rng, case.batch_size)
        step_both(m, ref, x, y, case, f"step {step + 1}", art.names)
    m.reset_optimizer()
    ref.reset_optimizer()
    for step in range(2):
        x, y = case.data(rng, case.batch_size)
        step_both(m, ref, x, y, case, f"step {step + 1} after reset_optimizer", art.names)


def test_dropout_is_stochastic_in_training_only():
    case = DROPOUT_CASE
    art = artifact(case)
    ref = keras_reference(case, art)
    m = TrainableModel(art.tflite_bytes)
    B = case.batch_size
    rng = np.random.RandomState(9)

    # inference equals Keras inference (dropout off)
    x, y = case.data(rng, B + 3)
    np.testing.assert_allclose(m.predict(x), ref.predict(x), rtol=RTOL, atol=ATOL)
    x, y = x[:B], y[:B]
    w0 = m.get_weights()
    eval_loss = m.evaluate_batch(x, y)
    assert_loss_close(eval_loss, ref.evaluate(x, y), "evaluate_batch")
    assert_weights_equal(m.get_weights(), w0, art.names, "evaluate changed weights")

    # training draws a fresh dropout mask per call: same weights, same batch, different steps
    loss1 = m.train_step(x, y, ones_mask(B))
    w1 = m.get_weights()
    m.set_weights(w0)
    assert_weights_equal(m.get_weights(), w0, art.names, "set_weights")
    loss2 = m.train_step(x, y, ones_mask(B))
    w2 = m.get_weights()
    assert abs(loss1 - eval_loss) > 1e-4 or abs(loss2 - eval_loss) > 1e-4
    assert abs(loss1 - loss2) > 1e-4
    assert not all(np.allclose(a, b) for a, b in zip(w1, w2))

    # after training, inference still equals Keras' with the same weights
    ref.model.set_weights(w2)
    np.testing.assert_allclose(m.predict(x), ref.predict(x), rtol=RTOL, atol=ATOL)

    # inverted dropout: kept units are scaled by 1/(1-rate). With x = ones, kernel = ones,
    # y = 0: inference output 8, loss 64; in training the output is 2*K with K~Bin(8, 1/2), so
    # E[loss] = 4 E[K^2] = 4 (2 + 16) = 72 (18 without the scaling). lr 0 keeps weights fixed.
    m.set_weights(w0)
    m.set_learning_rate(0.0)
    xs, ys = np.ones((B, 8), np.float32), np.zeros((B, 1), np.float32)
    assert_loss_close(m.evaluate_batch(xs, ys), 64.0, "evaluate on ones")
    losses = [m.train_step(xs, ys, ones_mask(B)) for _ in range(400)]
    assert_weights_equal(m.get_weights(), w0, art.names, "train steps at lr=0")
    assert np.mean(losses) == pytest.approx(72.0, rel=0.05)  # std of the mean ~1%
    assert np.std(losses) > 1.0


# ----------------------------------------------------------------------------- unsupported

def test_unsupported_layer_conv1d():
    model = kref.build_model(lambda: seq((5, 3), L.Conv1D(4, 3, name="my_conv1d"), L.Flatten(), L.Dense(2)))
    with pytest.raises(UnsupportedLayerError) as excinfo:
        convert_keras_model(model, loss=SCCE, optimizer="sgd", batch_size=4)
    assert isinstance(excinfo.value, ConversionError)
    msg = str(excinfo.value)
    assert "my_conv1d" in msg and "Conv1D" in msg
    assert "Dense" in msg and "Conv2D" in msg  # lists the supported layers


def test_unsupported_conv_dilation():
    model = kref.build_model(lambda: seq((9, 9, 1), L.Conv2D(2, 3, dilation_rate=2,
                                                               name="dilated_conv"),
                                         L.Flatten(), L.Dense(2)))
    with pytest.raises(UnsupportedLayerError) as excinfo:
        convert_keras_model(model, loss=SCCE, optimizer="sgd", batch_size=4)
    msg = str(excinfo.value)
    assert "dilation" in msg.lower() and "dilated_conv" in msg
