"""The examples a new user copies from run end to end (short settings) and print what they promise."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    run = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def test_image_classification_prints_tff_structured_rounds_and_an_evaluation():
    out = run_example("image_classification.py", "--rounds", "3", "--clients", "6", "--clients-per-round", "3",
                      "--local-epochs", "1")
    rounds = [line for line in out.splitlines() if line.startswith("round ")]
    assert len(rounds) == 3
    metrics = ast.literal_eval(rounds[-1].split("metrics=", 1)[1].rsplit(" (", 1)[0])
    assert set(metrics) == {"distributor", "client_work", "aggregator", "finalizer"}
    train = metrics["client_work"]["train"]
    assert {"loss", "accuracy", "num_examples", "num_batches"} <= set(train) and train["num_examples"] > 0
    assert metrics["aggregator"]["num_clients"] == 3 and metrics["aggregator"]["bytes_up"] > 0
    evaluation = ast.literal_eval(out.split("held-out evaluation after 3 rounds: ", 1)[1].strip())
    assert evaluation["eval"]["num_examples"] == 360


def test_convert_and_train_learns_digits(tmp_path):
    out = run_example("convert_and_train.py", "--epochs", "8", "--out", str(tmp_path))
    assert "builtin only: True" in out
    last = [line for line in out.splitlines() if line.startswith("epoch 8:")][0]
    test_accuracy = float(last.split("test loss")[1].split("accuracy")[1].split()[0])
    assert test_accuracy > 0.85, last
    assert (tmp_path / "digits_cnn.tflite").stat().st_size > 0


def test_text_generation_loss_falls_and_forward_samples_text(tmp_path):
    lines = ["Now is the winter of our discontent", "Made glorious summer by this sun of York;",
             "And all the clouds that lour'd upon our house", "In the deep bosom of the ocean buried."]
    play = "".join(f"{role}:\n" + "\n".join(lines[i % 4:] + lines[:i % 4]) + "\n\n"
                   for i, role in enumerate(["GLOUCESTER", "CLARENCE", "BRAKENBURY", "HASTINGS"] * 6))
    (tmp_path / "play.txt").write_text(play)
    out = run_example("text_generation.py", "--text", str(tmp_path / "play.txt"), "--rounds", "4",
                      "--clients-per-round", "3", "--seq-length", "16", "--units", "32",
                      "--prompt", "GLOUCESTER:\n", "--generate", "40")
    assert "4 speaking roles" in out
    losses = [float(line.split("loss=", 1)[1].split(",")[0]) for line in out.splitlines() if line.startswith("round ")]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, losses
    samples = out.split("(forward signature, LiteRT) ---\n")[1:]
    assert len(samples) == 2
    assert all(s.startswith("GLOUCESTER:\n") and len(s.split("\n---")[0].rstrip("\n")) >= len("GLOUCESTER:\n") + 30
               for s in samples)
