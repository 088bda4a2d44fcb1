"""The protocol version and the one error every protocol check raises."""

PROTOCOL_VERSION = 2


class ProtocolError(ValueError):
    """A message or topic breaks the fedge wire protocol (malformed, wrong shape, hostile)."""
