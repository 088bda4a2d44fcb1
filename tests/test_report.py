"""The simulation report: plots and the final model in both formats (the server writes the metrics log)."""

from __future__ import annotations

import keras
import numpy as np
from PIL import Image

from device_runtime.interpreter import load_interpreter
from fedge.job import load_job
from fedge.report import write_report


def test_report_folder_has_plots_and_a_deployable_model(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    weights = [w.numpy() + 0.5 for w in model.weights]
    rounds = [{"round": r, "seconds": 1.0 + r, "selected": 13, "accepted": 10, "dropped": {"late": r % 2},
               "bytes_up": 1000, "bytes_down": 2000, "train_loss": 1.0 / r, "train_accuracy": 0.5 + r / 20,
               "eval_loss": None if r == 1 else 1.2 / r, "eval_accuracy": None if r == 1 else 0.4 + r / 20}
              for r in range(1, 6)]
    caption = load_job(None).summary()  # the bundled digits job's configuration
    written = write_report(tmp_path / "report", rounds, model, weights, caption)

    names = {path.name for path in written}
    assert names == {"accuracy_loss.png", "round_durations.png", "participation.png",
                     "final_model.keras", "final_model.tflite"}
    for path in written:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
            with Image.open(path) as image:  # the caption drawn under the plot is also the PNG's Description
                assert image.text["Description"] == caption
    without_keras = write_report(tmp_path / "tflite-job", rounds, None, weights)  # a job whose model is a .tflite
    assert {path.name for path in without_keras} == {"accuracy_loss.png", "round_durations.png", "participation.png"}

    reloaded = keras.models.load_model(tmp_path / "report" / "final_model.keras")
    for got, want in zip(reloaded.get_weights(), weights, strict=True):
        np.testing.assert_array_equal(got, want)
    interpreter = load_interpreter((tmp_path / "report" / "final_model.tflite").read_bytes())
    runner = interpreter.get_signature_runner()
    x = np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)
    (output,) = runner(**{runner.get_input_details().popitem()[0]: x}).values()
    np.testing.assert_allclose(output, reloaded(x).numpy(), rtol=1e-5, atol=1e-6)


def test_a_jobs_summary_says_model_data_process_rounds_and_fleet(tmp_path):
    from device_artifacts import artifact_path
    from fedge.job import parse_override

    summary = load_job(None, [parse_override(o) for o in (
        "process.algorithm=fedprox", "process.proximal_mu=0.01", "process.server_optimizer.name=adam",
        "process.aggregator.clip_norm=0.5")]).summary()
    assert summary == ("digits: fedge.simulation.models:digits_classifier on digits (dirichlet); FedProx mu 0.01, "
                       "5 local epoch(s) of sgd lr 0.1 momentum 0.9, server adam, mean clip 0.5; 20 of 40 devices a "
                       "round (over-selection 1.3, deadline 20 s, float32), seed 0")
    served = load_job(None, [parse_override(o) for o in (
        f"model.tflite={artifact_path('mlp', tmp_path)}", "model.factory=", "model.loss=", "model.batch_size=",
        "model.optimizer=", "process.learning_rate=0.05")]).summary()
    assert "5 local epoch(s) of the artifact's optimizer at lr 0.05, server sgd, mean;" in served, served
