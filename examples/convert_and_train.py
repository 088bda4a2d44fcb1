"""Convert a Keras CNN to a trainable .tflite, then train and evaluate it in LiteRT alone.

The data is scikit-learn's handwritten digits (8x8 images, shipped inside the package).
Training runs through `device_runtime.TrainableModel`, exactly what a device runs; Keras
is used only to define the model. Writes the artifact to reports/digits_cnn.tflite.

    python examples/convert_and_train.py [--epochs 12] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
from converters import convert_keras_model  # noqa: E402
from device_runtime import TrainableModel, iterate_batches  # noqa: E402
from device_runtime.artifact import list_operators  # noqa: E402
from fedge.simulation.datasets.digits import train_test_arrays  # noqa: E402
from fedge.simulation.models import digits_cnn  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="reports")
    args = parser.parse_args()

    keras.utils.set_random_seed(args.seed)
    x_train, y_train, x_test, y_test = train_test_arrays(seed=args.seed)
    started = time.perf_counter()
    result = convert_keras_model(digits_cnn(), loss="sparse_categorical_crossentropy",
                                 optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
                                 batch_size=args.batch_size, metrics=["accuracy"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = result.save(Path(args.out) / "digits_cnn.tflite")
    operators = list_operators(result.tflite_bytes)
    print(f"converted in {time.perf_counter() - started:.1f} s -> {path} ({len(result.tflite_bytes):,} bytes, "
          f"{result.manifest.num_parameters:,} parameters, {len(operators)} operator kinds, "
          f"builtin only: {all(op.builtin for op in operators)})")

    model = TrainableModel(result.tflite_bytes)
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        for x, y, mask in iterate_batches(x_train, y_train, args.batch_size, shuffle_seed=args.seed + epoch):
            model.train_step(x, y, mask)
        train = model.finalized_metrics(model.reset_metrics())
        for x, y, mask in iterate_batches(x_test, y_test, args.batch_size):
            model.evaluate_step(x, y, mask)
        test = model.finalized_metrics(model.reset_metrics())
        print(f"epoch {epoch}: train loss {train['loss']:.4f} accuracy {train['accuracy']:.3f} | "
              f"test loss {test['loss']:.4f} accuracy {test['accuracy']:.3f} "
              f"({int(test['num_examples'])} examples) | {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
