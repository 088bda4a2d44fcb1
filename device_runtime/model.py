"""A fedge trainable artifact (docs/artifact.md) run by a stock TFLite interpreter, without TensorFlow."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from device_runtime.artifact import read_manifest, verify_content_hash
from device_runtime.manifest import ContentHash, Manifest, TensorSpec, WeightSpec
from device_runtime.interpreter import load_interpreter, load_interpreter_from_file, signature_runner
from device_runtime.mapped_file import release_mapped_pages

REQUIRED_SIGNATURES = (
    "train",
    "evaluate",
    "forward",
    "report_metrics",
    "reset_metrics",
    "get_weights",
    "set_weights",
    "set_learning_rate",
    "reset_optimizer",
)

Batch = tuple[np.ndarray, np.ndarray, np.ndarray]
_MASK_SPEC = TensorSpec((), "float32")


def _shape_text(per_example: tuple[int, ...], rows: str) -> str:
    """Render a batch shape such as '(N, 28, 28, 1)' for error messages."""
    return "(" + ", ".join([rows, *map(str, per_example)]) + ")"


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """Return `array` with zero rows appended up to `rows` rows."""
    missing = rows - array.shape[0]
    if missing == 0:
        return array
    padding = np.zeros((missing, *array.shape[1:]), dtype=array.dtype)
    return np.concatenate([array, padding])


def _cast(array: np.ndarray, dtype: np.dtype, what: str) -> np.ndarray:
    """Convert `array` to `dtype` if no value changes meaning; ValueError naming `what` otherwise."""
    source = array.dtype
    if source == dtype:
        return array
    numeric = source == np.bool_ or np.issubdtype(source, np.integer) or np.issubdtype(source, np.floating)
    if np.issubdtype(dtype, np.floating):
        ok = numeric
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if source == np.bool_:
            ok = True
        elif np.issubdtype(source, np.integer):
            ok = array.size == 0 or (array.min() >= info.min and array.max() <= info.max)
        elif np.issubdtype(source, np.floating):
            ok = array.size == 0 or bool(
                np.all(np.isfinite(array))
                and np.all(array == np.round(array))
                and array.min() >= info.min
                and array.max() <= info.max
            )
        else:
            ok = False
    else:
        ok = np.can_cast(source, dtype, casting="safe")
    if not ok:
        raise ValueError(f"{what}: expected dtype {dtype}, got {source} whose values cannot be converted exactly")
    return array.astype(dtype)


def _validated_rows(value: Any, spec: TensorSpec, what: str, min_rows: int, max_rows: int | None) -> np.ndarray:
    """Check that `value` is a batch of `spec` examples with an allowed row count, and cast it to spec's dtype."""
    array = np.asarray(value)
    per_example = tuple(int(d) for d in spec.shape)
    if array.ndim != len(per_example) + 1 or array.shape[1:] != per_example:
        raise ValueError(
            f"{what}: expected shape {_shape_text(per_example, 'N')} (one row per example), got {array.shape}"
        )
    rows = array.shape[0]
    if rows < min_rows or (max_rows is not None and rows > max_rows):
        if max_rows is None:
            allowed = f"at least {min_rows}"
        elif max_rows == min_rows:
            allowed = f"exactly {min_rows}"
        else:
            allowed = f"{min_rows} to {max_rows}"
        raise ValueError(
            f"{what}: expected {allowed} rows of shape {_shape_text(per_example, 'N')}, got shape {array.shape}"
        )
    return _cast(array, np.dtype(spec.dtype), what)


def finalize_metrics(finalizers: Mapping[str, Sequence[str]], unfinalized: Mapping[str, float]) -> dict[str, float]:
    """Apply manifest.metrics.finalizers ("divide", "identity") to unfinalized metric sums."""

    def variable(name: str, metric: str) -> float:
        if name not in unfinalized:
            raise ValueError(f"metric {metric!r} needs variable {name!r}, which is not among {sorted(unfinalized)}")
        return float(unfinalized[name])

    finalized = {}
    for metric, (op, *args) in finalizers.items():
        if op == "divide" and len(args) == 2:
            numerator, denominator = variable(args[0], metric), variable(args[1], metric)
            finalized[metric] = numerator / denominator if denominator != 0 else 0.0
        elif op == "identity" and len(args) == 1:
            finalized[metric] = variable(args[0], metric)
        else:
            raise ValueError(f"metric {metric!r}: unsupported finalizer {[op, *args]!r}")
    return finalized


def iterate_batches(x: Any, y: Any, batch_size: int, shuffle_seed: int | None = None) -> Iterator[Batch]:
    """Yield zero-padded (x, y, mask) batches covering every example exactly once (mask 0 on padding)."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0:
        raise ValueError(f"x and y need a leading example axis, got shapes {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same number of examples, got {x.shape[0]} and {y.shape[0]}")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    batch_size = int(batch_size)
    count = x.shape[0]
    order = np.arange(count) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(count)
    return _batches(x, y, order, batch_size)


def _batches(x: np.ndarray, y: np.ndarray, order: np.ndarray, batch_size: int) -> Iterator[Batch]:
    """Generator behind iterate_batches (kept separate so argument errors raise at call time)."""
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        mask = np.zeros(batch_size, dtype=np.float32)
        mask[: len(index)] = 1.0
        yield _pad_rows(x[index], batch_size), _pad_rows(y[index], batch_size), mask


class TrainableModel:
    """One trainable .tflite artifact loaded in an interpreter; weights and metrics live in the interpreter.

    Not thread-safe: use one instance per thread.
    """

    def __init__(self, model_bytes: bytes, num_threads: int | None = None, verify: bool = True) -> None:
        """Load `model_bytes`, checking its content hash first when `verify` is true."""
        model_bytes = bytes(model_bytes)
        self._read_manifest(model_bytes, verify)
        self._attach(load_interpreter(model_bytes, num_threads=num_threads))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], num_threads: int | None = None, verify: bool = True) -> TrainableModel:
        """Load an artifact from a .tflite file, which the interpreter maps instead of copying.

        The variables take their initial weights from the mapped file on the first run of any
        signature. After that run the file's pages are handed back (device_runtime.mapped_file),
        so the initial weights do not stay in memory beside the variables (6.3 MB for the McMahan
        CNN); whatever the interpreter reads later is paged in again.
        """
        model = cls.__new__(cls)
        with open(path, "rb") as f:
            model._read_manifest(f.read(), verify)
        model._attach(load_interpreter_from_file(path, num_threads=num_threads))
        model.report_metrics()  # the first run of a signature initializes every variable
        release_mapped_pages(path)
        return model

    def _read_manifest(self, model_bytes: bytes, verify: bool) -> None:
        """Read the manifest, checking the content hash first when `verify` is true."""
        self._manifest = read_manifest(model_bytes)
        if verify:
            verify_content_hash(model_bytes)
        self._batch_size = self._manifest.batch_size

    def _attach(self, interpreter: Any) -> None:
        """Use `interpreter`, once it is known to have every signature of docs/artifact.md."""
        missing = [name for name in REQUIRED_SIGNATURES if name not in interpreter.get_signature_list()]
        if missing:
            raise ValueError(f"artifact lacks the signatures {missing} required by docs/artifact.md")
        self._interpreter = interpreter
        self._runners: dict[str, Any] = {}

    @property
    def manifest(self) -> Manifest:
        """The artifact's manifest."""
        return self._manifest

    @property
    def content_hash(self) -> ContentHash:
        """The artifact's content hash, 'sha256:<64 hex>'."""
        return self._manifest.content_hash

    @property
    def batch_size(self) -> int:
        """The batch size B fixed at conversion."""
        return self._batch_size

    @property
    def weight_specs(self) -> tuple[WeightSpec, ...]:
        """The manifest's weights: key, name, shape, dtype, trainable, in weight order."""
        return self._manifest.weights

    @property
    def metric_names(self) -> list[str]:
        """Names of the finalized metrics (the keys of manifest.metrics.finalizers)."""
        return list(self._manifest.metrics.finalizers)

    def _run(self, signature: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Invoke one signature of the artifact."""
        runner = self._runners.get(signature)
        if runner is None:
            runner = self._runners[signature] = signature_runner(self._interpreter, signature)
        return runner(**inputs)

    def _padded_batch(self, x: Any, y: Any) -> Batch:
        """Validate 1..B rows of (x, y), pad them to B rows and build the mask."""
        b = self._batch_size
        x = _validated_rows(x, self._manifest.input, "x", 1, b)
        y = _validated_rows(y, self._manifest.label, "y", 1, b)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        mask = np.zeros(b, dtype=np.float32)
        mask[: x.shape[0]] = 1.0
        return _pad_rows(x, b), _pad_rows(y, b), mask

    def _full_batch(self, x: Any, y: Any, mask: Any) -> dict[str, np.ndarray]:
        """Validate a full batch of B rows and its mask, as the train/evaluate signatures take them."""
        b = self._batch_size
        return {"x": _validated_rows(x, self._manifest.input, "x", b, b),
                "y": _validated_rows(y, self._manifest.label, "y", b, b),
                "mask": _validated_rows(mask, _MASK_SPEC, "mask", b, b)}

    def train_step(self, x: Any, y: Any, mask: Any) -> float:
        """One optimizer step on a full batch of B rows where `mask` marks real rows; returns the loss."""
        return float(self._run("train", **self._full_batch(x, y, mask))["loss"])

    def evaluate_step(self, x: Any, y: Any, mask: Any) -> float:
        """Accumulate metrics on a full batch of B rows where `mask` marks real rows; returns the loss."""
        return float(self._run("evaluate", **self._full_batch(x, y, mask))["loss"])

    def train_batch(self, x: Any, y: Any) -> float:
        """One optimizer step on 1..B examples (padded and masked); returns their mean loss."""
        x, y, mask = self._padded_batch(x, y)
        return float(self._run("train", x=x, y=y, mask=mask)["loss"])

    def evaluate_batch(self, x: Any, y: Any) -> float:
        """Accumulate metrics on 1..B examples without changing weights; returns their mean loss."""
        x, y, mask = self._padded_batch(x, y)
        return float(self._run("evaluate", x=x, y=y, mask=mask)["loss"])

    def predict(self, x: Any) -> np.ndarray:
        """Model outputs for any number of rows, computed in chunks of B; returns exactly one row per input row."""
        b = self._batch_size
        x = _validated_rows(x, self._manifest.input, "x", 0, None)
        output_spec = self._manifest.output
        if x.shape[0] == 0:
            return np.zeros((0, *output_spec.shape), dtype=np.dtype(output_spec.dtype))
        chunks = []
        for start in range(0, x.shape[0], b):
            chunk = x[start : start + b]
            chunks.append(self._run("forward", x=_pad_rows(chunk, b))["output"][: chunk.shape[0]])
        return np.concatenate(chunks)

    def get_weights(self) -> list[np.ndarray]:
        """Every model weight (trainable and not), in manifest.weights order."""
        outputs = self._run("get_weights")
        return [np.array(outputs[spec.key]) for spec in self._manifest.weights]

    def set_weights(self, weights: Sequence[Any]) -> None:
        """Replace every model weight; nothing changes if any weight has the wrong count, shape or dtype."""
        specs = self._manifest.weights
        if len(weights) != len(specs):
            raise ValueError(f"expected {len(specs)} weights, got {len(weights)}")
        inputs = {}
        for index, (value, spec) in enumerate(zip(weights, specs)):
            array = np.asarray(value)
            what = f"weight {index} ({spec.name})"
            if array.shape != tuple(spec.shape):
                raise ValueError(f"{what}: expected shape {tuple(spec.shape)}, got {array.shape}")
            inputs[spec.key] = _cast(array, np.dtype(spec.dtype), what)
        self._run("set_weights", **inputs)

    def report_metrics(self) -> dict[str, float]:
        """The unfinalized local metrics (loss_sum, num_examples, ...)."""
        return self._metrics(self._run("report_metrics"))

    def reset_metrics(self) -> dict[str, float]:
        """Return the unfinalized local metrics, then set them to zero."""
        return self._metrics(self._run("reset_metrics"))

    def _metrics(self, outputs: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Metric outputs as floats, in manifest.metrics.variables order."""
        return {name: float(outputs[name]) for name in self._manifest.metrics.variables}

    def finalized_metrics(self, unfinalized: Mapping[str, float]) -> dict[str, float]:
        """Finalize (possibly summed across clients) metric variables with this artifact's finalizers."""
        return finalize_metrics(self._manifest.metrics.finalizers, unfinalized)

    def set_learning_rate(self, learning_rate: float) -> float:
        """Set the client optimizer's learning rate; returns the value now in effect."""
        if not math.isfinite(learning_rate) or learning_rate < 0:
            raise ValueError(f"learning_rate must be finite and >= 0, got {learning_rate!r}")
        outputs = self._run("set_learning_rate", learning_rate=np.array(learning_rate, dtype=np.float32))
        return float(outputs["learning_rate"])

    def set_proximal_mu(self, proximal_mu: float) -> float:
        """Set FedProx's proximal strength (artifacts converted with proximal=True); returns it."""
        if not self._manifest.proximal:
            raise ValueError("this artifact has no proximal term: convert it with proximal=True for FedProx")
        if not math.isfinite(proximal_mu) or proximal_mu < 0:
            raise ValueError(f"proximal_mu must be finite and >= 0, got {proximal_mu!r}")
        outputs = self._run("set_proximal_mu", proximal_mu=np.array(proximal_mu, dtype=np.float32))
        return float(outputs["proximal_mu"])

    def reset_optimizer(self) -> None:
        """Zero the optimizer slots and step counter, as for a fresh client optimizer."""
        self._run("reset_optimizer")
