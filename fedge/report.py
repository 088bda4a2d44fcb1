"""The report folder of a simulation: per-round plots and the final model, beside the server's metrics log.

The server appends `metrics.jsonl` (one JSON object per round) as rounds end; at the end the
report adds `accuracy_loss.png`, `round_durations.png`, `participation.png` and, for a Keras
model, `final_model.keras` (the trained model) and `final_model.tflite` (a plain inference
model, builtin ops, for deployment without the training signatures).
`claim_report_folder` decides whether a folder may become (or be replaced by) a report;
`reopen_report_folder` finds a stopped run's report to resume (`fedge simulate --resume`).
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedge.server.checkpoint import CHECKPOINT_FILE
from fedge.server.reports import surplus_and_refused

SIMULATION_LOG = "simulation.log"
METRICS_LOG = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
REPORT_MARKER = ".fedge-report"
# Everything a report folder may hold: only a folder of these, with the marker, is ever replaced.
REPORT_ENTRIES = frozenset({REPORT_MARKER, SIMULATION_LOG, CHECKPOINTS, METRICS_LOG, "metrics.csv", "tensorboard",
                            "accuracy_loss.png", "round_durations.png", "participation.png", "final_model.keras",
                            "final_model.tflite"})


class ReportFolderError(Exception):
    """The folder cannot become a report folder without deleting something fedge did not write."""


def claim_report_folder(path: Path) -> Path:
    """Make `path` an empty report folder, marked as fedge's.

    A missing or empty folder is created and marked; an earlier report (the marker and nothing
    but REPORT_ENTRIES) is replaced; anything else raises ReportFolderError and is left as is,
    so a mistyped --out never deletes a user's files.
    """
    if path.exists() and not path.is_dir():
        raise ReportFolderError(f"{path} exists and is not a folder")
    entries = sorted(entry.name for entry in path.iterdir()) if path.exists() else []
    if entries:
        foreign = [name for name in entries if name not in REPORT_ENTRIES and not _atomic_leftover(name)]
        if REPORT_MARKER not in entries or foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "") if foreign else "no report marker"
            raise ReportFolderError(f"{path} holds files fedge did not write ({shown}): give --out a new or empty "
                                    f"folder, or one an earlier fedge simulate wrote")
        for name in entries:
            entry = path / name
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / REPORT_MARKER).write_text("a fedge simulate report; the next run into this folder replaces it\n")
    return path


def _atomic_leftover(name: str) -> bool:
    """Whether `name` is the temporary file of a report entry replaced atomically by a run killed meanwhile
    (device_runtime.atomic_file names them `.<entry>.<random>.tmp`)."""
    return name.startswith(".") and name.endswith(".tmp") and name[1:].rsplit(".", 2)[0] in REPORT_ENTRIES


def reopen_report_folder(path: Path) -> Path:
    """`path` as an earlier report whose run can be resumed (marked, with a checkpoint); ReportFolderError naming
    what is missing otherwise. Nothing in it is removed: the resumed run appends to its metrics and log."""
    checkpoint = path / CHECKPOINTS / CHECKPOINT_FILE
    if not (path / REPORT_MARKER).is_file():
        raise ReportFolderError(f"{path} is not a fedge simulate report folder: nothing to resume (run without "
                                f"--resume to start one)")
    if not checkpoint.is_file():
        raise ReportFolderError(f"{path} has no checkpoint ({checkpoint}): its run ended before its first round; "
                                f"run without --resume to start again")
    return path


def _series(rounds: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_rounds(out_dir: Path, rounds: Sequence[dict[str, Any]], caption: str = "") -> list[Path]:
    """Accuracy and loss per round, round durations, and participation (selected/accepted/dropped), each figure
    captioned with `caption` (the run's configuration; also the PNG's Description)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, (accuracy_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_accuracy", "train (clients)"), ("eval_accuracy", "held-out")):
        accuracy_axis.plot(*_series(rounds, key), marker="o", markersize=3, label=label)
    for key, label in (("train_loss", "train (clients)"), ("eval_loss", "held-out")):
        loss_axis.plot(*_series(rounds, key), marker="o", markersize=3, label=label)
    accuracy_axis.set(title="accuracy", xlabel="round", ylim=(0, 1))
    loss_axis.set(title="loss", xlabel="round")
    for axis in (accuracy_axis, loss_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    written.append(_save(figure, out_dir / "accuracy_loss.png", caption))

    figure, axis = plt.subplots(figsize=(6, 4))
    axis.bar(*_series(rounds, "seconds"), color="tab:gray")
    axis.set(title="round duration", xlabel="round", ylabel="seconds")
    written.append(_save(figure, out_dir / "round_durations.png", caption))

    figure, axis = plt.subplots(figsize=(6, 4))
    numbers = [r["round"] for r in rounds]
    surplus, refused = zip(*(surplus_and_refused(r.get("dropped") or {}) for r in rounds)) if rounds else ((), ())
    axis.plot(numbers, [r.get("selected", 0) for r in rounds], marker="o", markersize=3, label="selected")
    axis.plot(numbers, [r.get("accepted", 0) for r in rounds], marker="o", markersize=3, label="reports accepted")
    axis.bar(numbers, surplus, color="tab:gray", alpha=0.5, label="surplus (after the goal or deadline)")
    axis.bar(numbers, refused, bottom=surplus, color="tab:red", alpha=0.6, label="refused by the checks")
    axis.set(title="participation", xlabel="round", ylabel="devices")
    axis.grid(alpha=0.3)
    axis.legend()
    written.append(_save(figure, out_dir / "participation.png", caption))
    plt.close("all")
    return written


def _save(figure: Any, path: Path, caption: str) -> Path:
    """Write `figure` with `caption` wrapped under it and kept as the PNG's Description."""
    lines = textwrap.wrap(caption, int(figure.get_figwidth() * 14))  # ~14 characters an inch at 7 points
    if lines:
        figure.text(0.5, 0.01, "\n".join(lines), ha="center", va="bottom", fontsize=7, color="dimgray")
    figure.tight_layout(rect=(0, 0.01 + 0.03 * len(lines) * 4 / figure.get_figheight(), 1, 1))
    figure.savefig(path, dpi=110, metadata={"Description": caption})
    return path


def save_final_model(out_dir: Path, keras_model: Any, weights: Sequence[np.ndarray]) -> tuple[Path, Path]:
    """The trained model as `.keras` and as an inference-only `.tflite` (builtin ops), as `fedge export` writes
    them."""
    from fedge.export import save_inference_tflite, save_keras_model

    keras_model.set_weights(list(weights))
    return (save_keras_model(keras_model, out_dir / "final_model.keras"),
            save_inference_tflite(keras_model, out_dir / "final_model.tflite"))


def write_report(out_dir: str | Path, rounds: Sequence[dict[str, Any]], keras_model: Any | None,
                 weights: Sequence[np.ndarray], caption: str = "") -> list[Path]:
    """The plots, and the final model when the job's model is a Keras model; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = plot_rounds(out, rounds, caption)
    if keras_model is not None:
        written.extend(save_final_model(out, keras_model, weights))
    return written
