"""Reads TFF's downloaded HDF5 files (`examples/<client_id>/<feature>`) with h5py, imported on first use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _open(path: str | Path) -> Any:
    """The file opened read-only; a ValueError when it is missing or not HDF5."""
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path}: not a readable HDF5 file ({error})") from error


def feature_shapes(path: str | Path, features: tuple[str, ...]) -> dict[str, dict[str, tuple[int, ...]]]:
    """`{client_id: {feature: shape}}` from metadata alone, checking every client has equal-length `features`."""
    import h5py

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    with _open(path) as file:
        examples = file.get("examples")
        if not isinstance(examples, h5py.Group):
            layout = f"examples/<client_id>/{{{', '.join(features)}}}"
            raise ValueError(f"{path}: no 'examples' group; TFF files hold {layout}")
        for client_id, group in examples.items():
            if not isinstance(group, h5py.Group) or any(not isinstance(group.get(f), h5py.Dataset) for f in features):
                raise ValueError(f"{path}: client {client_id!r} lacks dataset(s) {list(features)}")
            shapes[client_id] = {f: group[f].shape for f in features}
            lengths = {f: (shape[0] if shape else None) for f, shape in shapes[client_id].items()}
            if None in lengths.values() or len(set(lengths.values())) != 1:
                raise ValueError(f"{path}: client {client_id!r}: features have different lengths {lengths}")
    return shapes


def read_client(path: str | Path, client_id: str, features: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named features of one client as numpy arrays."""
    with _open(path) as file:
        group = file["examples"][client_id]
        return {f: group[f][()] for f in features}
