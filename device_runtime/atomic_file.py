"""Files replaced whole or not at all: written to a temp file in the same folder, fsynced, renamed over.

A crash leaves the old file or the new one, never a torn one. The model cache, the server's
checkpoint and its run id are written this way.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def replace_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> Path:
    """Replace `path` with what `write` writes to the binary file it is given; returns the path."""
    path = Path(path)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path
