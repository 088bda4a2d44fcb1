"""`fedge serve MODEL.tflite`: the server process's start-up time and peak memory, this tree against another revision.

For each revision, alternately (A B A B ...), one `fedge serve` process of one round (1 epoch)
over a private Mosquitto with two device agents already connected (threads of this process):

- ready: process start -> the server logs "task published" for its first round (imports,
  reading the artifact, building the process, connecting, check-in of the waiting agents);
- whole: process start -> exit, the round and the final checkpoint included;
- peak RSS: the server process's VmHWM, which it prints as it exits;
- whether it imported tensorflow or keras (it prints sys.modules' verdict as it exits).

    python bench/serve_startup.py [--before REV] [--repeats 3] [--model mnist_cnn|mlp]

--before checks REV out into a temporary git worktree and runs its server with PYTHONPATH at it;
the agents are this tree's, so REV must speak this tree's protocol version (it is checked).
"""

from __future__ import annotations

import argparse
import os
import statistics
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300.0
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402

from device_runtime.agent import DeviceAgent  # noqa: E402
from device_runtime.protocol import PROTOCOL_VERSION  # noqa: E402
from fedge.broker import EmbeddedBroker  # noqa: E402

# The server's own peak RSS is read at its exit: wait4's ru_maxrss would count the pages of this
# TensorFlow-loaded process that the child shares between fork and exec.
_SERVE_AND_REPORT = ("import sys\nfrom fedge.cli import main\nstatus = main(sys.argv[1:])\n"
                     "print('imported:', sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
                     "print('peak_kib:', next(line.split()[1] for line in open('/proc/self/status') "
                     "if line.startswith('VmHWM:')))\nsys.exit(status)")


def convert_model(name: str, directory: Path) -> tuple[Path, tuple[int, ...]]:
    """The artifact to serve and its input shape: the McMahan CNN (6.4 MiB) or the tests' 8-16-3 MLP."""
    if name == "mlp":
        from device_artifacts import artifact_path

        return artifact_path("mlp", directory), (8,)
    import keras

    from converters import convert_keras_model
    from fedge.simulation.models import mnist_cnn

    keras.utils.set_random_seed(0)
    artifact = convert_keras_model(mnist_cnn(), loss="sparse_categorical_crossentropy",
                                   optimizer=keras.optimizers.SGD(0.01), batch_size=10)
    return artifact.save(directory / "mnist_cnn.tflite"), (28, 28, 1)


@contextmanager
def worktree(revision: str) -> Iterator[Path]:
    """A temporary git worktree of `revision` (which must speak this tree's protocol), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="fedge-before-") as folder:
        path = Path(folder) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), revision], check=True)
        try:
            errors = (path / "device_runtime" / "protocol" / "errors.py").read_text()
            version = int(re.search(r"^PROTOCOL_VERSION = (\d+)", errors, re.M).group(1))
            if version != PROTOCOL_VERSION:
                raise SystemExit(f"{revision} speaks protocol version {version}, this tree's agents "
                                 f"{PROTOCOL_VERSION}: compare revisions of the same version")
            yield path
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=True)


def serve_once(tree: Path, model: Path, broker: str, fleet: str, workdir: Path) -> dict:
    """One `fedge serve` run from `tree`'s sources; its timings, peak RSS and heavy imports."""
    command = [sys.executable, "-c", _SERVE_AND_REPORT, "serve", str(model), "--broker", broker, "--fleet", fleet,
               "--rounds", "1", "--clients-per-round", "2", "--over-selection", "1", "--deadline", "60",
               "--checkin-timeout", "60", "--checkpoint-dir", str(workdir / "checkpoints"),
               "--metrics-log", str(workdir / "metrics.jsonl")]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=tree)  # `python -c` puts the working directory first on sys.path
    watchdog = threading.Timer(TIMEOUT_S, process.kill)  # a server that never finishes fails the bench
    watchdog.start()
    ready, lines = None, []
    for line in process.stdout:
        lines.append(line)
        if ready is None and "task published" in line:
            ready = time.perf_counter() - started
    status = process.wait()
    whole = time.perf_counter() - started
    watchdog.cancel()
    if status != 0 or ready is None:
        raise SystemExit(f"fedge serve from {tree} failed:\n{''.join(lines)[-3000:]}")
    reported = dict(line.split(": ", 1) for line in lines if line.startswith(("imported: ", "peak_kib: ")))
    return {"ready": ready, "whole": whole, "peak_mib": int(reported["peak_kib"]) / 1024,
            "imported": reported["imported"].strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=None, help="a git revision to compare with (e.g. HEAD~3)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=("mnist_cnn", "mlp"), default="mnist_cnn")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedge-serve-bench-") as folder, \
            (worktree(args.before) if args.before else nullcontext()) as before_tree:
        workdir = Path(folder)
        model, input_shape = convert_model(args.model, workdir)
        model_mib = model.stat().st_size / 2**20
        broker = EmbeddedBroker("mosquitto").start()
        trees = {"this tree": ROOT, **({f"before ({args.before})": before_tree} if before_tree else {})}
        results: dict[str, list[dict]] = {name: [] for name in trees}
        try:
            url = f"mqtt://{broker.host}:{broker.port}"
            for repeat in range(args.repeats):
                for name, tree in trees.items():
                    fleet = f"bench{uuid.uuid4().hex[:8]}"
                    rng = np.random.default_rng(repeat)
                    agents = [DeviceAgent(url, fleet, f"dev-{i}", (rng.normal(size=(20, *input_shape)).astype(np.float32),
                                                                  rng.integers(0, 3, 20).astype(np.int32)),
                                          cache_dir=workdir / f"cache-{fleet}-{i}", num_threads=1) for i in range(2)]
                    for agent in agents:
                        agent.start()
                    _wait(lambda: all(agent.ready for agent in agents))
                    try:
                        results[name].append(serve_once(tree, model, url, fleet, workdir / f"{fleet}"))
                    finally:
                        for agent in agents:
                            agent.stop(timeout=30)
                    print(f"{name:>24} run {repeat + 1}: {results[name][-1]}", flush=True)
        finally:
            broker.stop()
    print(f"\nfedge serve {model.name} ({model_mib:.1f} MiB), 1 round with 2 agents, "
          f"median of {args.repeats}:")
    print("| server | ready s | whole s | peak RSS MiB | imports |\n|---|---:|---:|---:|---|")
    for name, runs in results.items():
        print(f"| {name} | {statistics.median(r['ready'] for r in runs):.2f} | "
              f"{statistics.median(r['whole'] for r in runs):.2f} | "
              f"{statistics.median(r['peak_mib'] for r in runs):.1f} | {runs[0]['imported']} |")


def _wait(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll `condition` until it holds; exit the bench if it does not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("the agents did not connect")
        time.sleep(0.05)


if __name__ == "__main__":
    main()
