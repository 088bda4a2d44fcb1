"""Encode and decode fedge protocol messages: model updates (FlatBuffers), tasks and statuses (JSON).

Both ends use this module. `decode_update` is the server's security boundary: it checks
every offset, length, shape, value and identifier of an untrusted payload against the model
manifest before it allocates the dense tensors. docs/protocol.md specifies the bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import numbers
import re
import struct
from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np

from device_runtime.protocol import _flatbuf
from device_runtime.protocol.errors import PROTOCOL_VERSION, Fault, ProtocolError
from device_runtime.protocol.generated import update_generated as fb
from device_runtime.protocol.topics import check_id
from device_runtime.manifest import ContentHash, Manifest, ManifestError

FILE_IDENTIFIER = b"FEUP"
MAX_STRING_BYTES = 256
MAX_TASK_BYTES = 1 << 20
MAX_STATUS_BYTES = 1 << 16
STATES = ("online", "training", "offline")
# encoding name -> (schema enum value, little-endian dtype of one stored value)
ENCODINGS = {
    "float32": (fb.Encoding.FLOAT32, np.dtype("<f4")),
    "float16": (fb.Encoding.FLOAT16, np.dtype("<f2")),
    "int8": (fb.Encoding.INT8, np.dtype("i1")),
}
_DTYPE_BY_ENUM = {enum: (name, dtype) for name, (enum, dtype) in ENCODINGS.items()}
_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<Q"))
_F32, _F64 = struct.Struct("<f"), struct.Struct("<d")


@dataclass
class ModelUpdate:
    """A device's result for one round of one job (`run_id`): dense float32 weight deltas in manifest order."""

    fleet: str
    round: int
    device_id: str
    update_id: str
    model_hash: str
    num_examples: int
    metrics: dict[str, float]
    tensors: list[np.ndarray]
    run_id: str


# ---------------------------------------------------------------------------- field checks


def check_uint(value: object, what: str, bits: int = 64, low: int = 0) -> int:
    """`value` as an int in [low, 2**bits) (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ProtocolError(f"{what} must be an integer, got {value!r:.80}")
    if not low <= int(value) < 1 << bits:
        raise ProtocolError(f"{what} is {value}, outside [{low}, 2**{bits})")
    return int(value)


def check_real(value: object, what: str, low: float, high: float = math.inf, low_open: bool = True) -> float:
    """`value` as a finite float in (low, high] (or [low, high] when not `low_open`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ProtocolError(f"{what} must be a finite number, got {value!r:.80}")
    if value < low or (low_open and value == low) or value > high:
        raise ProtocolError(f"{what} is {value}, outside {'(' if low_open else '['}{low}, {high}]")
    return float(value)


def optional(value: object, check: Any, *args: Any) -> Any:
    """None, or `value` passed through `check`."""
    return None if value is None else check(value, *args)


def _text(value: object, what: str) -> str:
    """A non-empty printable string of at most MAX_STRING_BYTES UTF-8 bytes."""
    if not isinstance(value, str) or not value or not value.isprintable():
        raise ProtocolError(f"{what} must be a non-empty printable string, got {value!r:.80}")
    if len(value.encode("utf-8")) > MAX_STRING_BYTES:
        raise ProtocolError(f"{what} is longer than {MAX_STRING_BYTES} bytes")
    return value


def check_hash(value: object, what: str = "model_hash") -> str:
    """A 'sha256:<64 lowercase hex>' string."""
    try:
        return ContentHash(value, what)
    except ManifestError as error:
        raise ProtocolError(str(error)) from None


def check_encoding(value: object) -> str:
    """One of the encoding names in ENCODINGS."""
    if value not in ENCODINGS:
        raise ProtocolError(f"encoding {value!r:.80} is not one of {sorted(ENCODINGS)}")
    return str(value)


# ---------------------------------------------------------------------------- updates


def _quantize(values: np.ndarray, encoding: str, where: str) -> tuple[bytes, float]:
    """The stored bytes of float32 `values` in `encoding`, and the int8 scale (0 otherwise)."""
    if encoding == "float32":
        return values.astype("<f4").tobytes(), 0.0
    if encoding == "float16":
        with np.errstate(over="ignore"):
            half = values.astype("<f2")
        if not np.isfinite(half).all():
            raise ProtocolError(f"{where}: a value exceeds the float16 range (65504)")
        return half.tobytes(), 0.0
    scale = np.float32(np.abs(values).max(initial=0.0)) / np.float32(127)
    if scale == 0:
        return bytes(values.size), 0.0
    return np.clip(np.rint(values / scale), -127, 127).astype("i1").tobytes(), float(scale)


def _build_tensor(builder: flatbuffers.Builder, index: int, tensor: np.ndarray, encoding: str,
                  topk: float | None) -> int:
    """Write one tensor table (dense or top-k sparse, whichever is smaller) and return it."""
    where = f"tensor {index}"
    values = np.asarray(tensor, dtype=np.float32).ravel()
    if not np.isfinite(values).all():
        raise ProtocolError(f"{where}: non-finite values (NaN or Inf) cannot be sent")
    size = values.size
    itemsize = ENCODINGS[encoding][1].itemsize
    indices = None
    if topk is not None and (k := math.ceil(topk * size)) < size:
        keep = np.sort(np.argpartition(np.abs(values), size - k)[size - k:])
        if k * (4 + itemsize) < size * itemsize:
            indices, values = keep.astype("<u4"), values[keep]
        else:
            sparsified = np.zeros_like(values)
            sparsified[keep] = values[keep]
            values = sparsified
    data, scale = _quantize(values, encoding, where)
    indices_vector = None if indices is None else builder.CreateNumpyVector(indices)
    data_vector = builder.CreateByteVector(data)
    fb.TensorStart(builder)
    fb.TensorAddIndex(builder, index)
    fb.TensorAddEncoding(builder, ENCODINGS[encoding][0])
    fb.TensorAddScale(builder, scale)
    fb.TensorAddNumElements(builder, check_uint(size, f"{where} size", 32))
    if indices_vector is not None:
        fb.TensorAddIndices(builder, indices_vector)
    fb.TensorAddData(builder, data_vector)
    return fb.TensorEnd(builder)


def _build_metric(builder: flatbuffers.Builder, name: str, value: float) -> int:
    """Write one metric table and return it."""
    name_offset = builder.CreateString(_text(name, "metric name"))
    fb.MetricStart(builder)
    fb.MetricAddName(builder, name_offset)
    fb.MetricAddValue(builder, check_real(value, f"metric {name}", -math.inf))
    return fb.MetricEnd(builder)


def _table_vector(builder: flatbuffers.Builder, offsets: list[int]) -> int:
    """Write a vector of already written tables."""
    builder.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        builder.PrependUOffsetTRelative(offset)
    return builder.EndVector()


def encode_update(update: ModelUpdate, encoding: str = "float32", topk: float | None = None) -> bytes:
    """Serialize `update` with one encoding for every tensor, optionally top-k sparsified."""
    check_encoding(encoding)
    topk = optional(topk, check_real, "topk", 0.0, 1.0)
    size = sum(np.asarray(t).size for t in update.tensors) * 4 + 4096
    builder = flatbuffers.Builder(size)
    tensors = [_build_tensor(builder, i, t, encoding, topk) for i, t in enumerate(update.tensors)]
    metrics = [_build_metric(builder, name, value) for name, value in update.metrics.items()]
    strings = [builder.CreateString(s) for s in (
        check_id(update.fleet, "fleet"), check_id(update.device_id, "device_id"),
        _text(update.update_id, "update_id"), check_hash(update.model_hash), check_id(update.run_id, "run_id"))]
    tensors_vector, metrics_vector = _table_vector(builder, tensors), _table_vector(builder, metrics)
    fb.UpdateStart(builder)
    fb.UpdateAddProtocolVersion(builder, PROTOCOL_VERSION)
    fb.UpdateAddFleet(builder, strings[0])
    fb.UpdateAddRound(builder, check_uint(update.round, "round"))
    fb.UpdateAddDeviceId(builder, strings[1])
    fb.UpdateAddUpdateId(builder, strings[2])
    fb.UpdateAddModelHash(builder, strings[3])
    fb.UpdateAddNumExamples(builder, check_uint(update.num_examples, "num_examples"))
    fb.UpdateAddMetrics(builder, metrics_vector)
    fb.UpdateAddTensors(builder, tensors_vector)
    fb.UpdateAddRunId(builder, strings[4])
    builder.Finish(fb.UpdateEnd(builder), file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())


def max_update_bytes(manifest: Manifest) -> int:
    """The default payload bound: every weight sent sparse in float32 (8 bytes each) plus slack."""
    weights = manifest.weights
    return 8 * sum(math.prod(w.shape) for w in weights) + 65536 + 64 * len(weights)


def _decode_metrics(root: _flatbuf.Table, variables: list[str]) -> dict[str, float]:
    """The metrics of an update: each of the manifest's metric variables exactly once."""
    metrics: dict[str, float] = {}
    for table in root.tables(7, len(variables), "metrics"):
        name = table.string(0, MAX_STRING_BYTES, "name")
        value = float(table.scalar(1, _F64, 0.0, "value"))
        if name not in variables:
            raise ProtocolError(f"metric {name!r} is not one of the model's {variables}")
        if name in metrics:
            raise ProtocolError(f"metric {name!r} appears twice")
        if not math.isfinite(value):
            raise ProtocolError(f"metric {name!r} is {value}, not finite")
        metrics[name] = value
    missing = [name for name in variables if name not in metrics]
    if missing:
        raise ProtocolError(f"metrics {missing} are missing")
    return metrics


def _decode_tensor(table: _flatbuf.Table, weight: dict, size: int, where: str) -> np.ndarray:
    """One tensor's dense float32 values, shaped as `weight`, after checking every length."""
    enum = int(table.scalar(1, _U8, 0, "encoding"))
    if enum not in _DTYPE_BY_ENUM:
        raise ProtocolError(f"{where}: unknown encoding {enum}")
    name, dtype = _DTYPE_BY_ENUM[enum]
    num_elements = int(table.scalar(3, _U32, 0, "num_elements"))
    if num_elements != size:
        raise ProtocolError(
            f"{where}: num_elements is {num_elements}, the shape {list(weight.shape)} has {size}")
    scale = float(table.scalar(2, _F32, 0.0, "scale"))
    if name == "int8" and not (math.isfinite(scale) and scale >= 0):
        raise ProtocolError(f"{where}: int8 scale {scale} is not finite and >= 0")
    if name != "int8" and scale != 0:
        raise ProtocolError(f"{where}: scale {scale} set on a {name} tensor (must be 0)")
    sparse = table.vector(4, 4, size, "indices")
    count = size if sparse is None else sparse[1]
    data = table.vector(5, 1, len(table.buf.data), "data")
    if data is None:
        raise ProtocolError(f"{where}: data is missing")
    expected = count * dtype.itemsize
    if data[1] != expected:
        raise ProtocolError(f"{where}: data has {data[1]} bytes, expected {expected} for {count} {name}")
    values = np.frombuffer(table.buf.data, dtype, count, data[0])
    if name == "int8":
        if (values == -128).any():
            raise ProtocolError(f"{where}: int8 value -128 is outside the symmetric range [-127, 127]")
        with np.errstate(over="ignore"):  # a huge scale overflows to inf, refused just below
            values = values.astype(np.float32) * np.float32(scale)
    if not np.isfinite(values).all():
        raise ProtocolError(f"{where}: values are not all finite")
    if sparse is None:
        return values.astype(np.float32).reshape(weight.shape)
    indices = np.frombuffer(table.buf.data, "<u4", count, sparse[0])
    if count and ((indices[1:] <= indices[:-1]).any() or indices[-1] >= size):
        raise ProtocolError(f"{where}: indices are not strictly increasing and below {size}")
    dense = np.zeros(size, np.float32)
    dense[indices] = values
    return dense.reshape(weight.shape)


def _decode_tensors(root: _flatbuf.Table, weights: list[dict], sizes: list[int]) -> list[np.ndarray]:
    """Every weight's delta, each manifest index exactly once."""
    tables = root.tables(8, len(weights), "tensors")
    if len(tables) != len(weights):
        raise ProtocolError(f"update has {len(tables)} tensors, the model has {len(weights)} weights")
    tensors: list[np.ndarray | None] = [None] * len(weights)
    for table in tables:
        index = int(table.scalar(0, _U32, 0, "index"))
        if index >= len(weights):
            raise ProtocolError(f"{table.what}: index {index} is not below {len(weights)} weights")
        where = f"tensor {index} ({weights[index].name})"
        if tensors[index] is not None:
            raise ProtocolError(f"{where} appears twice")
        tensors[index] = _decode_tensor(table, weights[index], sizes[index], where)
    return tensors  # type: ignore[return-value]  # all filled: len(weights) distinct indices


def decode_update(payload: bytes, manifest: Manifest, max_bytes: int | None = None,
                  fleet: str | None = None, device_id: str | None = None) -> ModelUpdate:
    """Check an untrusted update against `manifest` (and fleet/device when given) and decode it."""
    weights = manifest.weights
    sizes = [math.prod(w.shape) for w in weights]
    limit = max_update_bytes(manifest) if max_bytes is None else max_bytes
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > limit:
        raise ProtocolError(f"payload has {len(payload)} bytes, more than the {limit} allowed")
    payload = bytes(payload)
    if payload[4:8] != FILE_IDENTIFIER:
        raise ProtocolError(f"file identifier is {payload[4:8]!r}, expected {FILE_IDENTIFIER!r}")
    try:
        root = _flatbuf.Buffer(payload).root("update")
        version = root.scalar(0, _U16, 0, "protocol_version")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version}, this decoder speaks {PROTOCOL_VERSION}")
        update = ModelUpdate(
            fleet=check_id(root.string(1, MAX_STRING_BYTES, "fleet"), "fleet"),
            round=int(root.scalar(2, _U64, 0, "round")),
            device_id=check_id(root.string(3, MAX_STRING_BYTES, "device_id"), "device_id"),
            update_id=_text(root.string(4, MAX_STRING_BYTES, "update_id"), "update_id"),
            model_hash=check_hash(root.string(5, MAX_STRING_BYTES, "model_hash")),
            num_examples=int(root.scalar(6, _U64, 0, "num_examples")),
            metrics=_decode_metrics(root, list(manifest.metrics.variables)),
            tensors=[],
            run_id=check_id(root.string(9, MAX_STRING_BYTES, "run_id"), "run_id"),
        )
        for expected, got, what, fault in ((manifest.content_hash, update.model_hash, "model_hash", Fault.WRONG_MODEL),
                                           (fleet, update.fleet, "fleet", Fault.WRONG_SENDER),
                                           (device_id, update.device_id, "device_id", Fault.WRONG_SENDER)):
            if expected is not None and got != expected:
                raise ProtocolError(f"{what} is {got!r}, expected {expected!r}", fault)
        update.tensors = _decode_tensors(root, weights, sizes)
    except (struct.error, IndexError, OverflowError) as error:
        raise ProtocolError(f"malformed update: {error}") from None
    return update


# ---------------------------------------------------------------------------- global weights

WEIGHTS_SENDER = "server"


def encode_weights(fleet: str, round: int, model_hash: str, weights: list[np.ndarray], metric_variables: list[str],
                   encoding: str = "float32", *, run_id: str) -> bytes:
    """The global weights of `run_id`'s round, sent as an update from `WEIGHTS_SENDER` (same schema, same checks)."""
    return encode_update(ModelUpdate(fleet=fleet, round=round, device_id=WEIGHTS_SENDER, update_id=f"weights-{round}",
                                     model_hash=model_hash, num_examples=0,
                                     metrics={name: 0.0 for name in metric_variables}, tensors=weights,
                                     run_id=run_id), encoding)


def decode_weights(payload: bytes, manifest: Manifest, fleet: str | None = None) -> ModelUpdate:
    """Check and decode a global-weights payload; `.tensors` are the weights, `.round` their round."""
    return decode_update(payload, manifest, fleet=fleet, device_id=WEIGHTS_SENDER)


def payload_hash(payload: bytes) -> str:
    """'sha256:<hex>' of a payload, as a task names the global weights it expects."""
    return "sha256:" + hashlib.sha256(payload).hexdigest()


# ---------------------------------------------------------------------------- tasks and statuses


def load_json(payload: bytes, limit: int, what: str) -> dict:
    """A JSON object from at most `limit` bytes of UTF-8 (NaN and Infinity refused)."""
    if not isinstance(payload, (bytes, bytearray)):
        raise ProtocolError(f"{what} payload must be bytes, got {type(payload).__name__}")
    if len(payload) > limit:
        raise ProtocolError(f"{what} has {len(payload)} bytes, more than the {limit} allowed")
    try:
        message = json.loads(payload.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ProtocolError(f"{what} is not valid UTF-8 JSON: {error}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(message).__name__}")
    if message.get("protocol_version") != PROTOCOL_VERSION:
        raise ProtocolError(f"{what} protocol_version is {message.get('protocol_version')!r:.40}, "
                            f"this decoder speaks {PROTOCOL_VERSION}")
    return message


def _refuse_constant(name: str) -> None:
    """json.loads hook: NaN, Infinity and -Infinity are not JSON numbers."""
    raise ValueError(f"{name} is not allowed")


def dump_json(message: dict, limit: int, what: str) -> bytes:
    """Compact UTF-8 JSON of `message`, refusing non-finite numbers and oversized results."""
    try:
        payload = json.dumps(message, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"{what} cannot be encoded: {error}") from None
    if len(payload) > limit:
        raise ProtocolError(f"{what} has {len(payload)} bytes, more than the {limit} allowed")
    return payload


# A signed task wraps the exact task bytes; the signature covers this context, the task topic and those bytes.
TASK_SIGNATURE_CONTEXT = b"fedge-task-signature-v1\x00"
MAX_SIGNED_TASK_BYTES = 4 * MAX_TASK_BYTES // 3 + 4096  # a base64 task plus the envelope's fields
SIGNATURE_BYTES = 64  # Ed25519
_SIGNED_TASK_FIELDS = {"protocol_version", "task", "key_id", "signature"}
_KEY_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class SignedTask:
    """A task payload as signed by the server: the exact task JSON bytes, the signing key's id, the signature."""

    task: bytes
    key_id: str
    signature: bytes


def task_signing_input(topic: str, task: bytes) -> bytes:
    """The bytes a task signature covers: the context string, the task topic (so a task binds its fleet) and the task."""
    return TASK_SIGNATURE_CONTEXT + topic.encode("utf-8") + b"\x00" + task


def encode_signed_task(signed: SignedTask) -> bytes:
    """The JSON envelope of a signed task (docs/protocol.md, "Signed tasks")."""
    if not _KEY_ID.fullmatch(signed.key_id) or len(signed.signature) != SIGNATURE_BYTES:
        raise ProtocolError(f"a signed task needs a 16-hex key id and a {SIGNATURE_BYTES}-byte signature")
    return dump_json({"protocol_version": PROTOCOL_VERSION, "task": base64.b64encode(signed.task).decode("ascii"),
                       "key_id": signed.key_id, "signature": base64.b64encode(signed.signature).decode("ascii")},
                      MAX_SIGNED_TASK_BYTES, "signed task")


def decode_signed_task(payload: bytes) -> SignedTask | None:
    """The signed task in a task payload, or None when the payload is a plain task; ProtocolError if malformed."""
    message = load_json(payload, MAX_SIGNED_TASK_BYTES, "task")
    if "signature" not in message:
        return None
    if message.keys() != _SIGNED_TASK_FIELDS:
        raise ProtocolError(f"signed task fields differ: missing {sorted(_SIGNED_TASK_FIELDS - message.keys())}, "
                            f"unknown {sorted(message.keys() - _SIGNED_TASK_FIELDS)[:10]}")
    key_id, encoded = message["key_id"], (message["task"], message["signature"])
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise ProtocolError(f"signed task key_id {key_id!r:.40} is not 16 lowercase hex digits")
    try:
        task, signature = (base64.b64decode(value, validate=True) for value in encoded)
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"signed task: task and signature must be base64 strings ({error})") from None
    if len(signature) != SIGNATURE_BYTES:
        raise ProtocolError(f"signed task: the signature has {len(signature)} bytes, expected {SIGNATURE_BYTES}")
    return SignedTask(task, key_id, signature)


def encode_status(state: str, round: int | None = None, **extra: Any) -> bytes:
    """A device status message (retained on its status topic; 'offline' is the last will)."""
    if state not in STATES:
        raise ProtocolError(f"state {state!r:.40} is not one of {STATES}")
    if "protocol_version" in extra:
        raise ProtocolError("protocol_version is set by the codec, not by the caller")
    message = {"protocol_version": PROTOCOL_VERSION, "state": state,
               "round": optional(round, check_uint, "round"), **extra}
    return dump_json(message, MAX_STATUS_BYTES, "status")


def decode_status(payload: bytes) -> dict:
    """Check and decode a status: a known state, a round or null, and any extra fields."""
    message = load_json(payload, MAX_STATUS_BYTES, "status")
    if message.get("state") not in STATES:
        raise ProtocolError(f"status state {message.get('state')!r:.40} is not one of {STATES}")
    optional(message.get("round"), check_uint, "status round")
    message.setdefault("round", None)
    return message
