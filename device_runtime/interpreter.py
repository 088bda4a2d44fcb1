"""Loads a TFLite interpreter from ai-edge-litert, or from tflite-runtime on older boards."""

from __future__ import annotations

import functools
import importlib
from typing import Any

_BACKENDS = (
    ("ai-edge-litert", "ai_edge_litert.interpreter"),
    ("tflite-runtime", "tflite_runtime.interpreter"),
)


@functools.lru_cache(maxsize=1)
def _interpreter_class() -> tuple[str, type]:
    """Return (package name, Interpreter class) of the first installed backend."""
    failures = []
    for package, module_name in _BACKENDS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            failures.append(f"{package}: {exc}")
            continue
        return package, module.Interpreter
    raise ImportError(
        "No TFLite interpreter is installed. Install 'ai-edge-litert' "
        "(pip install ai-edge-litert) or, on boards it does not support, "
        "'tflite-runtime' (pip install tflite-runtime). Import errors: " + "; ".join(failures)
    )


def interpreter_backend_name() -> str:
    """Return the pip name of the interpreter package in use ('ai-edge-litert' or 'tflite-runtime')."""
    return _interpreter_class()[0]


def load_interpreter(model_content: bytes, num_threads: int | None = None) -> Any:
    """Create an interpreter for an in-memory .tflite model (ImportError if no backend is installed)."""
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
    _, interpreter_cls = _interpreter_class()
    return interpreter_cls(model_content=bytes(model_content), num_threads=num_threads)
