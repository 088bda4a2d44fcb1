"""Ed25519 signatures on round tasks: the server signs each task, a device holding the server's public key verifies.

A signed task binds everything a round runs: the model artifact through its content hash
(`model_hash`) and the global weights through `weights_hash`, both checked on arrival, so one
signature per task authenticates task, model and weights. docs/protocol.md ("Signed tasks")
specifies the bytes. The server and every device (real or simulated) use this module.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_runtime.protocol.codec import SignedTask, decode_signed_task, encode_signed_task, task_signing_input
from device_runtime.protocol.errors import ProtocolError


class SignatureError(ProtocolError):
    """A task payload is unsigned where a signature is required, or its signature does not verify."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name of a public key: the first 16 hex digits of SHA-256 of its 32 raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def write_signing_key(private_path: str | os.PathLike[str], public_path: str | os.PathLike[str]) -> str:
    """Generate an Ed25519 key pair: the private key as PKCS#8 PEM (mode 0600), the public key as PEM; its key id."""
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    public_pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never overwrite a key
    with os.fdopen(descriptor, "wb") as file:
        file.write(private_pem)
    Path(public_path).write_bytes(public_pem)
    return key_id(private_key.public_key())


def load_signing_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """The server's Ed25519 private key from a PEM file; ValueError naming the file if it is not one."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"signing key {os.fspath(path)!r}: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key {os.fspath(path)!r} is a {type(key).__name__}, not an Ed25519 key")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """The server's Ed25519 public key from a PEM file; ValueError naming the file if it is not one."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"server public key {os.fspath(path)!r}: {error}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"server public key {os.fspath(path)!r} is a {type(key).__name__}, not an Ed25519 key")
    return key


def sign_task(private_key: Ed25519PrivateKey, topic: str, task: bytes) -> bytes:
    """The signed payload of the task JSON `task` for publishing on `topic`."""
    signature = private_key.sign(task_signing_input(topic, task))
    return encode_signed_task(SignedTask(task, key_id(private_key.public_key()), signature))


@dataclass(frozen=True)
class TaskVerifier:
    """How a device opens the payloads of its task topic: with the server's public key it accepts only tasks
    signed by that key for that topic; without one (unsigned operation) it takes plain and signed tasks unchecked."""

    topic: str
    public_key: Ed25519PublicKey | None = None

    def open(self, payload: bytes) -> bytes:
        """The task JSON bytes in `payload`; SignatureError when a required signature is missing or wrong."""
        signed = decode_signed_task(payload)
        if self.public_key is None:
            return payload if signed is None else signed.task
        trusted = key_id(self.public_key)
        if signed is None:
            raise SignatureError(f"the task is unsigned and this device accepts only tasks signed by server "
                                 f"key {trusted}")
        if signed.key_id != trusted:
            raise SignatureError(f"the task is signed by key {signed.key_id}; this device trusts only server "
                                 f"key {trusted}")
        try:
            self.public_key.verify(signed.signature, task_signing_input(self.topic, signed.task))
        except InvalidSignature:
            raise SignatureError(f"the signature does not verify with server key {trusted} (the task was altered, "
                                 f"or signed for another topic)") from None
        return signed.task
