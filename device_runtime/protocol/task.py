"""The round task: what a process asks every selected client to do (`RoundConfig`), addressed to devices (`Task`).

`ClientWork` is the client-work part of a federated process (epochs, budgets, learning rate,
FedProx's mu, the update's encoding); `RoundConfig` adds the round and its seed. The process hands
a RoundConfig to its executor; in process it configures the workers, over MQTT it is the body of
the retained task (JSON, docs/protocol.md), so every executor runs the same configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any

from device_runtime.protocol.codec import (MAX_TASK_BYTES, check_encoding, check_hash, check_real, check_uint,
                                           dump_json, load_json, optional)
from device_runtime.protocol.errors import PROTOCOL_VERSION, ProtocolError
from device_runtime.protocol.topics import check_id


@dataclass(frozen=True)
class ClientWork:
    """What every selected client does in a round; every field is checked here, for Python, job files and the wire.

    `learning_rate` None trains with the artifact's own; `proximal_mu` None adds no proximal
    term (FedProx needs an artifact converted with proximal=True); `max_steps` and `max_seconds`
    cut local training short; `encoding` and `topk` say how the update travels.
    """

    epochs: int = 1
    max_steps: int | None = None
    max_seconds: float | None = None
    learning_rate: float | None = None
    proximal_mu: float | None = None
    encoding: str = "float32"
    topk: float | None = None

    def __post_init__(self) -> None:
        """ProtocolError (a ValueError) naming the field when a value cannot work."""
        check_uint(self.epochs, "epochs", 31, 1)
        optional(self.max_steps, check_uint, "max_steps", 63, 1)
        for name, low_open in (("max_seconds", True), ("learning_rate", True), ("proximal_mu", False)):
            object.__setattr__(self, name, optional(getattr(self, name), check_real, name, 0.0, math.inf, low_open))
        check_encoding(self.encoding)
        object.__setattr__(self, "topk", optional(self.topk, check_real, "topk", 0.0, 1.0))


@dataclass(frozen=True)
class RoundConfig:
    """One round of a process: its number, its seed (None: clients train on their data in order), the client work."""

    round: int
    seed: int | None
    work: ClientWork

    def __post_init__(self) -> None:
        """ProtocolError (a ValueError) naming the field when a value cannot work."""
        check_uint(self.round, "round")
        optional(self.seed, check_uint, "seed")
        if not isinstance(self.work, ClientWork):
            raise TypeError(f"work must be a ClientWork, got {type(self.work).__name__}")


@dataclass(frozen=True)
class Task:
    """A RoundConfig addressed to a fleet's devices: the job, the model and weights to start from, who trains, until when.

    `deadline` is unix time (math.inf in process, where nothing waits); `selected` lists the
    devices that train, else `fraction` draws them (is_selected), else all do.
    """

    run_id: str
    config: RoundConfig
    model_hash: str
    weights_hash: str | None
    deadline: float
    selected: tuple[str, ...] | None = None
    fraction: float | None = None
    protocol_version: int = PROTOCOL_VERSION

    @property
    def round(self) -> int:
        """The round id."""
        return self.config.round

    @property
    def seed(self) -> int | None:
        """The round's seed (selection by fraction, and every device's shuffling)."""
        return self.config.seed

    @property
    def work(self) -> ClientWork:
        """What the selected devices do."""
        return self.config.work


_WORK_FIELDS = tuple(field.name for field in dataclasses.fields(ClientWork))
_TASK_FIELDS = frozenset({"protocol_version", "round", "run_id", "seed", "model_hash", "weights_hash", "deadline",
                          "selected", "fraction", *_WORK_FIELDS})


def encode_task(task: Task) -> bytes:
    """The task's JSON bytes (docs/protocol.md); ProtocolError for a value the wire cannot carry."""
    if task.protocol_version != PROTOCOL_VERSION:
        raise ProtocolError(f"task protocol_version {task.protocol_version}, expected {PROTOCOL_VERSION}")
    message = {"protocol_version": PROTOCOL_VERSION, "round": task.round, "run_id": task.run_id, "seed": task.seed,
               "model_hash": task.model_hash, "weights_hash": task.weights_hash, "deadline": task.deadline,
               "selected": None if task.selected is None else list(task.selected), "fraction": task.fraction,
               **{name: getattr(task.work, name) for name in _WORK_FIELDS}}
    _checked_task(message)
    return dump_json(message, MAX_TASK_BYTES, "task")


def decode_task(payload: bytes) -> Task:
    """Check and decode a task: exactly its fields, each of the right type and range; ProtocolError otherwise."""
    message = load_json(payload, MAX_TASK_BYTES, "task")
    if message.keys() != _TASK_FIELDS:
        raise ProtocolError(f"task fields differ: missing {sorted(_TASK_FIELDS - message.keys())}, "
                            f"unknown {sorted(message.keys() - _TASK_FIELDS)[:10]}")
    return _checked_task(message)


def _checked_task(fields: dict[str, Any]) -> Task:
    """The Task of a JSON object that has every field; ProtocolError for any bad type or range."""
    selected = fields["selected"]
    if selected is not None and not isinstance(selected, list):
        raise ProtocolError(f"selected must be a list of device ids or null, got {selected!r:.80}")
    config = RoundConfig(fields["round"], check_uint(fields["seed"], "seed"),
                         ClientWork(**{name: fields[name] for name in _WORK_FIELDS}))
    return Task(run_id=check_id(fields["run_id"], "run_id"), config=config,
                model_hash=check_hash(fields["model_hash"], "model_hash"),
                weights_hash=optional(fields["weights_hash"], check_hash, "weights_hash"),
                deadline=check_real(fields["deadline"], "deadline", 0.0),
                selected=None if selected is None else tuple(check_id(d, "selected device id") for d in selected),
                fraction=optional(fields["fraction"], check_real, "fraction", 0.0, 1.0))


def is_selected(task: Task, device_id: str) -> bool:
    """Whether `device_id` trains this round: listed, else a hash draw below `fraction`, else all."""
    if task.selected is not None:
        return device_id in task.selected
    if task.fraction is None:
        return True
    digest = hashlib.sha256(f"{task.seed}:{task.round}:{device_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < task.fraction
