"""The job's model: `factory = "model:build"` in job.toml calls build() (edit it, or point the job at your own)."""

import keras


def build() -> keras.Model:
    """A small CNN for 8x8 grey images in 10 classes."""
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ], name="my_cnn")
