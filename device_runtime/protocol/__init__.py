"""The fedge wire protocol: MQTT topics, JSON tasks and statuses, FlatBuffers model updates.

Importable with the device's dependencies alone (stdlib, numpy, flatbuffers), because the
device and the server both use it. docs/protocol.md specifies every byte.
"""

from device_runtime.protocol.codec import (
    ENCODINGS,
    MAX_STRING_BYTES,
    STATES,
    ModelUpdate,
    decode_status,
    decode_update,
    decode_weights,
    encode_status,
    encode_update,
    encode_weights,
    max_update_bytes,
    payload_hash,
)
from device_runtime.protocol.errors import PROTOCOL_VERSION, Fault, ProtocolError
from device_runtime.protocol.task import ClientWork, RoundConfig, Task, decode_task, encode_task, is_selected
from device_runtime.protocol.topics import (
    check_id,
    model_topic,
    status_topic,
    status_wildcard,
    task_topic,
    topic_device_id,
    update_topic,
    update_wildcard,
    weights_topic,
)

__all__ = [
    "ClientWork",
    "ENCODINGS",
    "Fault",
    "MAX_STRING_BYTES",
    "PROTOCOL_VERSION",
    "STATES",
    "ModelUpdate",
    "ProtocolError",
    "RoundConfig",
    "Task",
    "check_id",
    "decode_status",
    "decode_task",
    "decode_update",
    "decode_weights",
    "encode_status",
    "encode_task",
    "encode_update",
    "encode_weights",
    "is_selected",
    "max_update_bytes",
    "payload_hash",
    "model_topic",
    "status_topic",
    "status_wildcard",
    "task_topic",
    "topic_device_id",
    "update_topic",
    "update_wildcard",
    "weights_topic",
]
