"""The server's metrics log: one record per round, appended and flushed as the round ends, in three forms.

`metrics.jsonl` holds the records as JSON lines (the source of the other two). Beside it,
`metrics.csv` holds them flattened (`times.round`, `dropped.late`), a row per round, and
`tensorboard/` holds TensorBoard event files of their numbers (step = the record's round), so
`tensorboard --logdir` shows each round as it ends. A resumed server appends to the JSON lines
and the CSV and adds an event file. Without tensorboardX (a device-only install) the event files
are skipped.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from device_runtime.atomic_file import replace_atomically
from fedge.server.reports import surplus_and_refused

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
# TensorBoard tag groups of the flattened keys: the first prefix that matches names the group.
_TAG_PREFIXES = (("train_", "train/"), ("eval_", "eval/"), ("bytes_", "bytes/"), ("times.", "time/"),
                 ("dropped.", "participation/dropped/"), ("dp_", "privacy/"))
_TAG_NAMES = {"selected": "participation/selected", "goal": "participation/goal",
              "accepted": "participation/accepted", "seconds": "time/total"}
_NOT_SCALARS = ("round", "started")  # the step, and a timestamp (the event's wall time says when)


class MetricsLog:
    """Appends each round's record to `path` (JSON lines), to the CSV beside it and to an event file in
    `tensorboard/` beside it; a resumed server continues the same files."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Write to `path` and beside it, creating its folder; ValueError for a `.csv` path (its CSV's own name)."""
        self.path = Path(path)
        self.csv_path = self.path.with_suffix(".csv")
        if self.csv_path == self.path:
            raise ValueError(f"metrics log {self.path}: its CSV is written beside it as NAME.csv; name it .jsonl")
        self.tensorboard_dir = self.path.parent / TENSORBOARD_DIR
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._csv = _CsvFile(self.csv_path)
        self._tensorboard = _tensorboardx_installed()
        if not self._tensorboard:
            logger.info("tensorboardX is not installed: %s and %s only, no TensorBoard event files "
                        "(pip install tensorboardX)", self.path.name, self.csv_path.name)
        self._events: _EventFile | None = None  # opened by the next record, closed by close()

    def write(self, record: Mapping[str, Any]) -> None:
        """Append `record` to the three, each flushed to disk, so a crash loses at most the round in progress;
        the CSV row and the scalars are read back from the JSON line, so all three hold the same numbers."""
        line = json.dumps(record, separators=(",", ":"), default=float)  # numpy scalars as numbers
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            _sync(f)
        flat = flatten_record(json.loads(line))
        self._csv.append(flat)
        if self._tensorboard:
            if self._events is None:
                self._events = _EventFile(self.tensorboard_dir)
            self._events.write(flat["round"], _scalars(flat))

    def close(self) -> None:
        """Close the event file (every round in it is on disk already); a later record opens a new one."""
        if self._events is not None:
            self._events.close()
            self._events = None


def read_metrics_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics log, in order (for reports and tests)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def flatten_record(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`record` with its nested dicts spread into dotted keys ({"times": {"round": 2.7}} -> {"times.round": 2.7}):
    the CSV's columns."""
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            flat.update(flatten_record(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _scalars(flat: Mapping[str, Any]) -> dict[str, float]:
    """A flattened record's numbers by TensorBoard tag (but the step and the timestamp), and the dropped reports
    as `participation/surplus` (after the goal or the deadline) and `participation/refused` (by the checks), 0 in a
    round without any."""
    scalars = {_tag(key): value for key, value in flat.items()
               if key not in _NOT_SCALARS and isinstance(value, (int, float))}
    dropped = {key.removeprefix("dropped."): value for key, value in flat.items() if key.startswith("dropped.")}
    scalars["participation/surplus"], scalars["participation/refused"] = surplus_and_refused(dropped)
    return scalars


def _tag(key: str) -> str:
    """The TensorBoard tag of a flattened key, grouped by what it measures (`train_loss` -> `train/loss`,
    `times.round` -> `time/round`); the server's other measurements (update_norm, clipped_clients) in `server/`."""
    if key in _TAG_NAMES:
        return _TAG_NAMES[key]
    for prefix, group in _TAG_PREFIXES:
        if key.startswith(prefix):
            return group + key[len(prefix):]
    return "server/" + key


class _CsvFile:
    """A CSV of flattened records, a row each; a record with a key the header lacks rewrites the file with the
    wider header (rare: a drop reason or the held-out metrics seen for the first time)."""

    def __init__(self, path: Path) -> None:
        """Continue `path`'s header when it exists (a resumed server)."""
        self.path = path
        self.columns: list[str] = []
        if path.exists():
            with open(path, newline="", encoding="utf-8") as f:
                self.columns = next(csv.reader(f), [])

    def append(self, row: Mapping[str, Any]) -> None:
        """Append `row` (a missing key is an empty cell), flushed to disk; first widen the header if `row` needs it."""
        columns = _widened(self.columns, list(row))
        if columns == self.columns:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, columns).writerow(row)
                _sync(f)
        else:
            self._rewrite(columns, row)
        self.columns = columns

    def _rewrite(self, columns: list[str], row: Mapping[str, Any]) -> None:
        """The rows so far and `row` under `columns`, replacing the CSV atomically (the old file or the new one)."""
        rows: list[Mapping[str, Any]] = []
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, columns)
        writer.writeheader()
        writer.writerows([*rows, row])
        replace_atomically(self.path, lambda file: file.write(text.getvalue().encode("utf-8")))


def _widened(columns: list[str], keys: list[str]) -> list[str]:
    """`columns` and the `keys` it lacks, each placed after the key before it in `keys`, so a new drop reason
    joins the other `dropped.` columns rather than the end."""
    merged = list(columns)
    for i, key in enumerate(keys):
        if key not in merged:
            merged.insert(merged.index(keys[i - 1]) + 1 if i else 0, key)
    return merged


class _EventFile:
    """A TensorBoard event file of scalars, through tensorboardX's EventsWriter, which writes as it is called:
    its SummaryWriter hands events to a thread, so SummaryWriter.flush() can return before they are written."""

    def __init__(self, folder: Path) -> None:
        """A new event file in `folder`, uniquely named: the name's timestamp is in whole seconds, and a second
        writer of the same name would truncate the first."""
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        folder.mkdir(parents=True, exist_ok=True)
        self._writer = EventsWriter(str(folder / "events"), f".{uuid.uuid4().hex[:8]}")
        self._event, self._scalar = Event, scalar

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        """The scalars at `step`, then flush and fsync, so TensorBoard shows the round now."""
        now = time.time()
        for tag, value in scalars.items():
            self._writer.write_event(self._event(wall_time=now, step=step, summary=self._scalar(tag, value)))
        self._writer.flush()

    def close(self) -> None:
        """Close the file."""
        self._writer.close()


def _tensorboardx_installed() -> bool:
    """Whether tensorboardX is installed (the desktop extra has it, a device-only install does not); found, not
    imported, so a server pays for the import only when it writes its first round."""
    try:
        return importlib.util.find_spec("tensorboardX") is not None
    except ValueError:  # a module set to None in sys.modules (blocked): as good as absent
        return False


def _sync(f: IO[str]) -> None:
    """Flush `f` to disk."""
    f.flush()
    os.fsync(f.fileno())
