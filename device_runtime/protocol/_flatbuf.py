"""Bounds-checked reads of an untrusted flatbuffer.

The Python flatbuffers runtime has no verifier: its accessors follow offsets wherever they
point (struct.unpack_from even accepts negative positions). Every read here checks that it
stays inside the buffer and inside its table, and that a vector's length fits the bytes that
are left, before anything is allocated. Field slots follow the order of fields in the schema.
"""

from __future__ import annotations

import struct

from device_runtime.protocol.errors import ProtocolError

_U16, _U32, _I32 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<i")


class Buffer:
    """An untrusted flatbuffer whose every read is checked against its length."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def need(self, pos: int, size: int, what: str) -> None:
        """Raise unless `size` bytes at `pos` lie inside the buffer."""
        if pos < 0 or pos + size > len(self.data):
            raise ProtocolError(
                f"{what}: {size} bytes at offset {pos} lie outside the {len(self.data)}-byte payload"
            )

    def read(self, fmt: struct.Struct, pos: int, what: str) -> int | float:
        """One little-endian scalar at `pos`."""
        self.need(pos, fmt.size, what)
        return fmt.unpack_from(self.data, pos)[0]

    def root(self, what: str) -> Table:
        """The root table (the uoffset at the start of the buffer)."""
        return Table(self, int(self.read(_U32, 0, what)), what)


class Table:
    """A table of a `Buffer`, its vtable checked on construction."""

    def __init__(self, buf: Buffer, pos: int, what: str) -> None:
        self.buf, self.pos, self.what = buf, pos, what
        vtable = pos - int(buf.read(_I32, pos, f"{what} table"))
        self.vtable_size = int(buf.read(_U16, vtable, f"{what} vtable"))
        self.table_size = int(buf.read(_U16, vtable + 2, f"{what} vtable"))
        if self.vtable_size < 4 or self.vtable_size % 2:
            raise ProtocolError(f"{what}: vtable size {self.vtable_size} is invalid")
        buf.need(vtable, self.vtable_size, f"{what} vtable")
        buf.need(pos, self.table_size, f"{what} table")
        self.vtable = vtable

    def _field(self, slot: int, size: int, name: str) -> int | None:
        """Position of field `slot` (`size` bytes inline), or None when it is absent."""
        entry = 4 + 2 * slot
        if entry >= self.vtable_size:
            return None
        offset = int(self.buf.read(_U16, self.vtable + entry, f"{self.what}.{name}"))
        if offset == 0:
            return None
        if offset + size > self.table_size:
            raise ProtocolError(f"{self.what}.{name}: field lies outside its table")
        return self.pos + offset

    def scalar(self, slot: int, fmt: struct.Struct, default: int | float, name: str) -> int | float:
        """A scalar field, or the schema default when it is absent."""
        pos = self._field(slot, fmt.size, name)
        return default if pos is None else self.buf.read(fmt, pos, f"{self.what}.{name}")

    def _target(self, slot: int, name: str) -> int | None:
        """Where an offset field (string, vector, table) points, or None when absent."""
        pos = self._field(slot, 4, name)
        return None if pos is None else pos + int(self.buf.read(_U32, pos, f"{self.what}.{name}"))

    def vector(self, slot: int, item_size: int, max_items: int, name: str) -> tuple[int, int] | None:
        """(start, length) of a vector field with at most `max_items` items, or None."""
        target = self._target(slot, name)
        if target is None:
            return None
        what = f"{self.what}.{name}"
        length = int(self.buf.read(_U32, target, what))
        if length > max_items:
            raise ProtocolError(f"{what} has {length} items, at most {max_items} allowed")
        self.buf.need(target + 4, length * item_size, what)
        return target + 4, length

    def string(self, slot: int, max_bytes: int, name: str) -> str:
        """A required UTF-8 string field of at most `max_bytes` bytes."""
        what = f"{self.what}.{name}"
        found = self.vector(slot, 1, max_bytes, name)
        if found is None:
            raise ProtocolError(f"{what} is missing")
        start, length = found
        self.buf.need(start + length, 1, f"{what} terminator")
        try:
            return self.buf.data[start : start + length].decode("utf-8")
        except UnicodeDecodeError as error:
            raise ProtocolError(f"{what} is not valid UTF-8 ({error.reason})") from None

    def tables(self, slot: int, max_items: int, name: str) -> list[Table]:
        """The tables of a vector-of-tables field (empty when absent)."""
        found = self.vector(slot, 4, max_items, name)
        if found is None:
            return []
        start, length = found
        items = []
        for i in range(length):
            pos = start + 4 * i
            items.append(Table(self.buf, pos + int(self.buf.read(_U32, pos, name)), f"{name}[{i}]"))
        return items
