"""A model function lowered once to the trainable artifact that every client of a process runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from device_runtime.artifact import Artifact


@dataclass(frozen=True)
class LoweredModel:
    """The artifact of a model function and the finalizers of its metrics."""

    artifact: Artifact
    metric_finalizers: dict[str, list[str]]


def lower_model_fn(model_fn: Callable[[], Any], batch_size: int | None, optimizer: Any,
                   proximal: bool = False) -> LoweredModel:
    """Call `model_fn` once and lower the model with `optimizer` at `batch_size` (else the model's batch_size_hint)."""
    model = model_fn()
    resolved = batch_size if batch_size is not None else model.batch_size_hint
    if resolved is None:
        raise ValueError("the batch size the clients train with is unknown: pass batch_size=... to the builder, "
                         "or build the model with a batch size (e.g. from_keras_model(..., sample_batch=...))")
    if isinstance(resolved, bool) or not isinstance(resolved, int) or resolved < 1:
        raise ValueError(f"batch_size must be a positive integer, got {resolved!r}")
    artifact = model.lower(batch_size=resolved, optimizer=optimizer, proximal=proximal)
    return LoweredModel(artifact, dict(model.metric_finalizers()))
