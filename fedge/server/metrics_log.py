"""The server's JSON-lines metrics log: one object per round, appended and flushed as the round ends."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON line per round to `path` (a resumed server continues the same file)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Write to `path`, creating its folder."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        """Append `record` as one line and flush it to disk, so a crash loses at most the round in progress."""
        line = json.dumps(record, separators=(",", ":"), default=float)  # numpy scalars as numbers
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics log, in order (for reports and tests)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
