"""Tasks for tests, written as their flat JSON fields (round, run_id, epochs, encoding, ...)."""

from __future__ import annotations

import dataclasses
from typing import Any

from device_runtime.protocol import ClientWork, RoundConfig, Task

WORK_FIELDS = tuple(field.name for field in dataclasses.fields(ClientWork))


def task_of(**fields: Any) -> Task:
    """The Task whose JSON form has these fields (selected as a list or None)."""
    work = ClientWork(**{name: fields.pop(name) for name in WORK_FIELDS if name in fields})
    config = RoundConfig(fields.pop("round"), fields.pop("seed"), work)
    selected = fields.pop("selected", None)
    fields.setdefault("weights_hash", None)
    return Task(run_id=fields.pop("run_id"), config=config, selected=None if selected is None else tuple(selected),
                **fields)
