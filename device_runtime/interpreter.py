"""Loads a TFLite interpreter from ai-edge-litert, or from tflite-runtime on older boards."""

from __future__ import annotations

import functools
import importlib
import os
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


def default_num_threads() -> int:
    """The CPU cores this process may run on (what TensorFlow/Keras uses for a train step)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _thread_count(num_threads: int | None) -> int:
    """Validate `num_threads`; None means every core available to the process."""
    if num_threads is not None and num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
    return default_num_threads() if num_threads is None else num_threads


def load_interpreter(model_content: bytes, num_threads: int | None = None) -> Any:
    """Create an interpreter for an in-memory .tflite model (ImportError if no backend is installed).

    `num_threads=None` uses every core available to the process: the interpreter's own
    default is one thread for the XNNPACK delegate, which runs the train step's matmuls.
    """
    threads = _thread_count(num_threads)
    _, interpreter_cls = _interpreter_class()
    return interpreter_cls(model_content=bytes(model_content), num_threads=threads)


def load_interpreter_from_file(path: str | os.PathLike[str], num_threads: int | None = None) -> Any:
    """Create an interpreter that maps the .tflite file at `path` instead of holding a copy in memory.

    `num_threads` as for load_interpreter.
    """
    threads = _thread_count(num_threads)
    _, interpreter_cls = _interpreter_class()
    return interpreter_cls(model_path=os.fspath(path), num_threads=threads)
