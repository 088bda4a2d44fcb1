"""The server's checkpoint: the process state after the last finished round, one file replaced atomically, and
beside it the model that state trains, so the folder alone gives the trained model (`fedge export`)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from device_runtime.artifact import Artifact, ArtifactError, read_manifest
from device_runtime.atomic_file import replace_atomically
from device_runtime.protocol import ProtocolError, check_id
from device_runtime.manifest import ContentHash, Manifest
from fedge.learning.state import MAX_WEIGHT_MAGNITUDE, LearningProcessState, is_sane, load_state, save_state

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.npz"
RUN_ID_FILE = "run_id"
MODEL_FILE = "model.tflite"  # the trainable artifact the checkpoint's weights belong to
KERAS_MODEL_FILE = "model.keras"  # the Keras model it was converted from (untrained), when there is one


class Checkpoints:
    """`<directory>/state.npz`, written after every round (fedge.learning.save_state: temp file, fsync, rename)."""

    NEW_JOB = ("to start a new job, give it another checkpoint folder (fedge serve: output.checkpoints or "
               "--checkpoint-dir; fedge simulate: run it without --resume) or remove that state.npz")

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Use (and create) `directory`."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / CHECKPOINT_FILE

    def latest(self, manifest: Manifest) -> LearningProcessState | None:
        """The saved state, checked (read_state) and against the model: its weights' shapes, and the model it was
        trained with when that is kept beside it (MODEL_FILE); None when there is none yet."""
        if not self.path.exists():
            return None
        state = read_state(self.path)
        try:
            state.global_model_weights.for_manifest(manifest)
        except ValueError as error:
            raise ValueError(f"{self.path} does not hold this model's weights ({error}); {self.NEW_JOB}") from None
        trained_with = self._trained_with()
        if trained_with is not None and trained_with != manifest.content_hash:
            raise ValueError(f"{self.path} was trained with another model ({self.directory / MODEL_FILE}, "
                             f"{trained_with}; this job's is {manifest.content_hash}); {self.NEW_JOB}")
        logger.info("resuming from %s at round %d", self.path, state.round_num)
        return state

    def _trained_with(self) -> ContentHash | None:
        """The content hash of the model kept beside the checkpoint, None without one (or an unreadable one)."""
        try:
            return read_manifest((self.directory / MODEL_FILE).read_bytes()).content_hash
        except (OSError, ArtifactError):
            return None

    def run_id(self, new: str) -> str:
        """The job's run id: the stored one when there is a checkpoint to resume (the same job), else `new`,
        stored (a new job, even in a folder an earlier job used: devices then train its rounds afresh)."""
        path = self.directory / RUN_ID_FILE
        if self.path.exists() and path.exists():
            try:
                return check_id(path.read_text().strip(), "run id")
            except ProtocolError as error:
                raise ValueError(f"{path}: {error}; remove {CHECKPOINT_FILE} there to start a new job") from None
        replace_atomically(path, lambda file: file.write(check_id(new, "run id").encode() + b"\n"))
        return new

    def save_model(self, artifact: Artifact, keras_model: Any | None = None, keep: str | None = None) -> list[Path]:
        """Write the model the checkpoint trains beside it (the trainable artifact, and the untrained Keras model
        when the job has one), each replaced atomically; returns what was written.

        Earlier copies are fedge's and replaced, but never the file `keep` (the job's own model, which a user may
        keep in this folder under one of these names): it already is the model."""
        from fedge.export import save_keras_model  # which reads these files: imported here, not at the top

        written = []
        model_path, keras_path = self.directory / MODEL_FILE, self.directory / KERAS_MODEL_FILE
        if not _is_file(model_path, keep):
            written.append(replace_atomically(model_path, lambda file: file.write(artifact.tflite_bytes)))
        if keras_model is not None and not _is_file(keras_path, keep):
            written.append(save_keras_model(keras_model, keras_path))
        return written

    def save(self, state: LearningProcessState) -> Path:
        """Replace the checkpoint with `state` atomically."""
        return save_state(self.path, state)


def read_state(path: Path) -> LearningProcessState:
    """The process state saved at `path`, checked: readable, and its weights and optimizer slots finite; ValueError
    naming the file and what to do otherwise (a corrupt or poisoned checkpoint never reaches a round)."""
    try:
        state = load_state(path)
    except Exception as error:  # a damaged .npz raises anything: zipfile, numpy, JSON, key and value errors
        raise ValueError(f"{path}: not a readable fedge checkpoint ({type(error).__name__}: {error}); restore it "
                         f"from a backup, or remove it to start the job afresh") from None
    if not is_sane(state.global_model_weights, state.server_optimizer_state):
        raise ValueError(f"{path}: holds non-finite weights or optimizer slots (NaN or Inf) or weights too large to "
                         f"train with (|w| >= {MAX_WEIGHT_MAGNITUDE:.3g}); restore it from a backup, or remove it to "
                         f"start the job afresh")
    return state


def _is_file(path: Path, other: str | None) -> bool:
    """Whether `path` exists and is the file `other`."""
    return other is not None and path.exists() and Path(other).exists() and path.samefile(other)
