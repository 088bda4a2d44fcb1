"""Loads a TFLite interpreter from ai-edge-litert, or from tflite-runtime on older boards."""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Any, Callable

import numpy as np

logger = logging.getLogger(__name__)

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


class PresetShapeRunner:
    """Runs one signature with its inputs at the shapes the artifact fixed, never resizing them.

    LiteRT's SignatureRunner resizes every input on every call. ai-edge-litert's aarch64 build
    (2.2.0 and 2.3.0) segfaults there for a scalar input (`InterpreterWrapper::ResizeInputTensor`
    memsets 4n-4 bytes for rank n = 0), which is set_learning_rate's, set_proximal_mu's and a
    scalar weight's. Every artifact input has a fixed shape, so the tensors are allocated once
    and each call only sets, invokes and reads; SetTensor itself refuses a wrong shape or dtype.
    """

    def __init__(self, runner: Any) -> None:
        """Take over `runner`'s interpreter (which owns the model's memory: kept alive here) and signature."""
        self._interpreter = runner._interpreter
        self._wrapper = runner._interpreter_wrapper
        self._subgraph = runner._subgraph_index
        self._inputs: dict[str, int] = dict(runner._inputs)
        self._outputs: list[tuple[str, int]] = list(runner._outputs)
        self._wrapper.AllocateTensors(self._subgraph)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Set every input by its signature name, invoke, and return copies of the outputs by name."""
        if inputs.keys() != self._inputs.keys():
            raise ValueError(f"the signature takes the inputs {sorted(self._inputs)}, got {sorted(inputs)}")
        for name, value in inputs.items():
            self._wrapper.SetTensor(self._inputs[name], value, self._subgraph)
        self._wrapper.Invoke(self._subgraph)
        return {name: self._wrapper.GetTensor(index, self._subgraph) for name, index in self._outputs}


# What PresetShapeRunner reads of a SignatureRunner (ai-edge-litert 2.x and tflite-runtime 2.14 have them).
_RUNNER_ATTRIBUTES = ("_interpreter", "_interpreter_wrapper", "_subgraph_index", "_inputs", "_outputs")


def signature_runner(interpreter: Any, signature: str) -> Callable[..., dict[str, np.ndarray]]:
    """A callable that runs `signature` of `interpreter` (keyword inputs -> dict of outputs).

    It is the backend's SignatureRunner minus the per-call input resize that crashes
    ai-edge-litert on aarch64 (see PresetShapeRunner). A backend whose SignatureRunner lacks
    the attributes this relies on gets its own SignatureRunner, with a warning.
    """
    runner = interpreter.get_signature_runner(signature)
    missing = [name for name in _RUNNER_ATTRIBUTES if not hasattr(runner, name)]
    if missing:
        _warn_resizing_runner(type(runner).__module__, tuple(missing))
        return runner
    return PresetShapeRunner(runner)


@functools.cache
def _warn_resizing_runner(module: str, missing: tuple[str, ...]) -> None:
    """Say once that this backend's runner resizes inputs, which crashes ai-edge-litert 2.2-2.3 on aarch64."""
    logger.warning("%s's SignatureRunner lacks %s: using it as is; it resizes every input on every call, "
                   "which crashes ai-edge-litert 2.2-2.3 on aarch64 for scalar inputs", module, ", ".join(missing))
