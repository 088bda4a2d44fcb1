"""Reads LEAF's JSON format: one file or a folder of files, each `{"users", "num_samples", "user_data"}`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def json_files(path: str | Path) -> list[Path]:
    """The file itself, or the folder's `*.json` files sorted by name (LEAF writes several per split)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise ValueError(f"{path}: folder holds no .json files")
        return files
    if not path.is_file():
        raise ValueError(f"{path}: no such file or folder")
    return [path]


def read_users(path: str | Path) -> dict[str, tuple[list[Any], list[Any]]]:
    """`{user: (x list, y list)}` over every file, checking keys, lengths and duplicate users."""
    users: dict[str, tuple[list[Any], list[Any]]] = {}
    for file in json_files(path):
        for user, pair in _read_file(file).items():
            if user in users:
                raise ValueError(f"{file}: user {user!r} also appears in an earlier file")
            users[user] = pair
    return users


def _read_file(file: Path) -> dict[str, tuple[list[Any], list[Any]]]:
    """The users of one LEAF JSON file, validated."""
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{file}: expected a JSON object with keys 'users', 'num_samples', 'user_data'")
    missing = [key for key in ("users", "num_samples", "user_data") if key not in content]
    if missing:
        raise ValueError(f"{file}: missing key(s) {missing}; LEAF files hold 'users', 'num_samples', 'user_data'")
    names, counts, data = content["users"], content["num_samples"], content["user_data"]
    if not isinstance(names, list) or not isinstance(counts, list) or len(names) != len(counts):
        raise ValueError(f"{file}: 'users' and 'num_samples' must be lists of the same length")
    if not isinstance(data, dict):
        raise ValueError(f"{file}: 'user_data' must be an object keyed by user")
    users = {}
    for name, count in zip(names, counts):
        entry = data.get(name)
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            raise ValueError(f"{file}: user {name!r} has no 'x' and 'y' in 'user_data'")
        x, y = entry["x"], entry["y"]
        if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y):
            raise ValueError(f"{file}: user {name!r}: 'x' and 'y' must be lists of the same length")
        if len(x) != count:
            raise ValueError(f"{file}: user {name!r}: num_samples says {count}, 'x' holds {len(x)}")
        users[str(name)] = (x, y)
    return users
