"""A device's round rules, however it is driven: whether to train a task, its time budget, checks, the update.

The MQTT device agent and the fleet simulator's emulated devices follow the same rules.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Container, Mapping
from typing import Any

from device_runtime.artifact import ArtifactError, verify_content_hash
from device_runtime.protocol import ModelUpdate, ProtocolError, Task, decode_task, encode_update, is_selected
from device_runtime.protocol.topics import hash_hex
from device_runtime.signing import SignatureError, TaskVerifier
from device_runtime.training import LocalResult

logger = logging.getLogger(__name__)


def round_key(task: Task) -> tuple[str, int]:
    """What a device remembers of a round it started: the job's run id and the round number."""
    return task.run_id, task.round


def supersedes(newer: Task, queued: Task) -> bool:
    """Whether a task that arrived later replaces one still queued: another job's, or a round of the same
    job at least as recent (the retained task is republished on reconnect)."""
    return newer.run_id != queued.run_id or newer.round >= queued.round


def skip_reason(task: Task, device_id: str, started_rounds: Container[tuple[str, int]], now: float) -> str | None:
    """Why `device_id` should not train `task` at unix time `now`, or None if it should."""
    if round_key(task) in started_rounds:
        return "already trained (or training) this round"
    if not is_selected(task, device_id):
        return "this device is not selected"
    if task.deadline <= now:
        return f"deadline passed {now - task.deadline:.1f} s ago"
    return None


def task_to_train(payload: bytes, device_id: str, started_rounds: Container[tuple[str, int]], now: float,
                  verifier: TaskVerifier | None = None) -> tuple[Task | None, str | None]:
    """(task, None) if this device should train the task payload, (None, why not) if not, (None, None)
    for an empty payload (the server cleared its retained task). `verifier` checks the signature first
    (None: unsigned operation); a refused signature is also logged as a warning naming the topic."""
    if not payload:
        return None, None
    try:
        task = decode_task(payload if verifier is None else verifier.open(payload))
    except SignatureError as error:
        logger.warning("%s: refusing the task on %s: %s", device_id, verifier.topic, error)
        return None, f"refused task: {error}"
    except ProtocolError as error:
        return None, f"malformed task: {error}"
    reason = skip_reason(task, device_id, started_rounds, now)
    return (None, f"round {task.round}: {reason}") if reason else (task, None)


def training_budget(task: Task, now: float) -> float:
    """Seconds of training the task allows from `now`: its max_seconds capped by the time left to the deadline."""
    time_left = task.deadline - now
    return max(0.0, time_left if task.max_seconds is None else min(task.max_seconds, time_left))


def proximal_strength(proximal_mu: float | None, manifest: Mapping[str, Any]) -> float | None:
    """The FedProx mu to train with: the task's, or 0 for a proximal artifact when the task gives none
    (an interpreter reused across rounds may still hold an earlier task's mu)."""
    if proximal_mu is None and manifest.get("proximal"):
        return 0.0
    return proximal_mu


def checked_model(payload: bytes, task: Task) -> bytes:
    """The artifact fetched for `task` if its content hash verifies and is the task's; ArtifactError otherwise."""
    actual = verify_content_hash(payload)
    if hash_hex(actual) != hash_hex(task.model_hash):
        raise ArtifactError(f"the task names {task.model_hash} but the artifact's content hash is {actual}")
    return payload


def round_update(fleet: str, device_id: str, task: Task, result: LocalResult) -> tuple[ModelUpdate, bytes]:
    """The update of one trained round (with a fresh update id) and its payload in the task's encoding."""
    update = ModelUpdate(fleet=fleet, round=task.round, device_id=device_id, update_id=uuid.uuid4().hex,
                         model_hash=task.model_hash, num_examples=result.num_examples, metrics=result.metrics,
                         tensors=result.delta)
    return update, encode_update(update, task.encoding, task.topk)
