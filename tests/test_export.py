"""`fedge export CHECKPOINT_DIR -o OUT`: the trained model out of a `fedge serve` checkpoint folder.

The issue's proof: a real `fedge serve` of a Keras model with held-out data and real agents, two rounds;
the exported inference `.tflite`, run with LiteRT on the held-out examples, is exactly as accurate as the
server's last evaluation said, and the exported `.keras` predicts as that `.tflite` does. A `.tflite` job's
checkpoint exports without TensorFlow; mistakes get one line and exit 2.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_artifacts import artifact_path
from device_runtime.artifact import Artifact
from device_runtime.model import TrainableModel
from fedge.cli import main
from fedge.learning.state import LearningProcessState, ModelWeights, load_state, save_state
from test_serve_tflite import _SERVE_AND_REPORT, TIMEOUT_S, _examples, running_agents


def _serve(tmp_path: Path, broker: tuple[str, int], fleet: str, model: Path, *flags: str) -> tuple[Path, dict]:
    """Two rounds of `fedge serve MODEL` (a process reporting whether it imported TensorFlow) to two agents, with
    40 held-out examples; returns the checkpoint folder and the metrics log's last line."""
    x, y = _examples(40, seed=9)
    np.savez(tmp_path / "held_out.npz", x=x, y=y)
    url = f"mqtt://{broker[0]}:{broker[1]}"
    with running_agents(url, fleet, [_examples(16, seed=i) for i in range(2)], tmp_path):
        command = [sys.executable, "-c", _SERVE_AND_REPORT, "serve", str(model), "--broker", url, "--fleet", fleet,
                   "--rounds", "2", "--clients-per-round", "2", "--over-selection", "1", "--deadline", "60",
                   "--checkin-timeout", "60", "--learning-rate", "0.1", "--eval-data", str(tmp_path / "held_out.npz"),
                   "--checkpoint-dir", str(tmp_path / "checkpoints"), "--metrics-log", str(tmp_path / "metrics.jsonl"),
                   *flags]
        result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["round"], last["outcome"], last["eval_num_examples"]) == (1, "completed", 40)
    return tmp_path / "checkpoints", last


def _export(checkpoints: Path, output: Path) -> str:
    """`fedge export` in its own process; its one line of output, then the heavy packages it imported."""
    result = subprocess.run([sys.executable, "-c", _SERVE_AND_REPORT, "export", str(checkpoints), "-o", str(output)],
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0 and not result.stderr.strip(), (result.stdout + result.stderr)[-3000:]
    return result.stdout


def _correct(predictions: np.ndarray, labels: np.ndarray) -> int:
    """How many examples the model gets right (argmax), as the server's evaluation counts them."""
    return int(np.sum(np.argmax(predictions, axis=-1) == labels))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The test artifact of a name, shared by this module's tests (converted once, when CI has not already)."""
    folder = tmp_path_factory.mktemp("artifacts")
    return functools.cache(lambda name: artifact_path(name, folder))


def _checkpoint(tmp_path: Path, artifact: Path, round_num: int = 3) -> Path:
    """A checkpoint folder as fedge serve leaves it for a `.tflite` job: the artifact and random trained weights."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    model = Artifact.from_file(artifact)
    model.save(folder / "model.tflite")
    rng = np.random.default_rng(round_num)
    weights = [rng.normal(size=spec.shape).astype(spec.dtype) for spec in model.manifest.weights]
    save_state(folder / "state.npz", LearningProcessState(ModelWeights.from_list(model.manifest, weights), {},
                                                          round_num))
    return folder


def test_an_exported_serve_checkpoint_predicts_as_the_server_evaluated(mosquitto_broker, fleet: str,
                                                                       tmp_path: Path) -> None:
    import keras
    from ai_edge_litert.interpreter import Interpreter

    keras.utils.set_random_seed(0)
    keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                      keras.layers.Dense(3, activation="softmax")]).save(tmp_path / "mlp.keras")
    checkpoints, last = _serve(tmp_path, mosquitto_broker, fleet, tmp_path / "mlp.keras",
                               "--loss", "sparse_categorical_crossentropy", "--batch-size", "4")
    assert sorted(path.name for path in checkpoints.glob("model.*")) == ["model.keras", "model.tflite"]
    x, y = _examples(40, seed=9)

    output = _export(checkpoints, tmp_path / "trained.tflite")
    assert output.startswith(f"wrote {tmp_path / 'trained.tflite'} (inference .tflite, builtin ops): the trained "
                             f"model after 2 rounds of {checkpoints}, ") and output.count("\n") == 2, output
    runner = Interpreter(model_path=str(tmp_path / "trained.tflite")).get_signature_runner()
    (name,) = runner.get_input_details()
    exported = next(iter(runner(**{name: x}).values()))
    assert _correct(exported, y) / 40 == pytest.approx(last["eval_accuracy"], abs=1e-6)  # steps of 1/40: equal

    assert main(["export", str(checkpoints), "-o", str(tmp_path / "trained.keras")]) == 0
    trained = keras.models.load_model(tmp_path / "trained.keras")
    np.testing.assert_allclose(trained.predict_on_batch(x), exported, rtol=0, atol=1e-5)

    # Without its Keras model the same checkpoint gives the trainable artifact with the trained weights.
    bare = shutil.copytree(checkpoints, tmp_path / "bare", ignore=shutil.ignore_patterns("model.keras"))
    assert "(trainable .tflite with the trained weights" in _export(bare, tmp_path / "trainable.tflite")
    np.testing.assert_allclose(TrainableModel.from_file(tmp_path / "trainable.tflite").predict(x), exported,
                               rtol=0, atol=1e-5)


def test_a_keras_model_that_is_not_the_trained_one_is_refused(tmp_path: Path, artifacts: Callable[[str], Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A model.keras with the artifact's weight shapes but another activation: the export does not predict as the
    checkpoint's artifact, so nothing is written."""
    import keras

    checkpoints = _checkpoint(tmp_path, artifacts("mlp"))
    keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="tanh"),
                      keras.layers.Dense(3, activation="softmax")]).save(checkpoints / "model.keras")
    assert main(["export", str(checkpoints), "-o", str(tmp_path / "trained.keras")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"fedge export: error: {checkpoints / 'model.keras'} does not predict as "
                            f"{checkpoints / 'model.tflite'} with the trained weights") and error.count("\n") == 1
    assert not (tmp_path / "trained.keras").exists()


@pytest.mark.device
def test_a_tflite_jobs_serve_checkpoint_exports_without_tensorflow(mosquitto_broker, fleet: str, tmp_path: Path,
                                                                   artifacts: Callable[[str], Path]) -> None:
    model = artifacts("mlp")
    checkpoints, last = _serve(tmp_path, mosquitto_broker, fleet, model)
    assert (checkpoints / "model.tflite").read_bytes() == model.read_bytes()  # even for a .tflite job

    output = _export(checkpoints, tmp_path / "trained.tflite")
    assert output.startswith(f"wrote {tmp_path / 'trained.tflite'} (trainable .tflite with the trained weights")
    assert output.endswith("imported: []\n"), output
    x, y = _examples(40, seed=9)
    predictions = TrainableModel.from_file(tmp_path / "trained.tflite").predict(x)
    assert _correct(predictions, y) / 40 == pytest.approx(last["eval_accuracy"], abs=1e-6)


@pytest.mark.device
@pytest.mark.parametrize("artifact", ["cnn", "scalar"])
def test_the_trained_weights_become_the_artifacts_initial_weights(tmp_path: Path, artifacts: Callable[[str], Path],
                                                                  artifact: str) -> None:
    """The CNN's zero biases share their initial constant with optimizer slots; the custom model has a scalar
    weight and FedProx anchors: each weight still starts at its trained value, and the anchors with it."""
    checkpoints = _checkpoint(tmp_path, artifacts(artifact))
    assert main(["export", str(checkpoints), "-o", str(tmp_path / "trained.tflite")]) == 0
    original = TrainableModel((checkpoints / "model.tflite").read_bytes())
    trained = TrainableModel((tmp_path / "trained.tflite").read_bytes())  # its content hash is verified
    weights = load_state(checkpoints / "state.npz").global_model_weights.to_list()
    assert all(np.array_equal(a, b) for a, b in zip(trained.get_weights(), weights, strict=True))
    original.set_weights(weights)
    x, y = _examples(8, seed=1) if artifact == "scalar" else (np.ones((8, 6, 6, 1), np.float32), np.zeros(8, np.int32))
    np.testing.assert_array_equal(trained.predict(x), original.predict(x))
    for model in (trained, original):  # a step from the same weights, with FedProx's pull to its anchors
        if artifact == "scalar":
            model.set_proximal_mu(1.0)
        model.train_batch(x[:4], y[:4])
    assert all(np.array_equal(a, b) for a, b in zip(trained.get_weights(), original.get_weights(), strict=True))


@pytest.mark.device
@pytest.mark.parametrize("case, output, message", [
    ("missing folder", "m.tflite", "{tmp}/nope: no such folder"),
    ("empty folder", "m.tflite", "{folder}: no state.npz: not a checkpoint folder"),
    ("corrupt state", "m.tflite", "{folder}/state.npz: not a readable fedge checkpoint (BadZipFile"),
    ("no model", "m.tflite", "{folder}: no model.tflite beside state.npz"),
    ("other weights", "m.tflite", "{folder}/state.npz does not hold the weights of {folder}/model.tflite: "),
    ("checkpoint", "m.onnx", "{tmp}/m.onnx: unknown output suffix '.onnx': expected .keras or .tflite"),
    ("checkpoint", "m.keras", "{folder}: no model.keras: the job's model was not a Keras model"),
    ("checkpoint", "checkpoints/model.tflite", "{folder}/model.tflite is one of the checkpoint's own files"),
    ("checkpoint", "missing/m.tflite", "cannot write {tmp}/missing/m.tflite: No such file or directory"),
])
def test_a_checkpoint_that_cannot_be_exported_gets_one_line_and_exit_2(
        tmp_path: Path, artifacts: Callable[[str], Path], capsys: pytest.CaptureFixture[str], case: str, output: str,
        message: str) -> None:
    folder = tmp_path / "checkpoints"
    if case == "empty folder":
        folder.mkdir()
    elif case != "missing folder":
        _checkpoint(tmp_path, artifacts("mlp"))
    if case == "corrupt state":
        (folder / "state.npz").write_bytes(b"PK\x03\x04 not a zip")
    elif case == "no model":
        (folder / "model.tflite").unlink()
    elif case == "other weights":
        save_state(folder / "state.npz", LearningProcessState(ModelWeights([np.zeros((7, 3), np.float32)], []), {}, 1))
    source = tmp_path / "nope" if case == "missing folder" else folder
    assert main(["export", str(source), "-o", str(tmp_path / output)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("fedge export: error: " + message.format(tmp=tmp_path, folder=folder)), \
        captured.err
    assert not (tmp_path / output).exists() or output.startswith("checkpoints/")
