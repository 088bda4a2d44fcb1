"""Reference Keras models of the federated-learning literature, for examples, tests and benchmarks."""

from __future__ import annotations

from typing import Any

import keras


def mnist_cnn(num_classes: int = 10) -> keras.Model:
    """The MNIST CNN of McMahan et al. 2017 (1,663,370 parameters): 5x5 conv 32, 2x2 max-pool,
    5x5 conv 64, 2x2 max-pool, dense 512 relu, dense softmax."""
    layers = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, 5, padding="same", activation="relu"), layers.MaxPooling2D(2),
        layers.Conv2D(64, 5, padding="same", activation="relu"), layers.MaxPooling2D(2),
        layers.Flatten(), layers.Dense(512, activation="relu"), layers.Dense(num_classes, activation="softmax"),
    ], name="mcmahan_cnn")


def _digits_convolutions() -> list[Any]:
    """The 8x8 digits models' input and convolutions: 3x3 conv 16, 2x2 max-pool, 3x3 conv 32 (a 4x4x32 map)."""
    layers = keras.layers
    return [keras.Input((8, 8, 1)), layers.Conv2D(16, 3, padding="same", activation="relu"), layers.MaxPooling2D(2),
            layers.Conv2D(32, 3, padding="same", activation="relu")]


def digits_cnn(num_classes: int = 10) -> keras.Model:
    """A small CNN for scikit-learn's 8x8 digits (5,130 parameters): the convolutions, global average pooling."""
    layers = keras.layers
    return keras.Sequential([*_digits_convolutions(), layers.GlobalAveragePooling2D(),
                             layers.Dense(num_classes, activation="softmax")], name="digits_cnn")


def digits_classifier(num_classes: int = 10) -> keras.Model:
    """The main job's CNN for 8x8 digits (9,930 parameters): its dense head sees every position of the 4x4 feature
    map, so on label-skewed devices it leaves chance in the first rounds, where digits_cnn's global-average-pooled
    head stays near chance for about 15 (docs/benchmarks.md)."""
    layers = keras.layers
    return keras.Sequential([*_digits_convolutions(), layers.Flatten(),
                             layers.Dense(num_classes, activation="softmax")], name="digits_classifier")


def char_gru(seq_length: int = 80, embedding_dim: int = 8, units: int = 256, vocab_size: int = 90) -> keras.Model:
    """TFF's text-generation model: Embedding -> GRU over `seq_length` character ids -> next-character
    logits per position (228,138 parameters with the defaults, the vocabulary of datasets.shakespeare)."""
    layers = keras.layers
    return keras.Sequential([
        keras.Input((seq_length,), dtype="int32"),
        layers.Embedding(vocab_size, embedding_dim),
        layers.GRU(units, return_sequences=True),
        layers.Dense(vocab_size),
    ], name="char_gru")
