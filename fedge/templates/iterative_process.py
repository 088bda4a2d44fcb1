"""IterativeProcess: an initialize function and a next function, as tff.templates.IterativeProcess."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class IterativeProcess:
    """A process that starts from `initialize()` and advances with `next(state, *args)` (TFF's shape)."""

    def __init__(self, initialize_fn: Callable[[], Any], next_fn: Callable[..., tuple[Any, Any]]) -> None:
        """Wrap the two functions; `next_fn` returns (new state, metrics or other output)."""
        if not callable(initialize_fn) or not callable(next_fn):
            raise TypeError("initialize_fn and next_fn must be callable")
        self._initialize_fn = initialize_fn
        self._next_fn = next_fn

    def initialize(self) -> Any:
        """The initial state."""
        return self._initialize_fn()

    def next(self, state: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """One step: (next state, output) from `state` and the step's inputs."""
        return self._next_fn(state, *args, **kwargs)
