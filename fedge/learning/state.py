"""The state of a learning process (model weights, server optimizer state, round), saved atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.atomic_file import replace_atomically
from device_runtime.manifest import Manifest

STATE_FORMAT = "fedge-process-state"
STATE_FORMAT_VERSION = 1
_META_KEY = "meta.json"


@dataclass(frozen=True, eq=False)
class ModelWeights:
    """A model's weights split as TFF's ModelWeights: trainable and non-trainable, each in manifest order.

    `trainable_mask` records where each weight sits in the artifact's weight list
    (manifest.weights), so `to_list()` restores that order; by default trainable ones come first.
    """

    trainable: list[np.ndarray]
    non_trainable: list[np.ndarray]
    trainable_mask: tuple[bool, ...] = field(default=())

    def __post_init__(self) -> None:
        """Fill in the default mask and check that it matches the two lists."""
        mask = self.trainable_mask or (True,) * len(self.trainable) + (False,) * len(self.non_trainable)
        if sum(mask) != len(self.trainable) or len(mask) - sum(mask) != len(self.non_trainable):
            raise ValueError(f"trainable_mask marks {sum(mask)} trainable and {len(mask) - sum(mask)} "
                             f"non-trainable weights, got {len(self.trainable)} and {len(self.non_trainable)}")
        object.__setattr__(self, "trainable_mask", tuple(bool(m) for m in mask))

    @classmethod
    def from_list(cls, manifest: Manifest, arrays: Sequence[Any]) -> ModelWeights:
        """Split `arrays` (every weight, manifest order) by manifest.weights[i].trainable, checking shapes."""
        specs = manifest.weights
        if len(arrays) != len(specs):
            raise ValueError(f"the model has {len(specs)} weights, got {len(arrays)}")
        checked = []
        for index, (array, spec) in enumerate(zip(arrays, specs)):
            array = np.asarray(array, dtype=np.dtype(spec.dtype))
            if array.shape != tuple(spec.shape):
                raise ValueError(f"weight {index} ({spec.name}): expected shape {tuple(spec.shape)}, "
                                 f"got {array.shape}")
            checked.append(array)
        mask = tuple(bool(spec.trainable) for spec in specs)
        return cls([a for a, t in zip(checked, mask) if t], [a for a, t in zip(checked, mask) if not t], mask)

    def for_manifest(self, manifest: Manifest) -> ModelWeights:
        """These weights laid out as the artifact's manifest says (its trainable mask), shapes checked."""
        mask = tuple(bool(spec.trainable) for spec in manifest.weights)
        return ModelWeights.from_list(manifest, ModelWeights(self.trainable, self.non_trainable, mask).to_list())

    def to_list(self) -> list[np.ndarray]:
        """Every weight in the artifact's order (what TrainableModel.set_weights takes)."""
        trainable, non_trainable = iter(self.trainable), iter(self.non_trainable)
        return [next(trainable) if t else next(non_trainable) for t in self.trainable_mask]


@dataclass(frozen=True, eq=False)
class LearningProcessState:
    """What a learning process carries from round to round; everything needed to resume it."""

    global_model_weights: ModelWeights
    server_optimizer_state: dict[str, list[np.ndarray]]
    round_num: int


def save_state(path: str | os.PathLike[str], state: LearningProcessState) -> Path:
    """Write `state` to one .npz file atomically (temp file in the same folder, fsync, rename); returns the path.

    Arrays are stored as .npy entries; round number, weight layout and optimizer slot names
    as a JSON entry. A crash leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    weights = state.global_model_weights
    arrays = {f"trainable.{i}": a for i, a in enumerate(weights.trainable)}
    arrays.update({f"non_trainable.{i}": a for i, a in enumerate(weights.non_trainable)})
    for name, slots in state.server_optimizer_state.items():
        arrays.update({f"optimizer.{name}.{i}": a for i, a in enumerate(slots)})
    meta = {"format": STATE_FORMAT, "format_version": STATE_FORMAT_VERSION, "round_num": int(state.round_num),
            "trainable_mask": list(weights.trainable_mask),
            "optimizer_slots": {name: len(slots) for name, slots in state.server_optimizer_state.items()}}
    arrays[_META_KEY] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    replace_atomically(path, lambda file: np.savez(file, **arrays))
    _fsync_directory(path.parent)
    return path


def load_state(path: str | os.PathLike[str]) -> LearningProcessState:
    """Read a state written by save_state."""
    with np.load(path, allow_pickle=False) as archive:
        if _META_KEY not in archive.files:
            raise ValueError(f"{path}: not a fedge process state (no {_META_KEY} entry)")
        meta = json.loads(archive[_META_KEY].tobytes().decode("utf-8"))
        if meta.get("format") != STATE_FORMAT or meta.get("format_version") != STATE_FORMAT_VERSION:
            raise ValueError(f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}, "
                             f"expected {STATE_FORMAT!r} version {STATE_FORMAT_VERSION}")
        mask = tuple(meta["trainable_mask"])
        weights = ModelWeights([archive[f"trainable.{i}"] for i in range(sum(mask))],
                               [archive[f"non_trainable.{i}"] for i in range(len(mask) - sum(mask))], mask)
        optimizer = {name: [archive[f"optimizer.{name}.{i}"] for i in range(count)]
                     for name, count in meta["optimizer_slots"].items()}
    return LearningProcessState(weights, optimizer, int(meta["round_num"]))


def _fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# No trained weight reaches this: its square overflows float32, so its L2 norm and its products with activations of its
# size are Inf. A state holding one is refused (a round that would commit it, a checkpoint that holds it).
MAX_WEIGHT_MAGNITUDE = float(np.sqrt(np.finfo(np.float32).max))


def is_sane(weights: ModelWeights, optimizer_state: Mapping[str, Sequence[np.ndarray]]) -> bool:
    """Whether a process may train from this state: every weight finite and below MAX_WEIGHT_MAGNITUDE, every server
    optimizer slot finite."""
    if not all(bool(np.all(np.abs(w) < MAX_WEIGHT_MAGNITUDE)) for w in (*weights.trainable, *weights.non_trainable)):
        return False  # NaN compares False: refused too
    return all(bool(np.all(np.isfinite(a))) for slot in optimizer_state.values() for a in slot)
