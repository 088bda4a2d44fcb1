"""The wire protocol: update round trips per encoding, a decoder that rejects every malformed
payload with ProtocolError (never another exception), tasks, statuses, selection and topics.

No TensorFlow here: the manifest is written by hand, as a device-only venv must run this.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import flatbuffers
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_runtime.protocol import (
    PROTOCOL_VERSION,
    ModelUpdate,
    ProtocolError,
    Task,
    decode_status,
    decode_task,
    decode_update,
    decode_weights,
    encode_status,
    encode_task,
    encode_update,
    encode_weights,
    is_selected,
    max_update_bytes,
    model_topic,
    payload_hash,
    status_topic,
    status_wildcard,
    task_topic,
    topic_device_id,
    update_topic,
    update_wildcard,
    weights_topic,
)
from device_runtime.manifest import Manifest
from device_runtime.protocol.generated import update_generated as fb
from manifests import manifest_for
from tasks import task_of

pytestmark = pytest.mark.device

HASH = "sha256:" + "ab" * 32
VARIABLES = ["loss_sum", "num_examples", "num_batches", "correct"]


def _manifest(*shapes: list[int]) -> Manifest:
    """A manifest for weights of the given shapes (what the codec reads)."""
    return manifest_for(shapes, VARIABLES, HASH)


# The first weight has a multiple of 4 elements: the builder writes the first tensor's data
# last in the buffer, so no alignment padding trails the payload (truncation test below).
SMALL = _manifest([2, 4], [3], [])


def _update(manifest: dict = SMALL, seed: int = 0, scale: float = 1.0) -> ModelUpdate:
    """A valid update with random normal deltas for `manifest`."""
    rng = np.random.default_rng(seed)
    tensors = [(rng.normal(size=w.shape) * scale).astype(np.float32) for w in manifest.weights]
    return ModelUpdate(fleet="fleet-a", round=7, device_id="dev-1", update_id="u-0001",
                       model_hash=HASH, num_examples=42,
                       metrics={"loss_sum": 12.5, "num_examples": 42.0, "num_batches": 2.0, "correct": 30.0},
                       tensors=tensors, run_id="run-1")


def _assert_valid(update: ModelUpdate, manifest: dict = SMALL) -> None:
    """Whatever decode_update returns satisfies every promise it makes."""
    assert update.model_hash == manifest.content_hash
    assert sorted(update.metrics) == sorted(VARIABLES)
    assert all(math.isfinite(v) for v in update.metrics.values())
    assert len(update.tensors) == len(manifest.weights)
    for tensor, weight in zip(update.tensors, manifest.weights):
        assert tensor.dtype == np.float32 and tensor.shape == tuple(weight.shape)
        assert np.isfinite(tensor).all()


def _craft(*, version: int = PROTOCOL_VERSION, identifier: bytes = b"FEUP", fleet: str | bytes = "fleet-a",
           device_id: str | bytes = "dev-1", update_id: str | bytes = "u-1", model_hash: str = HASH,
           metrics: list[tuple[str | bytes, float]] | None = None, tensors: list[dict] | None = None,
           run_id: str | bytes | None = "run-1") -> bytes:
    """A payload built field by field with the generated code, to forge what encode_update refuses."""
    if metrics is None:
        metrics = [(name, 1.0) for name in VARIABLES]
    if tensors is None:
        tensors = [{"index": i, "num_elements": math.prod(w.shape),
                    "data": np.ones(math.prod(w.shape), "<f4").tobytes()}
                   for i, w in enumerate(SMALL.weights)]
    builder = flatbuffers.Builder(1024)
    tensor_offsets = []
    for spec in tensors:
        indices = spec.get("indices")
        indices_vector = None if indices is None else builder.CreateNumpyVector(np.asarray(indices, "<u4"))
        data_vector = builder.CreateByteVector(spec["data"])
        fb.TensorStart(builder)
        fb.TensorAddIndex(builder, spec["index"])
        fb.TensorAddEncoding(builder, spec.get("encoding", fb.Encoding.FLOAT32))
        fb.TensorAddScale(builder, spec.get("scale", 0.0))
        fb.TensorAddNumElements(builder, spec["num_elements"])
        if indices_vector is not None:
            fb.TensorAddIndices(builder, indices_vector)
        fb.TensorAddData(builder, data_vector)
        tensor_offsets.append(fb.TensorEnd(builder))
    metric_offsets = []
    for name, value in metrics:
        name_offset = builder.CreateString(name)
        fb.MetricStart(builder)
        fb.MetricAddName(builder, name_offset)
        fb.MetricAddValue(builder, value)
        metric_offsets.append(fb.MetricEnd(builder))
    strings = [builder.CreateString(s) for s in (fleet, device_id, update_id, model_hash)]
    run_id_offset = None if run_id is None else builder.CreateString(run_id)
    vectors = []
    for offsets in (tensor_offsets, metric_offsets):
        builder.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            builder.PrependUOffsetTRelative(offset)
        vectors.append(builder.EndVector())
    fb.UpdateStart(builder)
    fb.UpdateAddProtocolVersion(builder, version)
    fb.UpdateAddFleet(builder, strings[0])
    fb.UpdateAddRound(builder, 7)
    fb.UpdateAddDeviceId(builder, strings[1])
    fb.UpdateAddUpdateId(builder, strings[2])
    fb.UpdateAddModelHash(builder, strings[3])
    fb.UpdateAddNumExamples(builder, 4)
    fb.UpdateAddMetrics(builder, vectors[1])
    fb.UpdateAddTensors(builder, vectors[0])
    if run_id_offset is not None:
        fb.UpdateAddRunId(builder, run_id_offset)
    builder.Finish(fb.UpdateEnd(builder), file_identifier=identifier)
    return bytes(builder.Output())


def _dense(index: int, values: np.ndarray | list[float], dtype: str = "<f4", **extra) -> dict:
    """A forged dense tensor spec for _craft."""
    data = np.asarray(values, dtype).tobytes()
    return {"index": index, "num_elements": len(values), "data": data, **extra}


def _tensors_with(index: int, spec: dict) -> list[dict]:
    """SMALL's all-ones tensors with the one at `index` replaced by `spec`."""
    specs = [_dense(i, np.ones(math.prod(w.shape))) for i, w in enumerate(SMALL.weights)]
    specs[index] = spec
    return specs


# ---------------------------------------------------------------------------- round trips


def test_float32_round_trip_is_exact() -> None:
    update = _update()
    decoded = decode_update(encode_update(update), SMALL, fleet="fleet-a", device_id="dev-1")
    _assert_valid(decoded)
    for got, want in zip(decoded.tensors, update.tensors):
        np.testing.assert_array_equal(got, want)
    assert (decoded.fleet, decoded.round, decoded.device_id, decoded.update_id, decoded.num_examples) == (
        "fleet-a", 7, "dev-1", "u-0001", 42)
    assert decoded.metrics == update.metrics


def test_generated_reader_agrees_with_the_codec() -> None:
    """The schema's generated classes read what encode_update writes (field slots agree)."""
    update = _update()
    root = fb.Update.GetRootAs(encode_update(update, "int8"))
    assert (root.ProtocolVersion(), root.Fleet(), root.Round(), root.DeviceId(), root.UpdateId()) == (
        PROTOCOL_VERSION, b"fleet-a", 7, b"dev-1", b"u-0001")
    assert root.ModelHash() == HASH.encode() and root.NumExamples() == 42
    assert {root.Metrics(i).Name().decode(): root.Metrics(i).Value() for i in range(root.MetricsLength())} == (
        update.metrics)
    kernel = root.Tensors(0)
    assert (kernel.Index(), kernel.Encoding(), kernel.NumElements(), kernel.IndicesIsNone()) == (
        0, fb.Encoding.INT8, 8, True)
    scale = np.float32(np.abs(update.tensors[0]).max()) / np.float32(127)
    assert kernel.Scale() == pytest.approx(float(scale))
    assert kernel.DataLength() == 8


def test_float16_round_trip_is_float16_rounding() -> None:
    update = _update(_manifest([50, 20], [20]))
    decoded = decode_update(encode_update(update, "float16"), _manifest([50, 20], [20]))
    for got, want in zip(decoded.tensors, update.tensors):
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))


def test_int8_error_is_at_most_half_a_step() -> None:
    manifest = _manifest([50, 20], [20], [])
    update = _update(manifest, scale=0.01)
    decoded = decode_update(encode_update(update, "int8"), manifest)
    for got, want in zip(decoded.tensors, update.tensors):
        step = np.abs(want).max() / 127
        assert np.abs(got - want).max() <= step / 2 * (1 + 1e-5)


def test_int8_zero_tensor_decodes_to_zeros() -> None:
    update = _update()
    update.tensors[1] = np.zeros(3, np.float32)
    decoded = decode_update(encode_update(update, "int8"), SMALL)
    np.testing.assert_array_equal(decoded.tensors[1], np.zeros(3, np.float32))


@pytest.mark.parametrize("encoding", ["float32", "float16", "int8"])
def test_topk_keeps_the_k_largest_entries(encoding: str) -> None:
    manifest = _manifest([40, 25], [7])
    update = _update(manifest)
    payload = encode_update(update, encoding, topk=0.1)
    decoded = decode_update(payload, manifest)
    root = fb.Update.GetRootAs(payload)
    for i, (got, want) in enumerate(zip(decoded.tensors, update.tensors)):
        flat, dense = want.ravel(), got.ravel()
        k = math.ceil(0.1 * flat.size)
        kept = np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])
        assert np.count_nonzero(dense) == k
        np.testing.assert_array_equal(np.flatnonzero(dense), kept)
        if encoding == "float32":
            np.testing.assert_array_equal(dense[kept], flat[kept])
        elif encoding == "float16":
            np.testing.assert_array_equal(dense[kept], flat[kept].astype(np.float16).astype(np.float32))
        else:
            assert np.abs(dense[kept] - flat[kept]).max() <= np.abs(flat).max() / 127 / 2 * (1 + 1e-5)
        sparse = root.Tensors(i)
        # sparse whenever indices + values are smaller than the dense values
        itemsize = {"float32": 4, "float16": 2, "int8": 1}[encoding]
        assert sparse.IndicesIsNone() == (k * (4 + itemsize) >= flat.size * itemsize)
        if not sparse.IndicesIsNone():
            assert sparse.IndicesLength() == k


def test_topk_sends_dense_when_sparse_is_larger() -> None:
    update = _update()
    payload = encode_update(update, "float32", topk=0.6)
    assert fb.Update.GetRootAs(payload).Tensors(0).IndicesIsNone()
    kernel = decode_update(payload, SMALL).tensors[0].ravel()
    assert np.count_nonzero(kernel) == math.ceil(0.6 * 8)
    assert decode_update(encode_update(update, topk=1.0), SMALL).tensors[0].tolist() == (
        update.tensors[0].tolist())


def test_payload_sizes_relative_to_float32() -> None:
    manifest = _manifest([316, 316], [316])  # 100,172 parameters
    update = _update(manifest)
    sizes = {encoding: len(encode_update(update, encoding)) for encoding in ("float32", "float16", "int8")}
    assert sizes["float32"] > 4 * 100_172
    assert sizes["int8"] < 0.27 * sizes["float32"]
    assert 0.49 < sizes["float16"] / sizes["float32"] < 0.51
    assert len(encode_update(update, "int8", topk=0.01)) < 0.03 * sizes["float32"]


# ---------------------------------------------------------------------------- encoder refusals


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encode_refuses_non_finite_values(bad: float) -> None:
    update = _update()
    update.tensors[0][1, 1] = bad
    with pytest.raises(ProtocolError, match="tensor 0: non-finite"):
        encode_update(update)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("fleet", "a/b", "fleet"), ("device_id", "", "device_id"), ("update_id", "x" * 300, "update_id"),
    ("model_hash", "sha256:abc", "model_hash"), ("round", -1, "round"), ("num_examples", 1.5, "num_examples"),
    ("metrics", {"loss_sum": float("nan")}, "metric loss_sum"),
])
def test_encode_refuses_bad_fields(field: str, value: object, message: str) -> None:
    update = _update()
    setattr(update, field, value)
    with pytest.raises(ProtocolError, match=message):
        encode_update(update)


def test_encode_refuses_bad_options_and_float16_overflow() -> None:
    with pytest.raises(ProtocolError, match="encoding"):
        encode_update(_update(), "int4")
    with pytest.raises(ProtocolError, match="topk"):
        encode_update(_update(), topk=0.0)
    with pytest.raises(ProtocolError, match="float16 range"):
        encode_update(_update(scale=1e6), "float16")


# ---------------------------------------------------------------------------- decoder refusals


def _rejects(payload: bytes, message: str, manifest: dict = SMALL, **kwargs) -> None:
    """decode_update raises ProtocolError whose message matches `message`."""
    with pytest.raises(ProtocolError, match=message):
        decode_update(payload, manifest, **kwargs)


def test_forged_valid_payload_decodes() -> None:
    """The forging helper itself makes acceptable payloads; each test below breaks one thing."""
    _assert_valid(decode_update(_craft(), SMALL))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"identifier": b"TFL3"}, r"file identifier is b'TFL3', expected b'FEUP'"),
    ({"version": 2}, "protocol version 2, this decoder speaks 3"),  # a v2 device's update (no run id)
    ({"run_id": None}, r"update\.run_id is missing"),
    ({"run_id": "job/1"}, "run_id 'job/1' has a non-printable character or one of"),
    ({"version": 0}, "protocol version 0"),
    ({"model_hash": "sha256:" + "cd" * 32}, "model_hash is 'sha256:cdcd.*expected 'sha256:abab"),
    ({"model_hash": "md5:00"}, "not 'sha256:'"),
    ({"fleet": "a/b"}, "fleet"),
    ({"device_id": b"\xff\xfe"}, "device_id is not valid UTF-8"),
    ({"update_id": "u" * 300}, r"update\.update_id has 300 items, at most 256"),
    ({"update_id": "tab\there"}, "update_id must be a non-empty printable string"),
    ({"metrics": [(n, 1.0) for n in VARIABLES[:3]]}, r"metrics \['correct'\] are missing"),
    ({"metrics": [(n, 1.0) for n in VARIABLES] + [("loss_sum", 1.0)]}, "metrics has 5 items, at most 4"),
    ({"metrics": [(n, 1.0) for n in VARIABLES[:3]] + [("loss_sum", 1.0)]}, "metric 'loss_sum' appears twice"),
    ({"metrics": [(n, 1.0) for n in VARIABLES[:3]] + [("secret", 1.0)]}, "metric 'secret' is not one of"),
    ({"metrics": [(n, 1.0) for n in VARIABLES[:3]] + [("correct", float("nan"))]}, "metric 'correct' is nan"),
    ({"metrics": [(n, 1.0) for n in VARIABLES[:3]] + [("correct", float("inf"))]}, "metric 'correct' is inf"),
])
def test_header_refusals(kwargs: dict, message: str) -> None:
    _rejects(_craft(**kwargs), message)


def test_fleet_and_device_must_match_when_given() -> None:
    payload = _craft()
    _rejects(payload, "fleet is 'fleet-a', expected 'fleet-b'", fleet="fleet-b")
    _rejects(payload, "device_id is 'dev-1', expected 'dev-2'", device_id="dev-2")


@pytest.mark.parametrize(("tensors", "message"), [
    (_tensors_with(0, _dense(0, np.ones(5))), r"tensor 0 \(layer_0/w\): num_elements is 5, the shape \[2, 4\] has 8"),
    (_tensors_with(1, {"index": 1, "num_elements": 3, "data": bytes(8)}),
     r"tensor 1 \(layer_1/w\): data has 8 bytes, expected 12 for 3 float32"),
    (_tensors_with(1, {"index": 1, "num_elements": 3, "data": bytes(4), "encoding": fb.Encoding.FLOAT16}),
     r"tensor 1 \(layer_1/w\): data has 4 bytes, expected 6 for 3 float16"),
    (_tensors_with(1, {"index": 1, "num_elements": 3, "data": bytes(12), "indices": [0, 2]}),
     r"data has 12 bytes, expected 8 for 2 float32"),
    (_tensors_with(1, _dense(0, np.ones(8))), r"tensor 0 \(layer_0/w\) appears twice"),
    (_tensors_with(1, _dense(3, np.ones(3))), r"tensors\[1\]: index 3 is not below 3 weights"),
    (_tensors_with(0, _dense(0, np.ones(8)))[:2], "update has 2 tensors, the model has 3 weights"),
    (_tensors_with(0, _dense(0, np.ones(8))) * 2, "tensors has 6 items, at most 3"),
    (_tensors_with(1, _dense(1, [1, np.nan, 1])), r"tensor 1 \(layer_1/w\): values are not all finite"),
    (_tensors_with(1, _dense(1, [1, np.inf, 1], "<f2", encoding=fb.Encoding.FLOAT16)), "not all finite"),
    (_tensors_with(1, _dense(1, [1, 2, 3], "i1", encoding=fb.Encoding.INT8, scale=float("nan"))),
     "int8 scale nan is not finite"),
    (_tensors_with(1, _dense(1, [1, 2, 3], "i1", encoding=fb.Encoding.INT8, scale=-1.0)), "int8 scale -1.0"),
    (_tensors_with(1, _dense(1, [1, -128, 3], "i1", encoding=fb.Encoding.INT8, scale=1.0)), "-128"),
    (_tensors_with(1, _dense(1, [1, 2, 3], "i1", encoding=fb.Encoding.INT8, scale=3e38)), "not all finite"),
    (_tensors_with(1, _dense(1, [1, 2, 3], scale=0.5)), "scale 0.5 set on a float32 tensor"),
    (_tensors_with(1, _dense(1, [1, 2, 3], encoding=7)), r"tensor 1 \(layer_1/w\): unknown encoding 7"),
    (_tensors_with(0, {"index": 0, "num_elements": 8, "data": bytes(8), "indices": [3, 1]}),
     "indices are not strictly increasing and below 8"),
    (_tensors_with(0, {"index": 0, "num_elements": 8, "data": bytes(8), "indices": [1, 1]}), "strictly increasing"),
    (_tensors_with(0, {"index": 0, "num_elements": 8, "data": bytes(8), "indices": [1, 8]}), "below 8"),
    (_tensors_with(0, {"index": 0, "num_elements": 8, "data": bytes(36), "indices": list(range(9))}),
     r"indices has 9 items, at most 8"),
])
def test_tensor_refusals(tensors: list[dict], message: str) -> None:
    _rejects(_craft(tensors=tensors), message)


def test_sparse_forged_tensor_decodes_to_dense() -> None:
    spec = {"index": 0, "num_elements": 8, "data": np.array([5, -7], "<f4").tobytes(), "indices": [2, 6]}
    kernel = decode_update(_craft(tensors=_tensors_with(0, spec)), SMALL).tensors[0]
    np.testing.assert_array_equal(kernel.ravel(), [0, 0, 5, 0, 0, 0, -7, 0])


def test_oversized_payloads_are_refused_before_parsing() -> None:
    payload = encode_update(_update())
    _rejects(payload, f"payload has {len(payload)} bytes, more than the {len(payload) - 1} allowed",
             max_bytes=len(payload) - 1)
    padded = payload + bytes(max_update_bytes(SMALL))  # trailing bytes: still a parseable flatbuffer
    _rejects(padded, f"more than the {max_update_bytes(SMALL)} allowed")
    _rejects(b"x" * 100, "more than", manifest=SMALL, max_bytes=10)


def test_non_bytes_payload_is_refused() -> None:
    _rejects("not bytes", "payload must be bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("encoding", ["float32", "float16", "int8"])
def test_every_truncation_is_refused(encoding: str) -> None:
    payload = encode_update(_update(), encoding)
    for length in range(len(payload)):
        with pytest.raises(ProtocolError):
            decode_update(payload[:length], SMALL)


@pytest.mark.parametrize(("encoding", "topk"), [("float32", None), ("int8", None), ("float16", 0.1)])
def test_every_byte_flip_decodes_validly_or_is_refused(encoding: str, topk: float | None) -> None:
    payload = encode_update(_update(), encoding, topk)
    assert fb.Update.GetRootAs(payload).Tensors(0).IndicesIsNone() == (topk is None)
    refused = 0
    for position in range(len(payload)):
        for mask in (0x01, 0x80, 0xFF):
            corrupt = bytearray(payload)
            corrupt[position] ^= mask
            try:
                _assert_valid(decode_update(bytes(corrupt), SMALL))
            except ProtocolError:
                refused += 1
    assert refused > len(payload)  # most flips hit offsets, lengths, ids or the header


def _mutations() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, bytes behind a valid header, and valid payloads with a spliced-in run."""
    valid = encode_update(_update(), "int8", topk=0.1)  # tensor 0 sparse, the others dense
    header = st.binary(max_size=600).map(lambda b: b[:4] + b"FEUP" + b[8:])
    splice = st.tuples(st.integers(0, len(valid)), st.integers(0, 16), st.binary(min_size=1, max_size=16)).map(
        lambda t: valid[:t[0]] + t[2] + valid[t[0] + t[1]:])
    return st.one_of(st.binary(max_size=600), header, splice)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutations())
def test_arbitrary_bytes_only_raise_protocol_error(payload: bytes) -> None:
    try:
        _assert_valid(decode_update(payload, SMALL))
    except ProtocolError:
        pass


# ---------------------------------------------------------------------------- tasks


def _task(**changes) -> Task:
    """A valid task with `changes` applied."""
    fields = dict(round=3, run_id="0123456789abcdef", model_hash=HASH, learning_rate=0.05, epochs=2, max_steps=None, max_seconds=30.0,
                  deadline=1_900_000_000.5, selected=None, fraction=0.5, encoding="int8", topk=0.1, seed=11)
    fields.update(changes)
    return task_of(**fields)


def test_task_round_trip() -> None:
    for task in (_task(), _task(selected=["a", "b"], fraction=None, learning_rate=None, topk=None,
                                max_seconds=None, max_steps=100), _task(proximal_mu=0.0), _task(proximal_mu=0.25)):
        payload = encode_task(task)
        assert json.loads(payload)["protocol_version"] == PROTOCOL_VERSION
        assert decode_task(payload) == task


def _task_json(**changes) -> bytes:
    """A task's JSON bytes with fields changed (None deletes a field) without encode's checks."""
    message = json.loads(encode_task(_task()))
    for key, value in changes.items():
        if value is None:
            del message[key]
        else:
            message[key] = value
    return json.dumps(message).encode()


@pytest.mark.parametrize(("payload", "message"), [
    (b"\xff{", "not valid UTF-8 JSON"),
    (b"{", "not valid UTF-8 JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"{}", "protocol_version is None"),
    (b" " * (1 << 20) + b"{}", "more than the 1048576 allowed"),
    (_task_json(protocol_version=2), "protocol_version is 2, this decoder speaks 3"),  # a v2 server's task
    (_task_json(epochs=None), r"missing \['epochs'\]"),
    (_task_json(priority=1), r"unknown \['priority'\]"),
    (_task_json(epochs="1"), "epochs must be an integer"),
    (_task_json(epochs=0), r"epochs is 0, outside \[1, "),
    (_task_json(epochs=True), "epochs must be an integer"),
    (_task_json(round=-1), "round is -1"),
    (_task_json(seed=2**64), "seed is"),
    (_task_json(round=1.0), "round must be an integer"),
    (_task_json(learning_rate=0), r"learning_rate is 0, outside \(0.0, inf\]"),
    (_task_json(fraction=1.5), "fraction is 1.5"),
    (_task_json(topk=0), "topk is 0"),
    (_task_json(deadline="soon"), "deadline must be a finite number"),
    (_task_json(encoding="int4"), "encoding 'int4' is not one of"),
    (_task_json(model_hash="sha256:XYZ"), "model_hash"),
    (_task_json(selected="dev-1"), "selected must be a list"),
    (_task_json(selected=["ok", "a/b"]), "selected device id 'a/b'"),
    (_task_json(max_seconds=-5), "max_seconds is -5"),
    (b'{"protocol_version": 3, "deadline": NaN}', "NaN is not allowed"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid UTF-8 JSON"),
])
def test_decode_task_refuses_malformed(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_task(payload)


def test_encode_task_refuses_invalid_tasks() -> None:
    """Client work is checked when it is made (ClientWork), the rest when the task is encoded; ProtocolError both."""
    for bad in ({"epochs": 0}, {"fraction": 2.0}, {"deadline": float("inf")}, {"protocol_version": 1},
                {"selected": ["x+y"]}, {"run_id": ""}, {"run_id": "job/1"}, {"proximal_mu": -0.1},
                {"proximal_mu": float("nan")}, {"encoding": "int4"}, {"seed": None}):
        with pytest.raises(ProtocolError):
            encode_task(_task(**bad))


def test_is_selected_by_list_fraction_or_everyone() -> None:
    assert is_selected(_task(selected=["a", "b"], fraction=None), "a")
    assert not is_selected(_task(selected=["a", "b"], fraction=None), "c")
    assert is_selected(_task(selected=None, fraction=None), "anyone")
    ids = [f"device-{i}" for i in range(2000)]
    chosen = [d for d in ids if is_selected(_task(fraction=0.3), d)]
    assert chosen == [d for d in ids if is_selected(_task(fraction=0.3), d)]  # deterministic
    assert 0.26 < len(chosen) / len(ids) < 0.34
    reseeded = {d for d in ids if is_selected(_task(fraction=0.3, seed=12), d)}
    assert reseeded != set(chosen)
    assert all(is_selected(_task(fraction=1.0), d) for d in ids)


def test_is_selected_draw_is_the_documented_sha256_number() -> None:
    """u = first 8 bytes of sha256("<seed>:<round>:<device_id>"), big-endian, / 2**64 (docs/protocol.md)."""
    digest = hashlib.sha256(b"11:3:dev-1").digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    assert not is_selected(_task(fraction=u), "dev-1")
    assert is_selected(_task(fraction=math.nextafter(u, 1.0)), "dev-1")


# ---------------------------------------------------------------------------- statuses


def test_status_round_trip() -> None:
    assert decode_status(encode_status("online")) == {"protocol_version": PROTOCOL_VERSION, "state": "online", "round": None}
    status = decode_status(encode_status("training", 4, model_hash=HASH, backend="ai-edge-litert"))
    assert status == {"protocol_version": PROTOCOL_VERSION, "state": "training", "round": 4, "model_hash": HASH,
                      "backend": "ai-edge-litert"}


@pytest.mark.parametrize(("payload", "message"), [
    (b'{"protocol_version": 3, "state": "sleeping"}', "state 'sleeping' is not one of"),
    (b'{"protocol_version": 3, "state": "online", "round": -2}', "status round is -2"),
    (b'{"state": "online"}', "protocol_version is None"),
    (b"offline", "not valid UTF-8 JSON"),
    (b'{"protocol_version": 3, "state": "online", "pad": "' + b"x" * 70000 + b'"}', "more than the 65536"),
])
def test_decode_status_refuses_malformed(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        decode_status(payload)


def test_encode_status_refuses_bad_input() -> None:
    for call in (lambda: encode_status("busy"), lambda: encode_status("online", -1),
                 lambda: encode_status("online", protocol_version=1), lambda: encode_status("online", x=object()),
                 lambda: encode_status("online", x=float("nan"))):
        with pytest.raises(ProtocolError):
            call()


# ---------------------------------------------------------------------------- topics


def test_topics() -> None:
    assert task_topic("f") == "fedge/f/task"
    assert model_topic("f", HASH) == model_topic("f", "ab" * 32) == "fedge/f/model/" + "ab" * 32
    assert status_topic("f", "d") == "fedge/f/status/d"
    assert update_topic("f", "d") == "fedge/f/update/d"
    assert update_wildcard("f") == "fedge/f/update/+" and status_wildcard("f") == "fedge/f/status/+"
    assert topic_device_id("fedge/f/update/d-9", "f") == "d-9" == topic_device_id("fedge/f/status/d-9", "f")


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x" * 65, "line\nbreak", "nul\0", 7, None])
def test_topics_refuse_bad_ids(bad: object) -> None:
    with pytest.raises(ProtocolError):
        task_topic(bad)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError):
        update_topic("fleet", bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: model_topic("f", "sha256:" + "AB" * 32), "lowercase hex"),
    (lambda: model_topic("f", "ab" * 31), "lowercase hex"),
    (lambda: topic_device_id("fedge/f/task", "f"), "not a status or update topic"),
    (lambda: topic_device_id("fedge/g/update/d", "f"), "not a status or update topic"),
    (lambda: topic_device_id("fedge/f/update/d/extra", "f"), "not a status or update topic"),
])
def test_topic_refusals(call, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        call()


def test_protocol_imports_no_tensorflow() -> None:
    """Both ends import the protocol; a device has only numpy and flatbuffers."""
    code = ("import sys, device_runtime.protocol; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'fedge', 'converters'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_global_weights_round_trip_and_are_named_by_their_hash() -> None:
    weights = _update(seed=4).tensors
    payload = encode_weights("fleet-a", 9, HASH, weights, VARIABLES, run_id="run-1")
    decoded = decode_weights(payload, SMALL, fleet="fleet-a")
    assert decoded.round == 9 and decoded.num_examples == 0
    for got, want in zip(decoded.tensors, weights, strict=True):
        np.testing.assert_array_equal(got, want)
    assert payload_hash(payload) == "sha256:" + hashlib.sha256(payload).hexdigest()
    assert weights_topic("fleet-a") == "fedge/fleet-a/weights"
    with pytest.raises(ProtocolError, match="device_id"):  # a device's update is not global weights
        decode_weights(encode_update(_update()), SMALL)


def test_task_names_its_global_weights_by_hash() -> None:
    assert decode_task(encode_task(_task(weights_hash=HASH))).weights_hash == HASH
    with pytest.raises(ProtocolError, match="weights_hash"):
        decode_task(_task_json(weights_hash="sha256:xyz"))
