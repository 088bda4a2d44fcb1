"""A device's local examples: numpy arrays, `.npz` files, a folder of them, or an iterable of (x, y) batches."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.manifest import LabelRange, Manifest, TensorSpec
from device_runtime.model import Batch, _pad_rows, _validated_rows

Specs = tuple[TensorSpec, TensorSpec, LabelRange | None]  # input, label, the labels the loss takes


@dataclasses.dataclass(frozen=True, eq=False)
class LocalData:
    """Local examples, either in memory (`x`, `y`) or as an iterable of (x, y) batches (`stream`).

    `specs` is what the data was checked against, if anything (the manifest's input and label specs
    and the labels its loss takes); a stream's batches are checked against them as they arrive.
    """

    x: np.ndarray | None = None
    y: np.ndarray | None = None
    stream: Iterable[Any] | None = None
    specs: Specs | None = None

    @property
    def num_examples(self) -> int | None:
        """Number of examples held in memory; None for a stream (unknown until iterated)."""
        return None if self.x is None else int(self.x.shape[0])

    @property
    def reiterable(self) -> bool:
        """Whether the data can be iterated more than once (several epochs)."""
        return self.stream is None or not isinstance(self.stream, Iterator)

    def checked(self, manifest: Manifest) -> LocalData:
        """This data checked against (and cast to) the artifact manifest's input and label specs, its labels
        against those the loss takes."""
        specs = (manifest.input, manifest.label, manifest.label_range)
        if self.specs == specs:
            return self
        if self.x is None:
            return dataclasses.replace(self, specs=specs)
        return LocalData(*_checked_pair(self.x, self.y, specs, "data"), specs=specs)

    def batches(self, batch_size: int, shuffle_seed: int | None = None) -> Iterator[Batch]:
        """One epoch of (x, y, mask) batches of `batch_size` rows; the last is zero-padded (mask 0)."""
        if self.x is None:
            if shuffle_seed is not None:
                raise ValueError("shuffle_seed needs in-memory data (arrays or .npz); shuffle an iterable "
                                 "of batches at its source")
            return _rebatched(self._stream_pairs(), batch_size)
        x, y = self.x, self.y
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(x.shape[0])
            x, y = x[order], y[order]
        return _sliced(x, y, batch_size)

    def _stream_pairs(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The stream's (x, y) batches, each checked; ValueError if it yields no example at all."""
        total = 0
        for index, item in enumerate(self.stream):
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise ValueError(f"batch {index}: each item of an iterable source must be an (x, y) pair, "
                                 f"got {type(item).__name__}")
            x, y = _checked_pair(item[0], item[1], self.specs, f"batch {index}", min_rows=0)
            total += x.shape[0]
            yield x, y
        if total == 0:
            raise ValueError("the data holds no examples (an iterator can be consumed only once)")


def load_local_data(source: Any, manifest: Manifest | None = None) -> LocalData:
    """Wrap (x, y) arrays, an .npz path, a folder of .npz files or an iterable of (x, y) batches as LocalData.

    With `manifest`, shapes and dtypes are checked against its input and label specs now
    (a stream's batches as they arrive); labels shaped (N, 1) where the manifest says () are squeezed.
    """
    if isinstance(source, LocalData):
        data = source
    elif isinstance(source, (str, os.PathLike)):
        data = LocalData(*_checked_pair(*_read_path(Path(source)), None, str(source)))
    elif isinstance(source, (tuple, list)) and len(source) == 2 and all(isinstance(a, np.ndarray) for a in source):
        data = LocalData(*_checked_pair(source[0], source[1], None, "data"))
    elif isinstance(source, Iterable) and not isinstance(source, (str, bytes, Mapping, np.ndarray)):
        data = LocalData(stream=source)
    else:
        raise TypeError(f"unsupported data source {type(source).__name__}: give (x, y) arrays, an .npz path, "
                        "a folder of .npz files or an iterable of (x, y) batches")
    return data if manifest is None else data.checked(manifest)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays `x` and `y` of one .npz file."""
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in ("x", "y") if key not in archive.files]
        if missing:
            raise ValueError(f"{path}: an .npz data file needs arrays 'x' and 'y'; missing {missing}, "
                             f"found {archive.files}")
        return archive["x"], archive["y"]


def _read_path(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of an .npz file, or of every .npz file in a folder concatenated in sorted name order."""
    if path.is_dir():
        files = sorted(path.glob("*.npz"))
        if not files:
            raise ValueError(f"{path}: the folder holds no .npz files")
        pairs = [_read_npz(file) for file in files]
        for file, (x, y) in zip(files, pairs):
            if x.shape[1:] != pairs[0][0].shape[1:] or y.shape[1:] != pairs[0][1].shape[1:]:
                raise ValueError(f"{file}: examples shaped x {x.shape[1:]}, y {y.shape[1:]} unlike {files[0]}'s "
                                 f"x {pairs[0][0].shape[1:]}, y {pairs[0][1].shape[1:]}")
        return np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])
    if not path.is_file():
        raise ValueError(f"{path}: no such data file or folder")
    return _read_npz(path)


def _checked_pair(x: Any, y: Any, specs: Specs | None, what: str, min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Check that x and y hold the same number (>= min_rows) of examples matching `specs`; cast them."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"{what}: x and y need a leading example axis, got shapes {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: x and y must hold the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{what}: holds no examples")
    if specs is not None:
        input_spec, label_spec, label_range = specs
        if y.ndim == len(label_spec.shape) + 2 and y.shape[-1] == 1:
            y = y[..., 0]
        x = _validated_rows(x, input_spec, f"{what}: x", min_rows, None)
        y = _validated_rows(y, label_spec, f"{what}: y", min_rows, None)
        problem = None if label_range is None else label_range.problem(y)
        if problem is not None:
            raise ValueError(f"{what}: y: {problem}")
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def _sliced(x: np.ndarray, y: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """Consecutive batches of in-memory examples; the last one padded."""
    full = np.ones(batch_size, dtype=np.float32)
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        if xb.shape[0] == batch_size:
            yield xb, yb, full
        else:
            yield _padded(xb, yb, batch_size)


def _rebatched(pairs: Iterable[tuple[np.ndarray, np.ndarray]], batch_size: int) -> Iterator[Batch]:
    """Batches of exactly `batch_size` rows from (x, y) batches of any size; the last one padded."""
    full = np.ones(batch_size, dtype=np.float32)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    held = 0
    for x, y in pairs:
        xs.append(x)
        ys.append(y)
        held += x.shape[0]
        if held < batch_size:
            continue
        x_all, y_all = (xs[0], ys[0]) if len(xs) == 1 else (np.concatenate(xs), np.concatenate(ys))
        used = held - held % batch_size
        for start in range(0, used, batch_size):
            yield x_all[start : start + batch_size], y_all[start : start + batch_size], full
        xs, ys, held = [x_all[used:]], [y_all[used:]], held - used
    if held:
        yield _padded(np.concatenate(xs), np.concatenate(ys), batch_size)


def _padded(x: np.ndarray, y: np.ndarray, batch_size: int) -> Batch:
    """A partial batch zero-padded to `batch_size` rows, with its mask."""
    mask = np.zeros(batch_size, dtype=np.float32)
    mask[: x.shape[0]] = 1.0
    return _pad_rows(x, batch_size), _pad_rows(y, batch_size), mask
