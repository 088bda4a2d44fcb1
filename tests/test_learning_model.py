"""fedge.learning models: from_keras_model and custom Model subclasses, in TensorFlow and lowered to LiteRT."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from converters import ConversionError  # noqa: E402
from device_runtime import TrainableModel, finalize_metrics, iterate_batches  # noqa: E402
from device_runtime.artifact import list_operators  # noqa: E402
from fedge.learning import finalizers  # noqa: E402
from fedge.learning.keras_model import from_keras_model  # noqa: E402
from fedge.learning.model import BatchOutput, Model, unpack_batch  # noqa: E402

FEATURES, CLASSES = 4, 3


def _keras_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(8, activation="relu"),
                             keras.layers.BatchNormalization(), keras.layers.Dense(CLASSES, activation="softmax")])


def _data(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, FEATURES)).astype(np.float32), rng.integers(0, CLASSES, rows).astype(np.int32)


SPEC = (tf.TensorSpec([None, FEATURES], tf.float32), tf.TensorSpec([None], tf.int32))


def test_input_spec_or_sample_batch_is_checked_against_the_keras_model():
    x, y = _data(6)
    loss = "sparse_categorical_crossentropy"
    from_spec = from_keras_model(_keras_model(), loss, input_spec={"x": SPEC[0], "y": SPEC[1]})
    assert from_spec.input_spec == SPEC and from_spec.batch_size_hint is None
    from_sample = from_keras_model(_keras_model(), loss, sample_batch=(x, y))
    assert [s.shape.as_list() for s in from_sample.input_spec] == [[None, FEATURES], [None]]
    assert from_sample.batch_size_hint == 6
    output = from_sample.forward_pass((x.astype(np.float64), y.astype(np.int64)))  # cast as the artifact casts
    assert output.loss.dtype == tf.float32 and int(output.num_examples) == 6
    fixed = (tf.TensorSpec([5, FEATURES], tf.float32), tf.TensorSpec([5], tf.int64))
    assert from_keras_model(_keras_model(), loss, input_spec=fixed).batch_size_hint == 5
    with pytest.raises(ValueError, match="exactly one of input_spec and sample_batch"):
        from_keras_model(_keras_model(), loss)
    with pytest.raises(ValueError, match="exactly one of input_spec and sample_batch"):
        from_keras_model(_keras_model(), loss, input_spec=SPEC, sample_batch=(x, y))
    with pytest.raises(ValueError, match=r"sample_batch x \(None, 5\) float32 does not match the Keras model's "
                                         r"input \(None, 4\)"):
        from_keras_model(_keras_model(), loss, sample_batch=(np.zeros((6, 5), np.float32), y))
    with pytest.raises(ValueError, match=r"input_spec y \(None, 3\) float32 does not match the labels "
                                         r"sparse_categorical_crossentropy takes.*expected shape \(None,\) "
                                         r"with an integer"):
        from_keras_model(_keras_model(), loss, input_spec=(SPEC[0], tf.TensorSpec([None, CLASSES], tf.float32)))
    with pytest.raises(ValueError, match="same number of rows"):
        from_keras_model(_keras_model(), loss, sample_batch=(x, y[:3]))
    with pytest.raises(ValueError, match="loss_weights is not supported"):
        from_keras_model(_keras_model(), loss, input_spec=SPEC, loss_weights=[1.0])
    with pytest.raises(ConversionError, match=r"metrics \['auc'\] are not supported.*accuracy"):
        from_keras_model(_keras_model(), loss, input_spec=SPEC, metrics=[keras.metrics.AUC(name="auc")])


def test_forward_pass_matches_keras_and_metrics_accumulate_and_reset():
    keras_model = _keras_model()
    model = from_keras_model(keras_model, keras.losses.SparseCategoricalCrossentropy(), input_spec=SPEC,
                             metrics=["accuracy"])
    x, y = _data(10)
    keras_loss = keras.losses.SparseCategoricalCrossentropy()(y, keras_model(x, training=False))
    output = model.forward_pass({"x": x, "y": y}, training=False)
    assert isinstance(output, BatchOutput) and int(output.num_examples) == 10
    np.testing.assert_allclose(float(output.loss), float(keras_loss), rtol=1e-6)
    # Padded rows (mask 0) take no part in the loss or the metrics.
    padded = (np.concatenate([x[:7], np.zeros((3, FEATURES), np.float32)]), np.concatenate([y[:7], [0, 0, 0]]),
              np.array([1.0] * 7 + [0.0] * 3, np.float32))
    masked = model.forward_pass({"x": padded[0], "y": padded[1], "mask": padded[2]}, training=False)
    np.testing.assert_allclose(float(masked.loss), float(keras.losses.SparseCategoricalCrossentropy()(
        y[:7], keras_model(x[:7], training=False))), rtol=1e-6)
    report = {name: float(value) for name, value in model.report_local_unfinalized_metrics().items()}
    assert report["num_examples"] == 17 and report["num_batches"] == 2
    np.testing.assert_allclose(report["loss_sum"], 10 * float(output.loss) + 7 * float(masked.loss), rtol=1e-6)
    predicted = np.argmax(keras_model(x, training=False), axis=-1)
    assert report["correct"] == np.sum(predicted == y) + np.sum(predicted[:7] == y[:7])
    assert finalize_metrics(model.metric_finalizers(), report)["accuracy"] == report["correct"] / 17
    model.reset_metrics()
    assert all(float(v) == 0.0 for v in model.report_local_unfinalized_metrics().values())
    np.testing.assert_allclose(model.predict_on_batch(x), keras_model(x, training=False), rtol=1e-6)


def test_lower_gives_a_builtin_artifact_with_the_keras_weights_that_trains_in_litert():
    keras_model = _keras_model()
    model = from_keras_model(keras_model, "sparse_categorical_crossentropy", input_spec=SPEC, metrics=["accuracy"])
    before = [w.numpy().copy() for w in keras_model.weights]
    result = model.lower(batch_size=4, optimizer=keras.optimizers.SGD(0.1))
    assert all(op.builtin for op in list_operators(result.tflite_bytes))
    assert result.manifest.metrics.finalizers == {name: tuple(finalizer)
                                                  for name, finalizer in model.metric_finalizers().items()}
    assert result.manifest.metrics.variables == tuple(model.report_local_unfinalized_metrics())
    artifact = TrainableModel(result.tflite_bytes)
    for got, expected in zip(artifact.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, expected)
    x, y = _data(10)
    for xb, yb, mask in iterate_batches(x, y, 4):
        artifact.evaluate_step(xb, yb, mask)
    evaluated = artifact.reset_metrics()
    model.forward_pass((x, y), training=False)  # one batch of 10 in TF, three (the last padded) in LiteRT
    for name, value in model.report_local_unfinalized_metrics().items():
        np.testing.assert_allclose(evaluated[name], 3.0 if name == "num_batches" else float(value), rtol=1e-5)
    first = [artifact.train_step(xb, yb, mask) for xb, yb, mask in iterate_batches(x, y, 4)]
    for _ in range(20):
        last = [artifact.train_step(xb, yb, mask) for xb, yb, mask in iterate_batches(x, y, 4)]
    assert sum(last) < sum(first)
    for after, start in zip(keras_model.weights, before, strict=True):  # the user's model is untouched
        np.testing.assert_array_equal(after.numpy(), start)
    assert getattr(keras_model, "optimizer", None) is None and not keras_model.compiled


def test_sequence_model_with_padding_positions_reports_the_artifacts_metrics():
    """ignore_class: the TF forward_pass and the artifact both average a row over its non-padding positions."""
    keras.utils.set_random_seed(0)
    keras_model = keras.Sequential([keras.Input((6,), dtype="int32"), keras.layers.Embedding(7, 3),
                                    keras.layers.GRU(5, return_sequences=True), keras.layers.Dense(7)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)
    spec = (tf.TensorSpec([None, 6], tf.int32), tf.TensorSpec([None, 6], tf.int32))
    model = from_keras_model(keras_model, loss, input_spec=spec, metrics=["accuracy"])
    rng = np.random.default_rng(1)
    x, y = rng.integers(1, 7, (5, 6)).astype(np.int32), rng.integers(1, 7, (5, 6)).astype(np.int32)
    for row in range(5):
        y[row, 6 - row:] = 0  # row i ends in i padding positions
    artifact = TrainableModel(model.lower(batch_size=4, optimizer=keras.optimizers.SGD(0.1)).tflite_bytes)
    for xb, yb, mask in iterate_batches(x, y, 4):
        artifact.evaluate_step(xb, yb, mask)
    evaluated = artifact.reset_metrics()
    model.forward_pass((x, y), training=False)
    reported = model.report_local_unfinalized_metrics()
    for name in ("loss_sum", "num_examples", "correct"):
        np.testing.assert_allclose(evaluated[name], float(reported[name]), rtol=1e-5)


class SoftmaxRegression(Model):
    """The docs' custom model: multinomial logistic regression written directly in TensorFlow."""

    def __init__(self, hidden_relu: bool = False):
        rng = np.random.default_rng(1)
        self._w = tf.Variable(rng.normal(0.0, 0.5, (FEATURES, CLASSES)).astype(np.float32), name="w")
        self._b = tf.Variable(np.zeros(CLASSES, np.float32), name="b")
        self._hidden_relu = hidden_relu
        self._loss_sum = tf.Variable(0.0, trainable=False, name="loss_sum")
        self._num_examples = tf.Variable(0.0, trainable=False, name="num_examples")
        self._correct = tf.Variable(0.0, trainable=False, name="correct")

    @property
    def trainable_variables(self):
        return [self._w, self._b]

    @property
    def non_trainable_variables(self):
        return []

    @property
    def local_variables(self):
        return [self._loss_sum, self._num_examples, self._correct]

    @property
    def input_spec(self):
        return SPEC

    def _logits(self, x):
        logits = tf.matmul(x, self._w) + self._b
        return tf.nn.relu(logits) if self._hidden_relu else logits  # ReluGrad has no TFLite builtin

    def predict_on_batch(self, x, training=False):
        return tf.nn.softmax(self._logits(x))

    def forward_pass(self, batch_input, training=True):
        x, y, mask = unpack_batch(batch_input)
        logits = self._logits(x)
        per_example = -tf.reduce_sum(tf.one_hot(y, CLASSES) * tf.nn.log_softmax(logits), axis=-1)
        count = tf.reduce_sum(mask)
        loss_sum = tf.reduce_sum(per_example * mask)
        hits = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), tf.cast(y, tf.int32)), tf.float32)
        self._loss_sum.assign_add(loss_sum)
        self._num_examples.assign_add(count)
        self._correct.assign_add(tf.reduce_sum(hits * mask))
        return BatchOutput(loss_sum / tf.maximum(count, 1.0), tf.nn.softmax(logits), tf.cast(count, tf.int32))

    def report_local_unfinalized_metrics(self):
        return {"loss_sum": self._loss_sum, "num_examples": self._num_examples, "correct": self._correct}

    def metric_finalizers(self):
        return {"loss": finalizers.divide("loss_sum", "num_examples"),
                "accuracy": finalizers.divide("correct", "num_examples"),
                "num_examples": finalizers.identity("num_examples")}


def test_custom_model_trains_in_litert_as_tf_eager_does():
    model = SoftmaxRegression()
    model.forward_pass(_data(3))  # metric values before lowering neither reach the artifact nor get lost
    before = {name: float(value) for name, value in model.report_local_unfinalized_metrics().items()}
    result = model.lower(batch_size=4, optimizer="sgd")
    assert all(op.builtin for op in list_operators(result.tflite_bytes))
    manifest = result.manifest
    assert manifest.model_name == "SoftmaxRegression" and manifest.loss.name == "custom"
    assert [(w.name, w.trainable) for w in manifest.weights] == [("w", True), ("b", True)]
    assert manifest.metrics.variables == ("loss_sum", "num_examples", "correct")
    assert manifest.metrics.finalizers == {name: tuple(finalizer)
                                           for name, finalizer in model.metric_finalizers().items()}
    assert {name: float(v) for name, v in model.report_local_unfinalized_metrics().items()} == before
    artifact = TrainableModel(result.tflite_bytes)
    assert artifact.report_metrics() == {"loss_sum": 0.0, "num_examples": 0.0, "correct": 0.0}

    reference = SoftmaxRegression()  # the same SGD steps (lr 0.01, Keras' default) with a tape in TF eager
    x, y = _data(10, seed=2)
    for epoch in range(3):
        for xb, yb, mask in iterate_batches(x, y, 4, shuffle_seed=epoch):  # the last batch is padded
            loss = artifact.train_step(xb, yb, mask)
            with tf.GradientTape() as tape:
                expected = reference.forward_pass({"x": xb, "y": yb, "mask": mask}).loss
            for variable, grad in zip(reference.trainable_variables,
                                      tape.gradient(expected, reference.trainable_variables)):
                variable.assign_sub(0.01 * grad)
            np.testing.assert_allclose(loss, float(expected), rtol=1e-5)
    for got, variable in zip(artifact.get_weights(), reference.trainable_variables, strict=True):
        np.testing.assert_allclose(got, variable.numpy(), rtol=1e-5, atol=1e-6)
    reported = artifact.report_metrics()
    for name, value in reference.report_local_unfinalized_metrics().items():
        np.testing.assert_allclose(reported[name], float(value), rtol=1e-5)
    np.testing.assert_allclose(artifact.predict(x), reference.predict_on_batch(x), rtol=1e-5, atol=1e-6)
    assert artifact.reset_metrics() == reported and set(artifact.report_metrics().values()) == {0.0}


def test_custom_model_gets_the_proximal_term():
    artifact = TrainableModel(SoftmaxRegression().lower(batch_size=4, optimizer="sgd", proximal=True).tflite_bytes)
    anchor = [w + 1.0 for w in artifact.get_weights()]
    artifact.set_weights(anchor)
    artifact.set_proximal_mu(0.5)
    x, y = _data(4)
    artifact.train_step(x, y, np.ones(4, np.float32))
    moved = artifact.get_weights()
    artifact.train_step(x, y, np.zeros(4, np.float32))  # no rows: only the proximal term mu * (w - anchor) acts
    for after, before, start in zip(artifact.get_weights(), moved, anchor, strict=True):
        np.testing.assert_allclose(after, before - 0.01 * 0.5 * (before - start), rtol=1e-6, atol=1e-7)


def test_custom_model_whose_gradient_needs_flex_ops_is_refused():
    with pytest.raises(ConversionError, match="TF ops without a builtin: ReluGrad"):
        SoftmaxRegression(hidden_relu=True).lower(batch_size=4, optimizer="sgd")


def test_custom_model_errors_name_the_problem():
    class Fixed(SoftmaxRegression):
        input_spec = (tf.TensorSpec([8, FEATURES], tf.float32), tf.TensorSpec([8], tf.int32))

    with pytest.raises(ConversionError, match="batch dimension 8, but the artifact's batch_size is 4"):
        Fixed().lower(batch_size=4, optimizer="sgd")
    assert Fixed().batch_size_hint == 8

    class BadFinalizer(SoftmaxRegression):
        def metric_finalizers(self):
            return {"loss": ["mean", "loss_sum"]}

    with pytest.raises(ConversionError, match=r"finalizer \['mean', 'loss_sum'\] must be"):
        BadFinalizer().lower(batch_size=4, optimizer="sgd")
    with pytest.raises(ValueError, match="batch_input must be"):
        unpack_batch(np.zeros((2, FEATURES)))
