"""LiteRT train step vs Keras `train_on_batch`, and peak memory of a LiteRT-only trainer.

Prints, for each model and batch size, the conversion time and artifact size, the median
step time of both in one process and their ratio (LiteRT / Keras; the target is <= 0.7),
then (with mnist_cnn) the peak RSS of a process that trains with LiteRT alone next to one
that trains the same model with TensorFlow.

    python bench/train_step.py [--steps 50] [--threads 1] [--models mnist_cnn small_mlp char_gru]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from fedge.simulation.models import char_gru, mnist_cnn  # noqa: E402

# VmHWM is this process's own peak RSS (ru_maxrss would include the parent's, copied at fork).
_PEAK_RSS = """
def _peak_rss_kb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
"""

_LITERT_TRAINER = """
import sys, numpy as np
{peak}
from device_runtime import TrainableModel
model = TrainableModel.from_file(sys.argv[1], num_threads=int(sys.argv[3]))
b, shape = model.batch_size, model.manifest.input.shape
rng = np.random.default_rng(0)
x, y = rng.random((b, *shape), dtype=np.float32), rng.integers(0, 10, b).astype(np.int32)
for _ in range(int(sys.argv[2])):
    model.train_batch(x, y)
print("tensorflow" in sys.modules, _peak_rss_kb())
"""

_KERAS_TRAINER = """
import os, sys
{peak}os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import keras, numpy as np
model = keras.models.load_model(sys.argv[1])
b, shape = int(sys.argv[3]), model.inputs[0].shape[1:]
rng = np.random.default_rng(0)
x, y = rng.random((b, *shape), dtype=np.float32), rng.integers(0, 10, b).astype(np.int32)
for _ in range(int(sys.argv[2])):
    model.train_on_batch(x, y)
print("tensorflow" in sys.modules, _peak_rss_kb())
"""


def small_mlp():
    """A 784-128-64-10 MLP (109,386 parameters)."""
    import keras

    layers = keras.layers
    return keras.Sequential([keras.Input((784,)), layers.Dense(128, activation="relu"),
                             layers.Dense(64, activation="relu"), layers.Dense(10, activation="softmax")],
                            name="small_mlp")


# model name: (builder, batch sizes, loss); char_gru pads with id 0, as examples/text_generation.py
BENCH_MODELS = {
    "mnist_cnn": (mnist_cnn, (10, 32), "sparse_categorical_crossentropy"),
    "small_mlp": (small_mlp, (10, 32), "sparse_categorical_crossentropy"),
    "char_gru": (char_gru, (8,), {"class_name": "SparseCategoricalCrossentropy",
                                  "config": {"from_logits": True, "ignore_class": 0}}),
}


def random_batch(model, batch_size: int, rng):
    """Random inputs and labels of the model's shapes: token ids 1.. for an integer input, else [0, 1) floats."""
    import numpy as np

    classes = model.outputs[0].shape[-1]
    shape = tuple(model.inputs[0].shape[1:])
    if model.inputs[0].dtype.startswith("int"):
        x = rng.integers(1, classes, (batch_size, *shape)).astype(np.int32)
    else:
        x = rng.random((batch_size, *shape), dtype=np.float32)
    return x, rng.integers(1, classes, (batch_size, *model.outputs[0].shape[1:-1])).astype(np.int32)


def median_ms(step, steps: int) -> float:
    for _ in range(5):
        step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def time_pairs(build, batch_size: int, steps: int, thread_counts: list[int], workdir: Path,
               loss="sparse_categorical_crossentropy") -> list[dict]:
    """Median train-step time of LiteRT (per thread count) and of Keras on the same model, weights
    and batch, timed alternately in this process; also the conversion time and artifact size."""
    import keras
    import numpy as np

    from converters import convert_keras_model
    from device_runtime import TrainableModel

    keras.utils.set_random_seed(0)
    model = build()
    started = time.perf_counter()
    result = convert_keras_model(model, loss=keras.losses.get(loss),
                                 optimizer=keras.optimizers.SGD(0.01), batch_size=batch_size)
    convert_s = time.perf_counter() - started
    artifact = result.save(workdir / f"{model.name}_b{batch_size}.tflite")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=keras.losses.get(loss))
    model.save(workdir / f"{model.name}.keras")
    x, y = random_batch(model, batch_size, np.random.default_rng(0))
    rows = []
    for threads in thread_counts:
        litert = TrainableModel(result.tflite_bytes, num_threads=threads)
        litert_ms = median_ms(lambda: litert.train_batch(x, y), steps)
        keras_ms = median_ms(lambda: model.train_on_batch(x, y), steps)
        rows.append({"model": model.name, "params": model.count_params(), "batch": batch_size, "threads": threads,
                     "litert_ms": litert_ms, "keras_ms": keras_ms, "ratio": litert_ms / keras_ms,
                     "convert_s": convert_s, "artifact_mib": len(result.tflite_bytes) / 2**20,
                     "artifact": str(artifact), "keras_file": str(workdir / f"{model.name}.keras")})
    return rows


def peak_rss_mb(script: str, *args: str) -> tuple[float, bool]:
    """Peak RSS (MB) of a fresh Python process running `script`, and whether it imported TensorFlow."""
    run = subprocess.run([sys.executable, "-c", script.format(peak=_PEAK_RSS), *args], capture_output=True, text=True, check=True)
    imported_tf, kilobytes = run.stdout.split()[-2:]
    return int(kilobytes) / 1024, imported_tf == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="LiteRT interpreter threads to measure (Keras uses every core)")
    parser.add_argument("--models", nargs="+", choices=sorted(BENCH_MODELS), default=["mnist_cnn", "small_mlp"],
                        help="models to time (peak memory is measured with mnist_cnn)")
    args = parser.parse_args()
    import tensorflow as tf

    print(f"# tensorflow {tf.__version__}, {os.cpu_count()} cores; Keras uses every core; "
          f"median of {args.steps} steps")
    print(f"{'model':12s} {'params':>10s} {'batch':>5s} {'threads':>7s} {'LiteRT ms':>10s} {'Keras ms':>9s} "
          f"{'ratio':>6s} {'convert s':>9s} {'MiB':>5s}")
    with tempfile.TemporaryDirectory() as directory:
        rows = [dict(row, bench_model=name) for name in args.models for b in BENCH_MODELS[name][1]
                for row in time_pairs(BENCH_MODELS[name][0], b, args.steps, args.threads, Path(directory),
                                      BENCH_MODELS[name][2])]
        for row in rows:
            print(f"{row['model']:12s} {row['params']:>10,d} {row['batch']:>5d} {row['threads']:>7d} "
                  f"{row['litert_ms']:>10.2f} {row['keras_ms']:>9.2f} {row['ratio']:>6.2f} "
                  f"{row['convert_s']:>9.1f} {row['artifact_mib']:>5.2f}")
        if "mnist_cnn" not in args.models:
            print(json.dumps({"rows": [{k: v for k, v in r.items() if k not in ("artifact", "keras_file")}
                                       for r in rows]}))
            return
        cnn = next(row for row in rows if row["bench_model"] == "mnist_cnn")  # its Keras name is mcmahan_cnn
        litert_mb, litert_tf = peak_rss_mb(_LITERT_TRAINER, cnn["artifact"], "100", str(cnn["threads"]))
        keras_mb, _ = peak_rss_mb(_KERAS_TRAINER, cnn["keras_file"], "100", str(cnn["batch"]))
        print(f"\npeak RSS training the McMahan CNN (batch {cnn['batch']}, 100 steps):")
        print(f"  LiteRT only, {cnn['threads']} thread(s) (tensorflow imported: {litert_tf}): {litert_mb:.1f} MB")
        print(f"  TensorFlow/Keras: {keras_mb:.1f} MB  (LiteRT/TF = {litert_mb / keras_mb:.2f})")
        print(json.dumps({"rows": [{k: v for k, v in r.items() if k not in ("artifact", "keras_file")} for r in rows],
                          "rss_mb": {"litert": litert_mb, "tensorflow": keras_mb}}))


if __name__ == "__main__":
    main()
