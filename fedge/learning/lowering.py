"""A model function lowered once to the trainable artifact that every client of a process runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from device_runtime.artifact import Artifact


def lower_model_fn(model_fn: Callable[[], Any], batch_size: int | None, optimizer: Any,
                   proximal: bool = False) -> Artifact:
    """Call `model_fn` once and lower the model with `optimizer` at `batch_size` (else the model's batch_size_hint)."""
    model = model_fn()
    resolved = batch_size if batch_size is not None else model.batch_size_hint
    if resolved is None:
        raise ValueError("the batch size the clients train with is unknown: pass batch_size=... to the builder, "
                         "or build the model with a batch size (e.g. from_keras_model(..., sample_batch=...))")
    if isinstance(resolved, bool) or not isinstance(resolved, int) or resolved < 1:
        raise ValueError(f"batch_size must be a positive integer, got {resolved!r}")
    return model.lower(batch_size=resolved, optimizer=optimizer, proximal=proximal)
