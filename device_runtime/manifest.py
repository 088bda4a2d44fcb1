"""The manifest of a trainable artifact as typed values (docs/artifact.md), read without TensorFlow.

The artifact stores its manifest as JSON in the `.tflite` metadata; `Manifest.from_json` checks
that JSON once and every reader (device, server, simulator, converter) uses the typed fields,
never string keys. `ContentHash` is the artifact's identity: 'sha256:' + 64 lowercase hex digits.
"""

from __future__ import annotations

import math
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MANIFEST_FORMAT = "fedge-trainable"
MANIFEST_FORMAT_VERSION = 1
_CONTENT_HASH = re.compile(r"sha256:[0-9a-f]{64}")
_FINALIZER_ARITY = {"divide": 2, "identity": 1}


class ManifestError(ValueError):
    """A manifest that does not follow docs/artifact.md; the message names the field."""


class ContentHash(str):
    """An artifact's content hash, 'sha256:<64 lowercase hex>' (a str, so it goes wherever a hash string goes)."""

    def __new__(cls, value: object, what: str = "content_hash") -> ContentHash:
        """Check the form; ManifestError naming `what` otherwise."""
        if not isinstance(value, str) or not _CONTENT_HASH.fullmatch(value):
            raise ManifestError(f"{what} {value!r:.80} is not 'sha256:' + 64 lowercase hex digits")
        return super().__new__(cls, value)

    @property
    def hex(self) -> str:
        """The 64 hex digits (what model topics are named by)."""
        return self[len("sha256:"):]


@dataclass(frozen=True)
class TensorSpec:
    """The per-example shape and element type of the artifact's input, label or output."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class WeightSpec:
    """One model weight: its signature key (w_000, ...), Keras path, shape, dtype and whether it is trained."""

    key: str
    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class LossSpec:
    """The loss the artifact trains with ('custom' for a fedge.learning.Model's own)."""

    name: str
    from_logits: bool = False
    ignore_class: int | None = None


@dataclass(frozen=True)
class LabelRange:
    """The values the loss takes as labels: within [low, high] (integers only when `integer`), or `ignore`
    (a sequence's padding label), so that labels the model cannot learn from are refused, not trained on."""

    low: float
    high: float
    integer: bool
    ignore: int | None = None

    def problem(self, labels: Any) -> str | None:
        """What is wrong with `labels` (an array), or None."""
        values = np.asarray(labels)
        bad = (values < self.low) | (values > self.high)
        if self.ignore is not None:
            bad &= values != self.ignore
        if not bad.any():
            return None
        kind = f"class ids in [{self.low:g}, {self.high:g}]" if self.integer else f"values in [{self.low:g}, " \
            f"{self.high:g}]"
        return f"labels must be {kind} for this model's loss and output, got {values[bad].flat[0].item()!r} " \
               f"({int(bad.sum())} of {values.size} outside)"


@dataclass(frozen=True)
class OptimizerSpec:
    """The client optimizer baked into the artifact: its name, learning rate and other settings."""

    name: str
    learning_rate: float
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricsSpec:
    """The unfinalized metric variables `report_metrics` returns, and how the server finalizes their sums."""

    variables: tuple[str, ...]
    finalizers: Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class Manifest:
    """Everything a device or server needs to know about an artifact besides its operators."""

    model_name: str
    batch_size: int
    input: TensorSpec
    label: TensorSpec
    output: TensorSpec
    weights: tuple[WeightSpec, ...]
    num_parameters: int
    loss: LossSpec
    optimizer: OptimizerSpec
    metrics: MetricsSpec
    signatures: tuple[str, ...]
    producer: str
    content_hash: ContentHash
    proximal: bool = False
    json: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)  # as stored in the file

    @property
    def label_range(self) -> LabelRange | None:
        """The labels the loss can learn from (None: any, e.g. mean squared error or a custom loss)."""
        if self.loss.name == "sparse_categorical_crossentropy":
            return LabelRange(0, self.output.shape[-1] - 1, True, self.loss.ignore_class)
        if self.loss.name in ("categorical_crossentropy", "binary_crossentropy"):
            return LabelRange(0, 1, False)
        return None

    @property
    def trainable_mask(self) -> tuple[bool, ...]:
        """Which weights (manifest order) are trainable."""
        return tuple(weight.trainable for weight in self.weights)

    @classmethod
    def from_json(cls, document: Any) -> Manifest:
        """Check a manifest's JSON object (docs/artifact.md) and type it; ManifestError names the bad field."""
        fields = _Fields(document)
        if fields.get("format") != MANIFEST_FORMAT:
            raise ManifestError(f"manifest format is {fields.get('format')!r:.40}, not '{MANIFEST_FORMAT}'")
        if fields.get("format_version") != MANIFEST_FORMAT_VERSION:
            raise ManifestError(f"manifest format_version {fields.get('format_version')!r:.40} is not supported "
                                f"(this runtime reads {MANIFEST_FORMAT_VERSION})")
        loss = fields.table("loss")
        optimizer = fields.table("optimizer")
        metrics = fields.table("metrics")
        finalizers = _Fields(metrics.get("finalizers"), "metrics.finalizers")
        return cls(
            model_name=fields.text("model_name"),
            batch_size=fields.integer("batch_size", minimum=1),
            input=_tensor(fields.table("input")),
            label=_tensor(fields.table("label")),
            output=_tensor(fields.table("output")),
            weights=tuple(_weight(_Fields(entry, f"weights[{i}]"))
                          for i, entry in enumerate(fields.array("weights"))),
            num_parameters=fields.integer("num_parameters", minimum=0),
            loss=LossSpec(loss.text("name"), loss.boolean("from_logits"), loss.optional_integer("ignore_class")),
            optimizer=OptimizerSpec(optimizer.text("name"), optimizer.number("learning_rate"), types.MappingProxyType(
                {k: v for k, v in optimizer.document.items() if k not in ("name", "learning_rate")})),
            metrics=MetricsSpec(tuple(str(v) for v in metrics.array("variables")), types.MappingProxyType(
                {name: _finalizer(name, finalizers.array(name)) for name in finalizers.document})),
            signatures=tuple(str(s) for s in fields.array("signatures")),
            producer=str(fields.get("producer", "")),
            content_hash=ContentHash(fields.get("content_hash")),
            proximal=fields.boolean("proximal"),
            json=types.MappingProxyType(dict(fields.document)),
        )


class _Fields:
    """Typed reads of one JSON object's fields; errors name the field."""

    def __init__(self, document: Any, where: str = "manifest") -> None:
        if not isinstance(document, Mapping):
            raise ManifestError(f"{where} must be a JSON object, got {type(document).__name__}")
        self.document, self.where = document, where

    def get(self, key: str, default: Any = None) -> Any:
        return self.document.get(key, default)

    def _missing(self, key: str) -> Any:
        if key not in self.document:
            raise ManifestError(f"{self.where}.{key} is missing")
        return self.document[key]

    def table(self, key: str) -> _Fields:
        return _Fields(self._missing(key), f"{self.where}.{key}")

    def array(self, key: str) -> list[Any]:
        value = self._missing(key)
        if not isinstance(value, list):
            raise ManifestError(f"{self.where}.{key} must be a list, got {value!r:.80}")
        return value

    def text(self, key: str) -> str:
        value = self._missing(key)
        if not isinstance(value, str):
            raise ManifestError(f"{self.where}.{key} must be a string, got {value!r:.80}")
        return value

    def integer(self, key: str, minimum: int) -> int:
        value = self._missing(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ManifestError(f"{self.where}.{key} must be an integer >= {minimum}, got {value!r:.80}")
        return value

    def boolean(self, key: str) -> bool:
        value = self.get(key, False)
        if not isinstance(value, bool):
            raise ManifestError(f"{self.where}.{key} must be true or false, got {value!r:.80}")
        return value

    def optional_integer(self, key: str) -> int | None:
        value = self.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ManifestError(f"{self.where}.{key} must be an integer, got {value!r:.80}")
        return value

    def number(self, key: str) -> float:
        value = self._missing(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ManifestError(f"{self.where}.{key} must be a finite number, got {value!r:.80}")
        return float(value)

    def shape(self, key: str) -> tuple[int, ...]:
        value = self.array(key)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value):
            raise ManifestError(f"{self.where}.{key} must be a list of sizes >= 0, got {value!r:.80}")
        return tuple(value)


def _tensor(fields: _Fields) -> TensorSpec:
    return TensorSpec(fields.shape("shape"), fields.text("dtype"))


def _weight(fields: _Fields) -> WeightSpec:
    return WeightSpec(fields.text("key"), fields.text("name"), fields.shape("shape"), fields.text("dtype"),
                      fields.get("trainable", True) is True)


def _finalizer(name: str, entry: list[Any]) -> tuple[str, ...]:
    """A finalizer ["divide", a, b] or ["identity", a]."""
    if not entry or not all(isinstance(e, str) for e in entry) or _FINALIZER_ARITY.get(entry[0]) != len(entry) - 1:
        raise ManifestError(f"manifest.metrics.finalizers.{name} {entry!r:.80} is not [\"divide\", a, b] "
                            f"or [\"identity\", a]")
    return tuple(entry)
