"""The protocol version and the one error every protocol check raises, with what kind of fault it is."""

from __future__ import annotations

import enum

PROTOCOL_VERSION = 3


class Fault(enum.Enum):
    """What kind of fault a ProtocolError is, so a receiver can act on it without reading the message."""

    MALFORMED = "malformed"  # breaks the schema, a bound or a check of docs/protocol.md
    WRONG_MODEL = "wrong_model"  # well formed, for another model (its model hash)
    WRONG_SENDER = "wrong_sender"  # well formed, but its fleet or device id is not the expected one


class ProtocolError(ValueError):
    """A message or topic breaks the fedge wire protocol (malformed, wrong shape, hostile); `fault` says how."""

    def __init__(self, message: str, fault: Fault = Fault.MALFORMED) -> None:
        """The message names the field; `fault` classifies it."""
        super().__init__(message)
        self.fault = fault
