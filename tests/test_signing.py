"""Signed tasks (Ed25519): the device verifies before it runs anything; tampered tasks and models are refused.

The checks are `device_runtime.rounds.task_to_train` with a `TaskVerifier`, the one rule the agent
and the simulated devices share; the agent tests run it against a real mosquitto.
"""

from __future__ import annotations

import base64
import json
import logging
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_runtime.artifact import read_manifest
from device_runtime.protocol import Task, decode_update, encode_task, encode_weights, payload_hash
from device_runtime.protocol.topics import model_topic, task_topic, weights_topic
from device_runtime.rounds import task_to_train
from device_runtime.signing import TaskVerifier, key_id, load_public_key, load_signing_key, sign_task, write_signing_key
from tasks import task_of
from test_device_agent import (Server, local_data, make_agent, model_bytes,  # noqa: F401 (fixtures)
                               model_hash, reference_delta, server, wait_until)

pytestmark = pytest.mark.device

SERVER_KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
FLEET = "kitchen"
TOPIC = task_topic(FLEET)


def make_task(model_hash: str = "sha256:" + "ab" * 32, round_id: int = 3, **fields) -> Task:
    """A valid task (every device, deadline in 60 s) unless `fields` change it."""
    values = dict(round=round_id, run_id="job-1", model_hash=model_hash, learning_rate=0.05, epochs=1, max_steps=None, max_seconds=None,
                  deadline=time.time() + 60, selected=None, fraction=None, encoding="float32", topk=None,
                  seed=1000 + round_id)
    values.update(fields)
    return task_of(**values)


def envelope(payload: bytes) -> dict:
    """The JSON fields of a signed task payload."""
    return json.loads(payload)


def with_fields(payload: bytes, **fields) -> bytes:
    """A signed task payload with some envelope fields replaced (bytes are base64-encoded)."""
    message = envelope(payload)
    message.update({k: base64.b64encode(v).decode() if isinstance(v, bytes) else v for k, v in fields.items()})
    return json.dumps(message).encode()


def flip_byte(data: bytes, index: int) -> bytes:
    """`data` with one bit of byte `index` flipped."""
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


# ------------------------------------------------------------------------------- the verification rule


def test_a_signed_task_opens_to_the_exact_bytes_the_server_signed():
    task = make_task()
    payload = sign_task(SERVER_KEY, TOPIC, encode_task(task))
    assert base64.b64decode(envelope(payload)["task"]) == encode_task(task)
    assert envelope(payload)["key_id"] == key_id(SERVER_KEY.public_key())
    opened, reason = task_to_train(payload, "dev-1", set(), time.time(), TaskVerifier(TOPIC, SERVER_KEY.public_key()))
    assert reason is None and opened == task


def _tampered(kind: str) -> bytes:
    """A task payload altered the way `kind` says, starting from a task the server signed for TOPIC."""
    task_bytes = encode_task(make_task())
    signed = sign_task(SERVER_KEY, TOPIC, task_bytes)
    if kind == "changed byte":  # a digit of the deadline: still a valid task, no longer the signed one
        index = task_bytes.index(b'"deadline":') + len(b'"deadline":') + 2
        return with_fields(signed, task=flip_byte(task_bytes, index))
    if kind == "changed round":
        return with_fields(signed, task=encode_task(make_task(round_id=4)))
    if kind == "changed signature":
        return with_fields(signed, signature=flip_byte(base64.b64decode(envelope(signed)["signature"]), 10))
    if kind == "re-signed with another key":
        return sign_task(OTHER_KEY, TOPIC, encode_task(make_task(round_id=4)))
    if kind == "re-signed with another key, claiming the server's key id":
        forged = sign_task(OTHER_KEY, TOPIC, encode_task(make_task(round_id=4)))
        return with_fields(forged, key_id=key_id(SERVER_KEY.public_key()))
    if kind == "signed for another fleet":
        return sign_task(SERVER_KEY, task_topic("garage"), task_bytes)
    if kind == "unsigned":
        return task_bytes
    raise ValueError(kind)


@pytest.mark.parametrize("kind, why", [
    ("changed byte", "does not verify"),
    ("changed round", "does not verify"),
    ("changed signature", "does not verify"),
    ("re-signed with another key", f"signed by key {key_id(OTHER_KEY.public_key())}"),
    ("re-signed with another key, claiming the server's key id", "does not verify"),
    ("signed for another fleet", "does not verify"),
    ("unsigned", "the task is unsigned"),
])
def test_a_tampered_or_unsigned_task_is_refused_with_a_warning_naming_the_topic(kind, why, caplog):
    caplog.set_level(logging.WARNING, logger="device_runtime")
    payload = _tampered(kind)
    task, reason = task_to_train(payload, "dev-1", set(), time.time(), TaskVerifier(TOPIC, SERVER_KEY.public_key()))
    assert task is None and reason.startswith("refused task:") and why in reason
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"dev-1: refusing the task on {TOPIC}: {reason.removeprefix('refused task: ')}"]


@pytest.mark.parametrize("change, message", [
    ({"signature": "not base64!"}, "base64"),
    ({"signature": base64.b64encode(b"short").decode()}, "the signature has 5 bytes"),
    ({"key_id": "XYZ"}, "key_id"),
    ({"extra": 1}, "unknown ['extra']"),
])
def test_a_malformed_envelope_is_a_malformed_task(change, message):
    payload = with_fields(sign_task(SERVER_KEY, TOPIC, encode_task(make_task())), **change)
    for public_key in (SERVER_KEY.public_key(), None):
        task, reason = task_to_train(payload, "dev-1", set(), time.time(), TaskVerifier(TOPIC, public_key))
        assert task is None and reason.startswith("malformed task:") and message in reason


def test_without_a_server_key_plain_and_signed_tasks_are_accepted_unchecked():
    """Unsigned operation (no key configured): a fleet can start signing before its devices hold the key."""
    task = make_task()
    verifier = TaskVerifier(TOPIC)
    for payload in (encode_task(task), sign_task(OTHER_KEY, TOPIC, encode_task(task))):
        assert task_to_train(payload, "dev-1", set(), time.time(), verifier) == (task, None)


def test_key_files_round_trip_and_are_never_overwritten(tmp_path):
    private, public = tmp_path / "server.pem", tmp_path / "server.pub.pem"
    kid = write_signing_key(private, public)
    assert private.stat().st_mode & 0o777 == 0o600
    key, public_key = load_signing_key(private), load_public_key(public)
    assert key_id(public_key) == key_id(key.public_key()) == kid
    task_bytes = encode_task(make_task())
    assert TaskVerifier(TOPIC, public_key).open(sign_task(key, TOPIC, task_bytes)) == task_bytes
    with pytest.raises(FileExistsError):
        write_signing_key(private, tmp_path / "other.pub.pem")
    assert key_id(load_signing_key(private).public_key()) == kid  # the first key is still there


def test_key_loaders_name_the_file_and_refuse_other_key_types(tmp_path):
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_private = tmp_path / "ec.pem"
    ec_private.write_bytes(ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    ec_public = tmp_path / "ec.pub.pem"
    ec_public.write_bytes(ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ValueError, match="ec.pem' is a .*not an Ed25519 key"):
        load_signing_key(ec_private)
    with pytest.raises(ValueError, match="ec.pub.pem' is a .*not an Ed25519 key"):
        load_public_key(ec_public)
    with pytest.raises(ValueError, match="missing.pem"):
        load_public_key(tmp_path / "missing.pem")


# -------------------------------------------------------------------------- the agent over a real broker


def publish_signed_task(server: Server, key: Ed25519PrivateKey, task: Task) -> None:
    """Retain `task` on the fleet's task topic, signed with `key`."""
    topic = task_topic(server.fleet)
    server.publish(topic, sign_task(key, topic, encode_task(task)))


def test_agent_trains_a_signed_round_and_refuses_unsigned_and_tampered_tasks(server, make_agent, model_bytes,
                                                                             model_hash, local_data, caplog):
    caplog.set_level(logging.INFO, logger="device_runtime")
    agent = make_agent("dev-s", server_public_key=SERVER_KEY.public_key())
    server.publish_model(model_bytes)
    topic = task_topic(server.fleet)
    refusals = lambda: [r.getMessage() for r in caplog.records  # noqa: E731
                        if r.levelno == logging.WARNING and f"refusing the task on {topic}" in r.getMessage()]

    server.publish_task(model_hash, 1)  # unsigned
    wait_until(lambda: len(refusals()) == 1, "the unsigned task to be refused")
    publish_signed_task(server, OTHER_KEY, make_task(model_hash, 1))
    wait_until(lambda: len(refusals()) == 2, "the task signed by another key to be refused")
    tampered = sign_task(SERVER_KEY, topic, encode_task(make_task(model_hash, 1)))
    server.publish(topic, with_fields(tampered, task=encode_task(make_task(model_hash, 1, epochs=5))))
    wait_until(lambda: len(refusals()) == 3, "the tampered task to be refused")
    assert "the task is unsigned" in refusals()[0] and "signed by key" in refusals()[1]
    assert "does not verify" in refusals()[2]
    assert agent.rounds_trained == [] and agent.stats["models_downloaded"] == 0 and server.updates.empty()

    task = make_task(model_hash, 2)
    publish_signed_task(server, SERVER_KEY, task)
    device, payload = server.next_update()
    update = decode_update(payload, read_manifest(model_bytes), device_id="dev-s")
    expected, num_examples = reference_delta(model_bytes, local_data, task, "dev-s")
    assert (device, update.round, update.num_examples) == ("dev-s", 2, num_examples)
    for got, want in zip(update.tensors, expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert agent.stats["tasks_ignored"] == 3 and agent.rounds_trained == [2]


def test_agent_refuses_a_tampered_model_and_tampered_weights_named_by_a_signed_task(server, make_agent, model_bytes,
                                                                                    model_hash, caplog):
    """The signed task binds the model (content hash) and the global weights (payload hash)."""
    caplog.set_level(logging.INFO, logger="device_runtime")
    agent = make_agent("dev-m", server_public_key=SERVER_KEY.public_key(), model_fetch_timeout=3.0)
    tampered = flip_byte(model_bytes, len(model_bytes) // 2)
    server.publish(model_topic(server.fleet, model_hash), tampered)  # on the topic of the real hash
    publish_signed_task(server, SERVER_KEY, make_task(model_hash, 1))
    wait_until(lambda: agent.stats["rounds_failed"] == 1, "the tampered model to be refused")
    lines = [r.getMessage() for r in caplog.records if "refusing the model" in r.getMessage()]
    assert len(lines) == 1 and f"on {model_topic(server.fleet, model_hash)}" in lines[0]
    assert "content hash" in lines[0] and agent.cache.hashes() == [] and agent.rounds_trained == []

    manifest = read_manifest(model_bytes)
    weights = [np.full(w.shape, 0.5, np.float32) for w in manifest.weights]
    genuine = encode_weights(server.fleet, 2, model_hash, weights, manifest.metrics.variables, run_id="job-1")
    weights[0] = weights[0] + 1.0
    server.publish_model(model_bytes)
    server.publish(weights_topic(server.fleet),
                   encode_weights(server.fleet, 2, model_hash, weights, manifest.metrics.variables, run_id="job-1"))
    publish_signed_task(server, SERVER_KEY, make_task(model_hash, 2, weights_hash=payload_hash(genuine)))
    wait_until(lambda: agent.stats["rounds_failed"] == 2, "the round with tampered weights to fail")
    assert any(f"did not arrive on {weights_topic(server.fleet)}" in r.getMessage() for r in caplog.records)
    assert agent.stats["rounds_trained"] == 0 and server.updates.empty()


def test_device_cli_refuses_a_bad_public_key_file(tmp_path, local_data, capsys):
    from device_runtime.cli import main as cli_main

    data_path = tmp_path / "local.npz"
    np.savez(data_path, x=local_data[0], y=local_data[1])
    (tmp_path / "key.pem").write_text("not a key")
    assert cli_main(["--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--device-id", "d", "--data", str(data_path),
                     "--server-public-key", str(tmp_path / "key.pem")]) == 2
    assert "server public key" in capsys.readouterr().err


def test_signing_and_verifying_a_task_costs_well_under_a_millisecond():
    """The figure docs/reliability.md quotes: Ed25519 sign and verify of a task with 1,000 selected devices."""
    task_bytes = encode_task(make_task(selected=[f"device-{i:04d}" for i in range(1000)]))
    verifier = TaskVerifier(TOPIC, SERVER_KEY.public_key())
    start = time.perf_counter()
    for _ in range(100):
        payload = sign_task(SERVER_KEY, TOPIC, task_bytes)
        assert verifier.open(payload) == task_bytes
    per_task = (time.perf_counter() - start) / 100
    assert per_task < 0.005, f"{per_task * 1e3:.2f} ms per sign + verify"
    assert len(payload) < 1.4 * len(task_bytes) + 200
