"""`fedge convert` and `fedge inspect` on the issue's reference models, through the real converter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from device_runtime import TrainableModel
from device_runtime.artifact import ArtifactError, verify_content_hash
from fedge.cli import main
from fedge.simulation.models import mnist_cnn

SIGNATURES = {"train", "evaluate", "forward", "report_metrics", "reset_metrics", "get_weights", "set_weights",
              "set_learning_rate", "reset_optimizer"}


def mcmahan_cnn() -> keras.Model:
    """The MNIST CNN of McMahan et al. 2017 (1,663,370 parameters), seeded."""
    keras.utils.set_random_seed(0)
    return mnist_cnn()


def mobilenet_style() -> keras.Model:
    """A MobileNetV2-style block: strided conv, depthwise conv, batch norm, relu6, residual add."""
    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((16, 16, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = layers.ReLU(6.0)(layers.BatchNormalization()(x))
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    y = layers.ReLU(6.0)(layers.BatchNormalization()(y))
    y = layers.BatchNormalization()(layers.Conv2D(8, 1, use_bias=False)(y))
    x = layers.GlobalAveragePooling2D()(layers.Add()([x, y]))
    return keras.Model(inputs, layers.Dense(10)(x), name="mobilenet_style")


def convert_and_inspect(tmp_path: Path, capsys, model: keras.Model, *options: str) -> tuple[Path, dict]:
    saved = tmp_path / f"{model.name}.keras"
    model.save(saved)
    output = tmp_path / f"{model.name}.tflite"
    assert main(["convert", str(saved), "-o", str(output), *options]) == 0
    capsys.readouterr()
    assert main(["inspect", str(output), "--json"]) == 0
    return output, json.loads(capsys.readouterr().out)


def assert_trains(path: Path, seed: int) -> None:
    """Repeated steps on one batch in LiteRT drive its loss down."""
    model = TrainableModel.from_file(path)
    spec = model.manifest.input
    rng = np.random.default_rng(seed)
    x = rng.random((model.batch_size, *spec.shape), dtype=np.float32)
    y = rng.integers(0, 10, model.batch_size).astype(np.int32)
    losses = [model.train_batch(x, y) for _ in range(25)]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses


def test_mcmahan_cnn_converts_builtin_only_and_trains(tmp_path, capsys):
    path, report = convert_and_inspect(tmp_path, capsys, mcmahan_cnn(), "--loss", "sparse_categorical_crossentropy",
                                       "--learning-rate", "0.05", "--batch-size", "10")
    assert report["builtin_only"] and not report["non_builtin_operators"]
    assert report["num_parameters"] == 1_663_370
    assert set(report["signatures"]) == SIGNATURES
    assert report["signatures"]["train"]["inputs"]["x"] == [[10, 28, 28, 1], "float32"]
    assert report["signatures"]["forward"]["outputs"]["output"] == [[10, 10], "float32"]
    assert report["content_hash"].startswith("ok (sha256:")
    assert report["manifest"]["optimizer"] == {"name": "sgd", "learning_rate": 0.05, "momentum": 0.0,
                                               "nesterov": False}
    assert_trains(path, seed=1)


def test_mobilenet_style_converts_builtin_only_and_trains(tmp_path, capsys):
    path, report = convert_and_inspect(tmp_path, capsys, mobilenet_style(), "--loss", "sparse_categorical_crossentropy",
                                       "--from-logits", "--optimizer", "adam", "--learning-rate", "0.01",
                                       "--batch-size", "8")
    assert report["builtin_only"]
    assert report["operators"]["DEPTHWISE_CONV_2D"] >= 1
    assert report["manifest"]["loss"] == {"name": "sparse_categorical_crossentropy", "from_logits": True}
    names = [w["name"] for w in report["manifest"]["weights"] if not w["trainable"]]
    assert any("moving_mean" in name for name in names) and any("moving_variance" in name for name in names)
    assert_trains(path, seed=2)


def test_unsupported_layer_is_a_clear_message_not_a_stack_trace(tmp_path):
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.Conv1D(4, 3, name="my_conv1d"), keras.layers.Flatten(),
                              keras.layers.Dense(2)])
    saved = tmp_path / "conv1d.keras"
    model.save(saved)
    run = subprocess.run([sys.executable, "-m", "fedge.cli", "convert", str(saved), "--loss", "mean_squared_error",
                          "--batch-size", "4"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    message = [line for line in run.stderr.splitlines() if line.startswith("fedge convert:")]
    assert message and "my_conv1d" in message[0] and "Conv1D" in message[0] and "Dense, " in message[0], run.stderr
    assert not (tmp_path / "conv1d.tflite").exists()


def test_inspect_reports_tampering_and_rejects_garbage(tmp_path, capsys):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)], name="tiny")
    path, _ = convert_and_inspect(tmp_path, capsys, model, "--loss", "mean_squared_error", "--batch-size", "2")
    data = bytearray(path.read_bytes())
    verify_content_hash(bytes(data))
    data[len(data) // 3] ^= 0xFF  # somewhere in the graph or the weights
    tampered = tmp_path / "tampered.tflite"
    tampered.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="hash"):
        TrainableModel.from_file(tampered)
    capsys.readouterr()
    assert main(["inspect", str(tampered), "--json"]) == 1  # a verdict, not a pass
    report = json.loads(capsys.readouterr().out)
    assert not report["content_hash_ok"] and report["content_hash"].startswith("MISMATCH")
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"\x00" * 64)
    assert main(["inspect", str(garbage)]) == 2
    assert "not a TFLite flatbuffer" in capsys.readouterr().err


def test_inspect_needs_no_tensorflow(tmp_path, capsys):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="sigmoid")], name="tiny")
    path, _ = convert_and_inspect(tmp_path, capsys, model, "--loss", "binary_crossentropy", "--batch-size", "2")
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None; "
            "from fedge.cli import main; sys.exit(main(['inspect', sys.argv[1]]))")
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "builtin ops only: yes" in run.stdout
