"""The server's checkpoint: the process state after the last finished round, one file replaced atomically."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from device_runtime.atomic_file import replace_atomically
from device_runtime.protocol import ProtocolError, check_id
from device_runtime.manifest import Manifest
from fedge.learning.state import LearningProcessState, load_state, save_state

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.npz"
RUN_ID_FILE = "run_id"


class Checkpoints:
    """`<directory>/state.npz`, written after every round (fedge.learning.save_state: temp file, fsync, rename)."""

    NEW_JOB = ("give the job another checkpoint folder (output.checkpoints, --checkpoint-dir) or remove its "
               "state.npz to start a new job")

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Use (and create) `directory`."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / CHECKPOINT_FILE

    def latest(self, manifest: Manifest) -> LearningProcessState | None:
        """The saved state, checked against the model's weights, or None when there is none yet."""
        if not self.path.exists():
            return None
        state = load_state(self.path)
        try:
            state.global_model_weights.for_manifest(manifest)
        except ValueError as error:
            raise ValueError(f"{self.path} does not hold this model's weights ({error}); {self.NEW_JOB}") from None
        logger.info("resuming from %s at round %d", self.path, state.round_num)
        return state

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

    def save(self, state: LearningProcessState) -> Path:
        """Replace the checkpoint with `state` atomically."""
        return save_state(self.path, state)
