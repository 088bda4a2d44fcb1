"""Small converted artifacts for the device-runtime tests, usable in a venv without TensorFlow.

`artifact_path(name, directory)` returns `<FEDGE_TEST_ARTIFACTS>/<name>.tflite` when that
file exists (CI converts them earlier in the same run with `tests/make_device_artifacts.py`);
otherwise it converts the model now, which needs TensorFlow, into FEDGE_TEST_ARTIFACTS if
set, else into `directory`. TensorFlow is imported lazily, only to convert.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

ENV_VAR = "FEDGE_TEST_ARTIFACTS"


def _keras(model: Any, optimizer: Any) -> Any:
    """Convert a Keras classifier: sparse categorical cross-entropy, accuracy, batch 4."""
    from converters import convert_keras_model

    return convert_keras_model(model, loss="sparse_categorical_crossentropy", optimizer=optimizer,
                               batch_size=4, metrics=["accuracy"])


def _mlp(keras: Any) -> Any:
    """Dense 8 -> 16 relu -> 3 softmax, plain SGD, batch 4."""
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")], name="mlp")
    return _keras(model, keras.optimizers.SGD(learning_rate=0.1))


def _cnn(keras: Any) -> Any:
    """Conv2D on 6x6x1 -> flatten -> 3 softmax, SGD with momentum (an optimizer with state), batch 4."""
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")], name="cnn")
    return _keras(model, keras.optimizers.SGD(learning_rate=0.02, momentum=0.9))


def _scalar(keras: Any) -> Any:
    """A custom fedge Model on 8 features with a scalar weight (a learned temperature), converted
    with FedProx's proximal term: every rank-0 input the artifact format has (a scalar weight in
    set_weights, set_learning_rate, set_proximal_mu), which ai-edge-litert's aarch64 build cannot resize."""
    import numpy as np
    import tensorflow as tf

    from converters import convert_custom_model
    from fedge.learning import finalizers
    from fedge.learning.model import BatchOutput, Model, unpack_batch

    class TemperatureSoftmax(Model):
        def __init__(self) -> None:
            rng = np.random.default_rng(0)
            self._w = tf.Variable(rng.normal(0.0, 0.5, (8, 3)).astype(np.float32), name="w")
            self._temperature = tf.Variable(1.0, name="temperature")
            self._loss_sum = tf.Variable(0.0, trainable=False, name="loss_sum")
            self._num_examples = tf.Variable(0.0, trainable=False, name="num_examples")

        trainable_variables = property(lambda self: [self._w, self._temperature])
        non_trainable_variables = property(lambda self: [])
        local_variables = property(lambda self: [self._loss_sum, self._num_examples])
        input_spec = property(lambda self: (tf.TensorSpec([None, 8], tf.float32), tf.TensorSpec([None], tf.int32)))

        def _logits(self, x: Any) -> Any:
            return tf.matmul(x, self._w) * self._temperature

        def predict_on_batch(self, x: Any, training: bool = False) -> Any:
            return tf.nn.softmax(self._logits(x))

        def forward_pass(self, batch_input: Any, training: bool = True) -> Any:
            x, y, mask = unpack_batch(batch_input)
            logits = self._logits(x)
            per_example = -tf.reduce_sum(tf.one_hot(y, 3) * tf.nn.log_softmax(logits), axis=-1)
            count = tf.reduce_sum(mask)
            loss_sum = tf.reduce_sum(per_example * mask)
            self._loss_sum.assign_add(loss_sum)
            self._num_examples.assign_add(count)
            return BatchOutput(loss_sum / tf.maximum(count, 1.0), tf.nn.softmax(logits), tf.cast(count, tf.int32))

        def report_local_unfinalized_metrics(self) -> dict[str, Any]:
            return {"loss_sum": self._loss_sum, "num_examples": self._num_examples}

        def metric_finalizers(self) -> dict[str, Any]:
            return {"loss": finalizers.divide("loss_sum", "num_examples"),
                    "num_examples": finalizers.identity("num_examples")}

    return convert_custom_model(TemperatureSoftmax(), optimizer=keras.optimizers.SGD(learning_rate=0.1),
                                batch_size=4, proximal=True, model_name="scalar")


ARTIFACTS: dict[str, Callable[[Any], Any]] = {"mlp": _mlp, "cnn": _cnn, "scalar": _scalar}


def convert(name: str, directory: str | os.PathLike[str]) -> Path:
    """Convert artifact `name` into `directory`/<name>.tflite (needs TensorFlow)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    keras.utils.set_random_seed(0)
    result = ARTIFACTS[name](keras)
    Path(directory).mkdir(parents=True, exist_ok=True)
    return result.save(Path(directory) / f"{name}.tflite")


def artifact_path(name: str, directory: str | os.PathLike[str]) -> Path:
    """Path of artifact `name`: the prebuilt one in FEDGE_TEST_ARTIFACTS, else freshly converted."""
    if name not in ARTIFACTS:
        raise KeyError(f"unknown test artifact {name!r}; known: {sorted(ARTIFACTS)}")
    prebuilt = os.environ.get(ENV_VAR)
    if prebuilt and (Path(prebuilt) / f"{name}.tflite").is_file():
        return Path(prebuilt) / f"{name}.tflite"
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        raise RuntimeError(
            f"test artifact {name!r} is not in {ENV_VAR}={prebuilt!r} and TensorFlow is not installed to "
            f"convert it; run `python tests/make_device_artifacts.py DIR` in a venv with TensorFlow and "
            f"set {ENV_VAR}=DIR") from None
    return convert(name, prebuilt or directory)
