"""The update journal: every update message written to disk before the broker gets its PUBACK.

paho acknowledges a QoS 1 message when the message callback returns, so an update the server
has acknowledged but not yet aggregated into a checkpoint would die with a killed server (the
device, having its PUBACK, never sends it again and never trains that round again). The
executor appends each update here (flushed and fsynced) inside that callback; a restarted
server replays the journal into the round it resumes, and each checkpoint clears it. A record
is `<received_at f64><topic u32><payload u32><crc32 u32>` then the topic and the payload, the
CRC covering all the rest; a torn last record (a crash mid-write) fails its length or CRC check
and ends the replay; a damaged record in the middle is skipped and the records after it kept.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

JOURNAL_FILE = "updates.journal"
_FIELDS = struct.Struct("<dII")  # received_at, topic size, payload size
_CRC = struct.Struct("<I")
_REPLAY_SUFFIX = ".replay"
_MAX_TOPIC = 65535  # MQTT's limit on a topic's length

Message = tuple[str, bytes, float]  # (topic, payload, received_at), as the executor's inbox holds them


class UpdateJournal:
    """An append-only file of received update messages; thread-safe appends, replay after a restart."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Journal to `path`; what an earlier run left there is set aside for replay() (`<path>.replay`)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._replay_path = self.path.with_name(self.path.name + _REPLAY_SUFFIX)
        if self.path.exists() and self.path.stat().st_size:
            if self._replay_path.exists():  # a crash during the replayed round: keep both runs' records
                merged = self._replay_path.with_name(self._replay_path.name + ".tmp")
                with open(merged, "wb") as out:
                    for journal in (self._replay_path, self.path):
                        out.writelines(record for record, _ in _records(journal))
                    _sync(out)
                os.replace(merged, self._replay_path)
            else:
                os.replace(self.path, self._replay_path)
        self._lock = threading.Lock()
        self._file = open(self.path, "wb")

    def append(self, message: Message) -> None:
        """Write one message and fsync it, so it survives a crash once this returns."""
        topic, payload, received_at = message
        topic_bytes = topic.encode("utf-8")
        fields = _FIELDS.pack(received_at, len(topic_bytes), len(payload))
        record = fields + _CRC.pack(_checksum(fields, topic_bytes, payload)) + topic_bytes + payload
        with self._lock:
            self._file.write(record)
            _sync(self._file)

    def replay(self) -> Iterator[Message]:
        """The messages an earlier run journaled and had not checkpointed, oldest first, read one at a time."""
        if not self._replay_path.exists():
            return
        count = 0
        for _, message in _records(self._replay_path):
            count += 1
            yield message
        logger.info("replayed %d journaled update messages from %s", count, self._replay_path)

    def clear(self) -> None:
        """Forget every journaled message: their round is checkpointed."""
        with self._lock:
            self._file.truncate(0)
            self._file.seek(0)
            _sync(self._file)
            self._replay_path.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the file (its records stay for the next run)."""
        with self._lock:
            self._file.close()


def _records(path: Path) -> Iterator[tuple[bytes, Message]]:
    """Each whole record of a journal file (its bytes and its message). A damaged record (a bad length or CRC) is
    skipped: the records after it are found again at the next offset where a whole record checks out, and the
    bytes skipped are logged; a torn last record (a crash mid-write) ends the file."""
    if not path.stat().st_size:
        return
    with open(path, "rb") as journal, mmap.mmap(journal.fileno(), 0, access=mmap.ACCESS_READ) as data:
        yield from _scan(path, data)  # mapped, not read: a large journal costs no memory to replay


def _scan(path: Path, data: mmap.mmap) -> Iterator[tuple[bytes, Message]]:
    """_records over the mapped file `data`."""
    count = offset = 0
    while offset < len(data):
        record = _record_at(data, offset)
        if record is not None:
            count += 1
            yield record
            offset += len(record[0])
            continue
        following = next((start for start in range(offset + 1, len(data)) if _record_at(data, start)), None)
        if following is None:
            logger.warning("%s: a torn record after %d messages ends it", path, count)
            return
        logger.warning("%s: skipped %d damaged bytes after %d messages; the records after them are kept", path,
                       following - offset, count)
        offset = following


def _record_at(data: mmap.mmap, offset: int) -> tuple[bytes, Message] | None:
    """The whole record starting at `offset` (its bytes and its message), or None when none checks out there."""
    end = offset + _FIELDS.size + _CRC.size
    if end > len(data):
        return None
    received_at, topic_size, payload_size = _FIELDS.unpack_from(data, offset)
    if topic_size > _MAX_TOPIC or end + topic_size + payload_size > len(data):  # cheap checks before the CRC
        return None
    fields = data[offset:offset + _FIELDS.size]
    topic, payload = data[end:end + topic_size], data[end + topic_size:end + topic_size + payload_size]
    if _checksum(fields, topic, payload) != _CRC.unpack_from(data, offset + _FIELDS.size)[0]:
        return None
    return data[offset:end + topic_size + payload_size], (topic.decode("utf-8", "replace"), payload, received_at)


def _checksum(fields: bytes, topic: bytes, payload: bytes) -> int:
    """CRC-32 of a record's fields, topic and payload."""
    return zlib.crc32(payload, zlib.crc32(topic, zlib.crc32(fields)))


def _sync(file: BinaryIO) -> None:
    """Flush Python's buffer and fsync the file."""
    file.flush()
    os.fsync(file.fileno())
