"""Federated EMNIST from files you already have: LEAF's FEMNIST JSON or TFF's `fed_emnist*.h5`.

Both give ClientData with x float32 [N, 28, 28, 1] (pixel values as stored, in [0, 1]) and
y int32 [N] (the class index), one client per writer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedge.simulation.datasets import _h5, _leaf
from fedge.simulation.datasets.client_data import ClientData, ClientDataset

IMAGE_SHAPE = (28, 28, 1)
_PIXELS = 28 * 28


def load_leaf(path: str | Path) -> ClientData:
    """LEAF FEMNIST: a JSON file or a folder of them, `x` rows of 784 floats and `y` class ints per user."""
    mapping = {}
    for user, (x, y) in _leaf.read_users(path).items():
        where = f"{path}: user {user!r}"
        mapping[user] = (_pixel_rows(x, where).reshape(-1, *IMAGE_SHAPE), _int_labels(y, where))
    return ClientData.from_arrays(mapping)


def load_tff_h5(path: str | Path) -> ClientData:
    """TFF's `fed_emnist*.h5` (`examples/<client_id>/pixels` [N, 28, 28], `label` [N]), read per client on request."""
    shapes = _h5.feature_shapes(path, ("pixels", "label"))
    for client_id, shape in shapes.items():
        if shape["pixels"][1:] != IMAGE_SHAPE[:2] or len(shape["label"]) != 1:
            raise ValueError(f"{path}: client {client_id!r}: expected pixels [N, 28, 28] and label [N], got {shape}")

    def load(client_id: str) -> ClientDataset:
        arrays = _h5.read_client(path, client_id, ("pixels", "label"))
        return ClientDataset(arrays["pixels"].astype(np.float32)[..., None], _int_labels(arrays["label"], str(path)))

    return ClientData.from_function(list(shapes), load)


def _pixel_rows(rows: list, where: str) -> np.ndarray:
    """LEAF `x` rows as float32 [N, 784]; a ValueError naming `where` otherwise."""
    if not rows:
        return np.zeros((0, _PIXELS), np.float32)
    message = f"{where}: each 'x' row must be a list of {_PIXELS} numbers (28x28 pixels)"
    try:
        pixels = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(message) from error
    if pixels.ndim != 2 or pixels.shape[1] != _PIXELS:
        raise ValueError(message)
    return pixels


def _int_labels(labels: object, where: str) -> np.ndarray:
    """Labels as int32 [N]; a ValueError when they are not whole numbers."""
    array = np.asarray(labels)
    if array.size == 0:
        return np.zeros(0, np.int32)
    whole = np.issubdtype(array.dtype, np.integer) or (
        np.issubdtype(array.dtype, np.floating) and bool(np.all(array == np.round(array)))
    )
    if array.ndim != 1 or not whole:
        raise ValueError(f"{where}: labels must be whole numbers of shape [N], got {array.dtype}{list(array.shape)}")
    return array.astype(np.int32)
