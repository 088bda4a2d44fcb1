"""Read a fedge trainable artifact (a `.tflite` flatbuffer) without TensorFlow.

Only the few tables fedge needs are read (operator codes, subgraph operators, signature
definitions, metadata and buffers), with the `flatbuffers` runtime, so a device can check
a model before it hands the bytes to the interpreter. Field numbers follow TFLite's
`schema.fbs`; docs/artifact.md describes the manifest and its content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import flatbuffers
from flatbuffers import number_types as N
from flatbuffers.table import Table

from device_runtime.manifest import ContentHash, Manifest, ManifestError

MANIFEST_METADATA_NAME = "fedge_manifest"
TFLITE_FILE_IDENTIFIER = b"TFL3"
BUILTIN_CUSTOM_CODE = 32  # BuiltinOperator.CUSTOM: Flex ops are custom ops named "Flex..."
_HASH_PATTERN = re.compile(rb'"content_hash": "sha256:([0-9a-f]{64})"')
_ZERO_DIGEST = b"0" * 64

# Field slots (4 + 2 * field index in schema.fbs).
_MODEL_OPERATOR_CODES, _MODEL_SUBGRAPHS, _MODEL_BUFFERS = 6, 8, 12
_MODEL_METADATA, _MODEL_SIGNATURE_DEFS = 16, 18
_OPCODE_DEPRECATED_BUILTIN, _OPCODE_CUSTOM, _OPCODE_BUILTIN = 4, 6, 10
_SUBGRAPH_TENSORS, _SUBGRAPH_OPERATORS = 4, 10
_OPERATOR_OPCODE_INDEX = 4
_BUFFER_DATA, _BUFFER_OFFSET, _BUFFER_SIZE = 4, 6, 8
_METADATA_NAME, _METADATA_BUFFER = 4, 6
_SIGDEF_INPUTS, _SIGDEF_OUTPUTS, _SIGDEF_KEY, _SIGDEF_SUBGRAPH = 4, 6, 8, 12
_TENSORMAP_NAME, _TENSORMAP_INDEX = 4, 6
_TENSOR_SHAPE, _TENSOR_TYPE, _TENSOR_NAME = 4, 6, 10
_TENSOR_TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64",
                      6: "bool", 7: "int16", 9: "int8", 10: "float64"}


class ArtifactError(ValueError):
    """The bytes are not a valid fedge artifact (not TFLite, no manifest, bad hash...)."""


@dataclass(frozen=True)
class OperatorUse:
    """One operator kind in a model and how many times its subgraphs use it."""

    name: str
    builtin: bool
    count: int


@dataclass(frozen=True)
class TensorInfo:
    """A signature input or output: its name, shape and element type."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class SignatureInfo:
    """A signature of the model with its inputs and outputs."""

    key: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


def _root(model_bytes: bytes) -> Table:
    if len(model_bytes) < 8 or model_bytes[4:8] != TFLITE_FILE_IDENTIFIER:
        raise ArtifactError("not a TFLite flatbuffer (file identifier 'TFL3' missing)")
    return Table(model_bytes, flatbuffers.encode.Get(flatbuffers.packer.uoffset, model_bytes, 0))


def _vector(table: Table, slot: int) -> list[Table]:
    """The tables of a vector-of-tables field (empty when the field is absent)."""
    offset = table.Offset(slot)
    if not offset:
        return []
    start = table.Vector(offset)
    return [Table(table.Bytes, table.Indirect(start + 4 * i)) for i in range(table.VectorLen(offset))]


def _scalar_vector(table: Table, slot: int, flags: Any) -> list[int]:
    offset = table.Offset(slot)
    if not offset:
        return []
    start = table.Vector(offset)
    return [table.Get(flags, start + flags.bytewidth * i) for i in range(table.VectorLen(offset))]


def _scalar(table: Table, slot: int, flags: Any, default: int = 0) -> int:
    offset = table.Offset(slot)
    return table.Get(flags, table.Pos + offset) if offset else default


def _string(table: Table, slot: int) -> str:
    offset = table.Offset(slot)
    return table.String(table.Pos + offset).decode("utf-8") if offset else ""


def _guarded(read):
    """Turn any low-level decoding failure into an ArtifactError."""

    def wrapper(model_bytes: bytes, *args, **kwargs):
        try:
            return read(model_bytes, *args, **kwargs)
        except ArtifactError:
            raise
        except Exception as error:  # a truncated or corrupt flatbuffer raises anything
            raise ArtifactError(f"corrupt TFLite flatbuffer ({type(error).__name__}: {error})") from error

    wrapper.__name__, wrapper.__doc__ = read.__name__, read.__doc__
    return wrapper


def _buffer_bytes(model_bytes: bytes, model: Table, index: int) -> bytes:
    buffers = _vector(model, _MODEL_BUFFERS)
    if not 0 <= index < len(buffers):
        raise ArtifactError(f"buffer index {index} out of range (model has {len(buffers)})")
    buffer = buffers[index]
    offset = buffer.Offset(_BUFFER_DATA)
    if offset:
        start = buffer.Vector(offset)
        return bytes(model_bytes[start:start + buffer.VectorLen(offset)])
    external = _scalar(buffer, _BUFFER_OFFSET, N.Uint64Flags)
    size = _scalar(buffer, _BUFFER_SIZE, N.Uint64Flags)
    if external > 1 and external + size <= len(model_bytes):
        return bytes(model_bytes[external:external + size])
    return b""


@_guarded
def read_metadata(model_bytes: bytes) -> dict[str, bytes]:
    """Every metadata entry of the model, name -> raw bytes."""
    model = _root(model_bytes)
    return {
        _string(entry, _METADATA_NAME): _buffer_bytes(
            model_bytes, model, _scalar(entry, _METADATA_BUFFER, N.Uint32Flags))
        for entry in _vector(model, _MODEL_METADATA)
    }


def read_manifest_json(model_bytes: bytes) -> dict[str, Any]:
    """The fedge manifest embedded in the model, as the JSON object stored there (unchecked)."""
    raw = read_metadata(model_bytes).get(MANIFEST_METADATA_NAME)
    if raw is None:
        raise ArtifactError(f"no '{MANIFEST_METADATA_NAME}' metadata: not a fedge trainable artifact")
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"manifest is not valid UTF-8 JSON: {error}") from error
    if not isinstance(document, dict):
        raise ArtifactError(f"manifest must be a JSON object, got {type(document).__name__}")
    return document


def read_manifest(model_bytes: bytes) -> Manifest:
    """The fedge manifest embedded in the model (docs/artifact.md), checked and typed."""
    try:
        return Manifest.from_json(read_manifest_json(model_bytes))
    except ManifestError as error:
        raise ArtifactError(str(error)) from None


def content_digest(model_bytes: bytes) -> str:
    """SHA-256 of the file with the manifest's own hash digits zeroed (docs/artifact.md)."""
    matches = list(_HASH_PATTERN.finditer(model_bytes))
    if len(matches) != 1:
        raise ArtifactError(f"expected one content_hash field in the file, found {len(matches)}")
    start, end = matches[0].span(1)
    digest = hashlib.sha256()
    digest.update(memoryview(model_bytes)[:start])
    digest.update(_ZERO_DIGEST)
    digest.update(memoryview(model_bytes)[end:])
    return "sha256:" + digest.hexdigest()


def verify_content_hash(model_bytes: bytes) -> ContentHash:
    """Recompute the content hash and compare it with the manifest's; return it."""
    claimed = read_manifest_json(model_bytes).get("content_hash")
    actual = ContentHash(content_digest(model_bytes))
    if claimed != actual:
        raise ArtifactError(f"content hash mismatch: manifest says {claimed}, bytes give {actual}")
    return actual


@dataclass(frozen=True)
class Artifact:
    """A trainable artifact: the `.tflite` bytes and the manifest embedded in them.

    What the converters produce and what the server, the in-process executors and the
    simulator hand to devices; reading one needs no TensorFlow.
    """

    tflite_bytes: bytes
    manifest: Manifest

    @property
    def content_hash(self) -> ContentHash:
        """The artifact's identity (what tasks and model topics name it by)."""
        return self.manifest.content_hash

    @classmethod
    def from_bytes(cls, model_bytes: bytes) -> Artifact:
        """The artifact in `model_bytes`, its content hash verified (ArtifactError otherwise)."""
        verify_content_hash(model_bytes)
        return cls(model_bytes, read_manifest(model_bytes))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Artifact:
        """The artifact in the `.tflite` file at `path`, its content hash verified."""
        return cls.from_bytes(Path(path).read_bytes())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the `.tflite` file and return its path."""
        path = Path(path)
        path.write_bytes(self.tflite_bytes)
        return path


@lru_cache(maxsize=1)
def _builtin_names() -> dict[int, str]:
    """Builtin operator names from the interpreter's schema, when it ships one."""
    try:
        from ai_edge_litert.schema_py_generated import BuiltinOperator
    except ImportError:
        return {}
    return {code: name for name, code in vars(BuiltinOperator).items() if not name.startswith("_")}


@_guarded
def list_operators(model_bytes: bytes) -> list[OperatorUse]:
    """Operator kinds used by any subgraph, most used first; custom and Flex ops are not builtin."""
    model = _root(model_bytes)
    kinds = []
    for code in _vector(model, _MODEL_OPERATOR_CODES):
        builtin = max(_scalar(code, _OPCODE_DEPRECATED_BUILTIN, N.Int8Flags),
                      _scalar(code, _OPCODE_BUILTIN, N.Int32Flags))
        custom = _string(code, _OPCODE_CUSTOM)
        if builtin == BUILTIN_CUSTOM_CODE or custom:
            kinds.append((custom or "CUSTOM", False))
        else:
            kinds.append((_builtin_names().get(builtin, f"BUILTIN_{builtin}"), True))
    counts: Counter[int] = Counter()
    for subgraph in _vector(model, _MODEL_SUBGRAPHS):
        for operator in _vector(subgraph, _SUBGRAPH_OPERATORS):
            counts[_scalar(operator, _OPERATOR_OPCODE_INDEX, N.Uint32Flags)] += 1
    uses: dict[tuple[str, bool], int] = Counter()
    for index, count in counts.items():
        if not 0 <= index < len(kinds):
            raise ArtifactError(f"operator code index {index} out of range")
        uses[kinds[index]] += count
    return sorted((OperatorUse(name, builtin, count) for (name, builtin), count in uses.items()),
                  key=lambda use: (-use.count, use.name))


@_guarded
def list_signatures(model_bytes: bytes) -> list[SignatureInfo]:
    """The model's signatures with the shapes and types of their inputs and outputs."""
    model = _root(model_bytes)
    subgraphs = _vector(model, _MODEL_SUBGRAPHS)

    def tensors(signature: Table, slot: int, subgraph: Table) -> tuple[TensorInfo, ...]:
        all_tensors = _vector(subgraph, _SUBGRAPH_TENSORS)
        infos = []
        for mapping in _vector(signature, slot):
            tensor = all_tensors[_scalar(mapping, _TENSORMAP_INDEX, N.Uint32Flags)]
            dtype = _scalar(tensor, _TENSOR_TYPE, N.Int8Flags)
            infos.append(TensorInfo(
                _string(mapping, _TENSORMAP_NAME),
                tuple(_scalar_vector(tensor, _TENSOR_SHAPE, N.Int32Flags)),
                _TENSOR_TYPE_NAMES.get(dtype, f"type{dtype}")))
        return tuple(sorted(infos, key=lambda info: info.name))

    signatures = []
    for signature in _vector(model, _MODEL_SIGNATURE_DEFS):
        subgraph = subgraphs[_scalar(signature, _SIGDEF_SUBGRAPH, N.Uint32Flags)]
        signatures.append(SignatureInfo(
            _string(signature, _SIGDEF_KEY),
            tensors(signature, _SIGDEF_INPUTS, subgraph),
            tensors(signature, _SIGDEF_OUTPUTS, subgraph)))
    return signatures
