"""Federated image classification, the flow of TFF's image-classification tutorial, on digits.

scikit-learn's handwritten digits (bundled, no download) are split over non-IID clients
(Dirichlet label skew). Each round samples clients, runs FedAvg through the trainable
.tflite every client executes (in parallel worker processes), and prints the round's
metrics in TFF's structure; the final model is evaluated on held-out digits.

    python examples/image_classification.py [--rounds 30] [--clients-per-round 10]
    python examples/image_classification.py --aggregator median        # robust to poisoned clients
    python examples/image_classification.py --aggregator dp --noise-multiplier 0.5 --clip-norm 1.0   # DP-FedAvg
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fedge.learning  # noqa: E402
from fedge.simulation import models  # noqa: E402
from fedge.simulation.datasets import digits  # noqa: E402


def create_keras_model() -> keras.Model:
    """A small CNN for 8x8 digits (5,130 parameters)."""
    return models.digits_cnn()


def model_fn() -> fedge.learning.Model:
    """Called by fedge, takes no arguments, as in TFF."""
    return fedge.learning.from_keras_model(
        create_keras_model(),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        input_spec=(tf.TensorSpec([None, 8, 8, 1], tf.float32), tf.TensorSpec([None], tf.int32)),
        metrics=["accuracy"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20, help="clients the training digits are split over")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (smaller: more skewed)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--clients-per-round", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=0.1, help="client SGD learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aggregator", choices=["mean", "median", "trimmed_mean", "dp"], default="mean",
                        help="FedAvg's mean, a robust median or trimmed mean, or DP-FedAvg")
    parser.add_argument("--clip-norm", type=float, default=1.0, help="DP-FedAvg: each update's L2 norm bound S")
    parser.add_argument("--noise-multiplier", type=float, default=0.5, help="DP-FedAvg: noise std z * S on the sum")
    args = parser.parse_args()
    aggregators = {
        "mean": fedge.learning.MeanAggregator,
        "median": fedge.learning.CoordinateMedian,
        "trimmed_mean": lambda: fedge.learning.TrimmedMean(trim_fraction=0.2),
        "dp": lambda: fedge.learning.GaussianFixedDP(args.noise_multiplier, args.clients_per_round, args.clip_norm,
                                                     sampling_probability=args.clients_per_round / args.clients),
    }

    keras.utils.set_random_seed(args.seed)
    train_data, test_data = digits.load_data(num_clients=args.clients, partition="dirichlet", alpha=args.alpha,
                                             seed=args.seed)
    sizes = [len(train_data.create_dataset_for_client(c)) for c in train_data.client_ids]
    print(f"{len(train_data.client_ids)} clients, {sum(sizes)} training digits ({min(sizes)}-{max(sizes)} per "
          f"client), {len(test_data)} held-out digits")

    process = fedge.learning.build_federated_averaging_process(
        model_fn,
        client_optimizer_fn=lambda: keras.optimizers.SGD(learning_rate=args.learning_rate, momentum=0.9),
        server_optimizer_fn=lambda: fedge.learning.optimizers.SGD(learning_rate=1.0),
        batch_size=16, client_epochs=args.local_epochs, seed=args.seed,
        model_aggregator=aggregators[args.aggregator]())  # dp: metrics["aggregator"]["dp_epsilon"] each round
    evaluation = fedge.learning.build_federated_evaluation(model_fn, batch_size=16)
    state = process.initialize()

    rng = np.random.default_rng(args.seed)
    for round_num in range(1, args.rounds + 1):
        started = time.perf_counter()
        sampled = rng.choice(train_data.client_ids, size=args.clients_per_round, replace=False)
        federated_train_data = [train_data.create_dataset_for_client(client) for client in sampled]
        state, metrics = process.next(state, federated_train_data)
        print(f"round {round_num:2d}, metrics={metrics} ({time.perf_counter() - started:.1f} s)")

    test_metrics = evaluation(process.get_model_weights(state), [test_data])
    print(f"held-out evaluation after {args.rounds} rounds: {test_metrics}")


if __name__ == "__main__":
    main()
