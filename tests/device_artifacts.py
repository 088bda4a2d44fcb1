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


def _mlp(keras: Any) -> dict[str, Any]:
    """Dense 8 -> 16 relu -> 3 softmax, plain SGD, batch 4."""
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")], name="mlp")
    return {"model": model, "optimizer": keras.optimizers.SGD(learning_rate=0.1)}


def _cnn(keras: Any) -> dict[str, Any]:
    """Conv2D on 6x6x1 -> flatten -> 3 softmax, SGD with momentum (an optimizer with state), batch 4."""
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")], name="cnn")
    return {"model": model, "optimizer": keras.optimizers.SGD(learning_rate=0.02, momentum=0.9)}


ARTIFACTS: dict[str, Callable[[Any], dict[str, Any]]] = {"mlp": _mlp, "cnn": _cnn}


def convert(name: str, directory: str | os.PathLike[str]) -> Path:
    """Convert artifact `name` into `directory`/<name>.tflite (needs TensorFlow)."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from converters import convert_keras_model

    keras.utils.set_random_seed(0)
    spec = ARTIFACTS[name](keras)
    result = convert_keras_model(spec["model"], loss="sparse_categorical_crossentropy",
                                 optimizer=spec["optimizer"], batch_size=4, metrics=["accuracy"])
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
