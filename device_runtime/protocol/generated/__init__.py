"""Python classes that flatc generates from ../update.fbs (docs/protocol.md: regenerate)."""
