"""An on-disk cache of model artifacts, keyed by their content hash (docs/artifact.md)."""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

from device_runtime.artifact import ArtifactError, verify_content_hash
from device_runtime.atomic_file import replace_atomically

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODELS = 4
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def hex_digest(model_hash: str) -> str:
    """The 64 hex digits of a 'sha256:<hex>' or bare '<hex>' hash; ValueError otherwise."""
    digest = model_hash[len("sha256:"):] if model_hash.startswith("sha256:") else model_hash
    if not _HEX_DIGEST.fullmatch(digest):
        raise ValueError(f"not a sha256 model hash: {model_hash!r}")
    return digest


def default_cache_dir() -> Path:
    """~/.cache/fedge/models (or under $XDG_CACHE_HOME when set)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fedge" / "models"


class ModelCache:
    """Verified artifacts stored as files named by their hex digest; keeps the `max_models` most recently used."""

    def __init__(self, directory: str | os.PathLike[str], max_models: int = DEFAULT_MAX_MODELS) -> None:
        """Use (and create) `directory`; `max_models` >= 1 bounds how many artifacts stay on disk."""
        if max_models < 1:
            raise ValueError(f"max_models must be >= 1, got {max_models!r}")
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_models = max_models
        self._lock = threading.Lock()

    def path(self, model_hash: str) -> Path:
        """Where the artifact with this hash is (or would be) stored."""
        return self.directory / hex_digest(model_hash)

    def get(self, model_hash: str) -> bytes | None:
        """The cached artifact with this content hash, or None (a corrupt file is deleted)."""
        path = self.path(model_hash)
        with self._lock:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None
            try:
                actual = verify_content_hash(data)
            except ArtifactError as error:
                actual = f"invalid ({error})"
            if actual != "sha256:" + path.name:
                logger.warning("cached model %s is corrupt (hash %s); deleting it", path, actual)
                path.unlink(missing_ok=True)
                return None
            os.utime(path)  # mark as recently used
            return data

    def put(self, model_bytes: bytes) -> str:
        """Verify the artifact's content hash, store it atomically and return the hash ('sha256:<hex>')."""
        model_hash = verify_content_hash(bytes(model_bytes))
        path = self.path(model_hash)
        with self._lock:
            replace_atomically(path, lambda file: file.write(model_bytes))
            self._evict()
        return model_hash

    def hashes(self) -> list[str]:
        """Hashes of the cached artifacts, most recently used first."""
        return ["sha256:" + path.name for path in self._entries()]

    def _entries(self) -> list[Path]:
        """Cached artifact files, most recently used first."""
        entries = []
        for path in self.directory.iterdir():
            if _HEX_DIGEST.fullmatch(path.name):
                try:
                    entries.append((path.stat().st_mtime_ns, path))
                except FileNotFoundError:
                    continue
        return [path for _, path in sorted(entries, reverse=True)]

    def _evict(self) -> None:
        """Delete all but the `max_models` most recently used artifacts."""
        for path in self._entries()[self.max_models:]:
            logger.info("evicting cached model %s", path.name)
            path.unlink(missing_ok=True)
