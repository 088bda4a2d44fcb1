"""Federated text generation, the flow of TFF's text-generation tutorial, on Shakespeare's speaking roles.

Every speaking role of a play is a client (fedge.simulation.datasets.shakespeare.load_play_text:
TFF's character ids and sequences). A character model (Embedding -> GRU -> Dense over the
vocabulary) is trained with FedAvg through the trainable .tflite every client runs; padding
positions are left out of the loss with `ignore_class`. Each round prints its metrics in
TFF's structure; at the end the trained weights go into that same .tflite and its `forward`
signature (the LiteRT interpreter, no Keras) samples text one character at a time.

    python examples/text_generation.py --text tinyshakespeare.txt [--rounds 10]

tinyshakespeare.txt is https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import fedge.learning  # noqa: E402
from device_runtime import TrainableModel  # noqa: E402
from fedge.simulation.datasets import shakespeare  # noqa: E402
from fedge.simulation.models import char_gru  # noqa: E402

# ids the sampler never draws: padding, unknown characters, begin and end of a speech
_NOT_SAMPLED = [shakespeare.PAD_ID, shakespeare.OOV_ID, shakespeare.BOS_ID, shakespeare.EOS_ID]


def sample_text(model: TrainableModel, prompt: str, length: int, temperature: float,
                rng: np.random.Generator) -> list[str]:
    """One continuation of `prompt` per batch row, drawn character by character from `forward`.

    The model is causal, so the logits at the last real position of a window depend on that
    window alone: each step runs the last seq_length ids, PAD-filled after them.
    """
    seq_length, rows = model.manifest.input.shape[0], model.batch_size
    streams = np.tile(np.concatenate([[shakespeare.BOS_ID], shakespeare.encode(prompt)]), (rows, 1))
    for _ in range(length):
        context = streams[:, -seq_length:]
        window = np.full((rows, seq_length), shakespeare.PAD_ID, np.int32)
        window[:, :context.shape[1]] = context
        logits = model.predict(window)[:, context.shape[1] - 1].astype(np.float64) / temperature
        logits[:, _NOT_SAMPLED] = -np.inf
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        drawn = [rng.choice(len(p), p=p) for p in probabilities]
        streams = np.concatenate([streams, np.array(drawn, np.int32)[:, None]], axis=1)
    return [prompt + shakespeare.decode(row[-length:]) for row in streams]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, required=True,
                        help="a play: 'Name:' lines, then the speech (tinyshakespeare.txt: see this file's docstring)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients-per-round", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=shakespeare.SEQUENCE_LENGTH)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--embedding-dim", type=int, default=8)
    parser.add_argument("--units", type=int, default=256, help="GRU units")
    parser.add_argument("--max-client-steps", type=int, default=None, help="cap on each client's steps a round")
    parser.add_argument("--client-optimizer", choices=["adam", "sgd"], default="adam")
    parser.add_argument("--learning-rate", type=float, default=0.01, help="client learning rate")
    parser.add_argument("--prompt", default="ROMEO:\n")
    parser.add_argument("--generate", type=int, default=200, help="characters to sample after the prompt")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.text.is_file():
        parser.error(f"{args.text} not found; download tinyshakespeare.txt (see this file's docstring)")

    keras.utils.set_random_seed(args.seed)
    train_data = shakespeare.load_play_text(args.text, seq_length=args.seq_length)
    sizes = [len(train_data.create_dataset_for_client(c)) for c in train_data.client_ids]
    print(f"{len(sizes)} speaking roles, {sum(sizes)} sequences of {args.seq_length} characters "
          f"({min(sizes)}-{max(sizes)} per role)")

    def model_fn() -> fedge.learning.Model:
        """Called by fedge, takes no arguments, as in TFF."""
        return fedge.learning.from_keras_model(
            char_gru(args.seq_length, args.embedding_dim, args.units, shakespeare.VOCAB_SIZE),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=shakespeare.PAD_ID),
            input_spec=(tf.TensorSpec([None, args.seq_length], tf.int32),
                        tf.TensorSpec([None, args.seq_length], tf.int32)),
            metrics=["accuracy"])

    started = time.perf_counter()
    process = fedge.learning.build_federated_averaging_process(
        model_fn, client_optimizer_fn=lambda: keras.optimizers.get(
            {"class_name": args.client_optimizer, "config": {"learning_rate": args.learning_rate}}),
        batch_size=args.batch_size, max_client_steps=args.max_client_steps, seed=args.seed)
    print(f"converted to a {len(process.artifact.tflite_bytes) / 2**20:.1f} MiB .tflite in "
          f"{time.perf_counter() - started:.1f} s")
    state = process.initialize()

    rng = np.random.default_rng(args.seed)
    for round_num in range(1, args.rounds + 1):
        started = time.perf_counter()
        sampled = rng.choice(train_data.client_ids, size=min(args.clients_per_round, len(sizes)), replace=False)
        state, metrics = process.next(state, [train_data.create_dataset_for_client(c) for c in sampled])
        train = metrics["client_work"]["train"]
        print(f"round {round_num:2d}, loss={train['loss']:.4f}, accuracy={train['accuracy']:.4f}, "
              f"metrics={metrics} ({time.perf_counter() - started:.1f} s)")

    model = TrainableModel(process.artifact.tflite_bytes)
    model.set_weights(process.get_model_weights(state).to_list())
    for number, text in enumerate(sample_text(model, args.prompt, args.generate, args.temperature, rng)[:2], 1):
        print(f"--- sample {number} (forward signature, LiteRT) ---\n{text}")


if __name__ == "__main__":
    main()
