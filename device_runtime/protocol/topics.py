"""MQTT topic names of a fedge fleet, and the identifier rules that keep them unambiguous.

Every topic lives under `fedge/<fleet>/`; docs/protocol.md gives QoS and retain flags.
"""

from __future__ import annotations

import re

from device_runtime.protocol.errors import ProtocolError

MAX_ID_CHARS = 64
_TOPIC_CHARS = frozenset("/+#")
_HASH_PATTERN = re.compile(r"(?:sha256:)?([0-9a-f]{64})")


def check_id(value: object, what: str = "id") -> str:
    """Return `value` if it is a valid fleet or device id (one safe MQTT topic level)."""
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{what} must be a non-empty string, got {value!r:.80}")
    if len(value) > MAX_ID_CHARS:
        raise ProtocolError(f"{what} has {len(value)} characters, at most {MAX_ID_CHARS}")
    if not value.isprintable() or _TOPIC_CHARS.intersection(value):
        raise ProtocolError(f"{what} {value!r} has a non-printable character or one of / + #")
    return value


def hash_hex(model_hash: str) -> str:
    """The 64 hex digits of a model hash given as 'sha256:<hex>' or bare hex."""
    match = _HASH_PATTERN.fullmatch(model_hash) if isinstance(model_hash, str) else None
    if match is None:
        raise ProtocolError(f"model hash {model_hash!r:.80} is not 'sha256:' + 64 lowercase hex")
    return match.group(1)


def task_topic(fleet: str) -> str:
    """The retained topic that holds the fleet's current round task (JSON)."""
    return f"fedge/{check_id(fleet, 'fleet')}/task"


def model_topic(fleet: str, model_hash: str) -> str:
    """The retained topic that holds a model artifact (raw .tflite bytes), named by its hash."""
    return f"fedge/{check_id(fleet, 'fleet')}/model/{hash_hex(model_hash)}"


def weights_topic(fleet: str) -> str:
    """The retained topic that holds the current round's global weights (an update from 'server')."""
    return f"fedge/{check_id(fleet, 'fleet')}/weights"


def status_topic(fleet: str, device_id: str) -> str:
    """The retained topic of a device's status (JSON; the last will says 'offline')."""
    return f"fedge/{check_id(fleet, 'fleet')}/status/{check_id(device_id, 'device id')}"


def update_topic(fleet: str, device_id: str) -> str:
    """The topic a device publishes its updates on (FlatBuffers, QoS 1, not retained)."""
    return f"fedge/{check_id(fleet, 'fleet')}/update/{check_id(device_id, 'device id')}"


def status_wildcard(fleet: str) -> str:
    """The subscription that receives every device status of a fleet."""
    return f"fedge/{check_id(fleet, 'fleet')}/status/+"


def update_wildcard(fleet: str) -> str:
    """The subscription that receives every device update of a fleet."""
    return f"fedge/{check_id(fleet, 'fleet')}/update/+"


def topic_device_id(topic: str, fleet: str) -> str:
    """The device id of a status or update topic, so a server can match it to the payload."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[:2] != ["fedge", fleet] or parts[2] not in ("status", "update"):
        raise ProtocolError(f"topic {topic!r:.120} is not a status or update topic of {fleet!r}")
    return check_id(parts[3], "device id")
