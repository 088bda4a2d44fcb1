"""Regenerate the device-round conformance vectors: `python tests/conformance/make_vectors.py` (needs TensorFlow).

Each vector folder holds what a device receives (model.tflite, task.json, weights.bin), what it
holds (data.npz) and what it must send (update.bin, expected.json), computed by
device_runtime.rounds.DeviceRound. Run it only when the protocol or the training semantics change
on purpose: the committed vectors are what every client, Python or not, is checked against.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: device_artifacts converts the models

from device_artifacts import convert  # noqa: E402

from device_runtime import TrainableModel, load_local_data  # noqa: E402
from device_runtime.protocol import (ClientWork, RoundConfig, Task, decode_update, encode_task,  # noqa: E402
                                     encode_weights, payload_hash)
from device_runtime.rounds import DeviceRound  # noqa: E402

FLEET = "conformance"
DEVICE = "dev-000"
RUN_ID = "conformance-run"
DEADLINE = 4102444800.0  # 2100-01-01: far enough that no budget depends on the clock

# name -> (test artifact, examples, the task's round, seed and client work, tolerance (rtol, atol))
VECTORS = {
    "fedavg-mlp-float32": ("mlp", 22, 3, 12345, ClientWork(epochs=2), (1e-5, 1e-6)),
    "fedprox-scalar-float16": ("scalar", 13, 7, 777, ClientWork(epochs=3, max_steps=5, learning_rate=0.05,
                                                                    proximal_mu=0.5, encoding="float16"), (1e-3, 1e-4)),
    "momentum-cnn-int8": ("cnn", 10, 0, 2**62 + 5, ClientWork(epochs=1, encoding="int8"), (0.0, None)),
}


def _data(model: TrainableModel, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` examples of the model's input, labels from its 3 classes."""
    x = rng.normal(size=(count, *model.manifest.input.shape)).astype(np.float32)
    return x, rng.integers(0, 3, size=count).astype(np.int32)


def make(name: str, folder: Path) -> None:
    """Write one vector into `folder`."""
    artifact, count, round_id, seed, work, (rtol, atol) = VECTORS[name]
    folder.mkdir(parents=True)
    model_path = convert(artifact, folder)
    model_path.rename(folder / "model.tflite")
    model_bytes = (folder / "model.tflite").read_bytes()
    model = TrainableModel(model_bytes, num_threads=1)
    rng = np.random.default_rng(sum(map(ord, name)))
    x, y = _data(model, count, rng)
    np.savez(folder / "data.npz", x=x, y=y)
    weights = [(w + rng.normal(scale=0.05, size=w.shape)).astype(np.float32) for w in model.get_weights()]
    weights_payload = encode_weights(FLEET, round_id, model.content_hash, weights, list(model.manifest.metrics.variables),
                                     run_id=RUN_ID)
    (folder / "weights.bin").write_bytes(weights_payload)
    task = Task(RUN_ID, RoundConfig(round_id, seed, work), model.content_hash, payload_hash(weights_payload), DEADLINE,
                (DEVICE,))
    (folder / "task.json").write_bytes(encode_task(task))
    device_round = DeviceRound(FLEET, DEVICE, task)
    outcome = device_round.train(model, load_local_data((x, y), model.manifest),
                                 device_round.global_weights(weights_payload, model), device_round.time_budget(time.time()))
    (folder / "update.bin").write_bytes(outcome.payload)
    update = decode_update(outcome.payload, model.manifest)
    quantum = max(float(np.abs(t).max(initial=0.0)) for t in update.tensors) / 127 if atol is None else None
    (folder / "expected.json").write_text(json.dumps({
        "fleet": FLEET, "device_id": DEVICE, "round": round_id, "model_hash": model.content_hash,
        "num_examples": update.num_examples, "metrics": update.metrics, "encoding": work.encoding,
        "rtol": rtol, "atol": atol if atol is not None else 1.01 * quantum,
        "steps": outcome.result.steps}, indent=1, sort_keys=True) + "\n")
    print(f"{name}: {len(model_bytes):,}-byte model, {count} examples, {outcome.result.steps} steps, "
          f"{len(outcome.payload):,}-byte update")


def main() -> int:
    """Replace every vector folder."""
    for name in VECTORS:
        folder = HERE / name
        if folder.exists():
            shutil.rmtree(folder)
        make(name, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
