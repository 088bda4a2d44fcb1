"""The README's main job (`fedge simulate`, the bundled digits job) run N times: its learning curves and figures.

Each run is a whole `fedge simulate` process (conversion, embedded Mosquitto, server, 40
simulated devices) into its own report folder; the runs differ only in the fleet's timing
(which selected devices report first, who drops out), since the seed fixes the rest. Prints,
per run, the first round whose held-out accuracy is at least twice chance (0.2 for 10
classes), the held-out accuracy after rounds 5, 10, 20 and the last, and the wall time; then
plots every run's held-out accuracy per round into one figure (docs/main_job.png by default).

    python bench/main_job.py [--runs 3] [--figure docs/main_job.png] [-- extra fedge simulate flags]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHANCE = 0.1  # ten digits
LEFT_CHANCE = 2 * CHANCE


def run_once(out: Path, extra: list[str]) -> tuple[list[dict], float]:
    """One `fedge simulate` of the bundled job into `out`: its metrics records and wall seconds."""
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "fedge.cli", "simulate", "--out", str(out), *extra],
                         capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"fedge simulate failed ({run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return records, seconds


def accuracy_after(records: list[dict], rounds: int) -> float:
    """Held-out accuracy after the first `rounds` rounds (round id rounds - 1); NaN when that round failed."""
    return next((r.get("eval_accuracy", math.nan) for r in records if r["round"] == rounds - 1), math.nan)


def plot(curves: list[list[dict]], path: Path) -> None:
    """Every run's held-out (solid) and clients' train (dotted) accuracy per round, chance marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.6))
    for index, records in enumerate(curves, 1):
        rounds = [r["round"] + 1 for r in records]  # a failed round has no accuracies: a gap in the curve
        line, = axis.plot(rounds, [r.get("eval_accuracy", math.nan) for r in records], label=f"run {index}: held-out")
        axis.plot(rounds, [r.get("train_accuracy", math.nan) for r in records], ":", color=line.get_color(), alpha=0.6)
    axis.axhline(CHANCE, color="gray", linewidth=0.8, linestyle="--", label="chance")
    axis.set(title="fedge simulate (bundled digits job): held-out accuracy, dotted: clients' train accuracy",
             xlabel="rounds done", ylabel="accuracy", ylim=(0, 1))
    axis.title.set_fontsize(9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "main_job.png")
    parser.add_argument("extra", nargs="*", help="more fedge simulate flags (after --)")
    args = parser.parse_args()

    curves = []
    with tempfile.TemporaryDirectory(prefix="fedge-main-job-") as temp:
        for index in range(1, args.runs + 1):
            records, seconds = run_once(Path(temp) / f"run{index}", args.extra)
            curves.append(records)
            left = next((r["round"] + 1 for r in records if r.get("eval_accuracy", 0) >= LEFT_CHANCE), None)
            marks = "  ".join(f"after {n}: {accuracy_after(records, n):.3f}"
                              for n in (5, 10, 20, len(records)) if n <= len(records))
            print(f"run {index}: held-out >= {LEFT_CHANCE} after round {left}; {marks}; {seconds:.0f} s wall",
                  flush=True)
    finals = [records[-1].get("eval_accuracy", math.nan) for records in curves]
    print(f"final held-out accuracy: {', '.join(f'{a:.3f}' for a in finals)} (median {statistics.median(finals):.3f})")
    plot(curves, args.figure)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
