"""Typed reads of TOML tables that collect every error instead of stopping at the first (job and scenario files).

A `Table` reads one table's keys, each checked against its type and range; a bad value is
recorded as "<source>: <dotted key> <what is wrong>" and the read returns a fallback, so that
one pass over a file finds every mistake. `TableErrors` carries them all.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T")
_MISSING = object()


class TableErrors(ValueError):
    """Every error found in a file, one per line, each naming the file and the key."""

    def __init__(self, errors: list[str]) -> None:
        """Keep the messages in the order found."""
        super().__init__("\n".join(errors))
        self.errors = list(errors)


def _tomllib() -> Any:
    """The standard library's TOML parser (Python 3.10: the same parser from PyPI, a desktop dependency there)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    return tomllib


def toml_value(text: str) -> Any:
    """`text` read as one TOML value (`50`, `0.5`, `true`, `"x"`, `[1, 2]`), else the text itself."""
    tomllib = _tomllib()
    try:
        return tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        return text.strip()


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """The TOML document at `path`; TableErrors with one line naming the file when it cannot be read or parsed."""
    tomllib = _tomllib()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as error:
        raise TableErrors([f"{what} {path}: cannot read it: {error.strerror or error}"]) from None
    except tomllib.TOMLDecodeError as error:
        raise TableErrors([f"{what} {path}: invalid TOML: {error}"]) from None
    except UnicodeDecodeError:
        raise TableErrors([f"{what} {path}: not a TOML file (it is not UTF-8 text)"]) from None


def is_number(value: Any) -> bool:
    """Whether `value` is an int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Table:
    """One TOML table's keys, read with checks; errors go to a shared list, prefixed with the source and key path."""

    def __init__(self, raw: Any, source: str, prefix: str, errors: list[str]) -> None:
        """Wrap `raw` (recorded as an error unless it is a table); `prefix` is the dotted path to this table."""
        self.source, self.prefix, self.errors = source, prefix, errors
        self._read: set[str] = set()
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            self.errors.append(f"{source}: {prefix.rstrip('.') or 'the file'} must be a table, "
                               f"got {type(raw).__name__}")
            raw = {}
        self._raw: Mapping[str, Any] = raw

    def has(self, key: str) -> bool:
        """Whether the table sets `key`."""
        return key in self._raw

    def get(self, key: str, default: Any = None) -> Any:
        """The raw value of `key` (default when absent), marking it as known."""
        self._read.add(key)
        return self._raw.get(key, default)

    def error(self, key: str, message: str) -> None:
        """Record an error about `key`."""
        self.errors.append(f"{self.source}: {self.prefix}{key} {message}")

    def error_here(self, message: str) -> None:
        """Record an error about the table as a whole (settings that cannot work together)."""
        self.errors.append(f"{self.source}: {self.prefix.rstrip('.') or 'the top level'}: {message}")

    def table(self, key: str) -> Table:
        """The sub-table `key` (an empty one when absent)."""
        return Table(self.get(key), self.source, f"{self.prefix}{key}.", self.errors)

    def tables(self, key: str) -> list[Table]:
        """The array of tables `key` ([[key]]), empty when absent."""
        raw = self.get(key)
        if raw is None:
            return []
        if not isinstance(raw, list):
            self.error(key, f"must be an array of tables ([[{self.prefix}{key}]]), got {raw!r:.80}")
            return []
        return [Table(item, self.source, f"{self.prefix}{key}[{i}].", self.errors) for i, item in enumerate(raw)]

    def checked(self, key: str, default: _T, check: Callable[[Any], _T], expected: str) -> _T:
        """`check(value)`, else `default` after an error: "must be <expected>" when the check raises without a
        message, "is invalid: <message>" when it says why."""
        value = self.get(key, _MISSING)
        if value is _MISSING:
            return default
        try:
            return check(value)
        except (TypeError, ValueError) as error:
            self.error(key, f"is invalid: {error}" if str(error) else f"must be {expected}, got {value!r:.80}")
            return default

    def string(self, key: str, default: str | None = None) -> str | None:
        """A string."""
        return self.checked(key, default, _string, "a string")

    def boolean(self, key: str, default: bool) -> bool:
        """A boolean."""
        return self.checked(key, default, _boolean, "true or false")

    def integer(self, key: str, default: int | None, minimum: int, maximum: int | None = None) -> int | None:
        """An integer >= minimum (and <= maximum)."""
        bounds = f">= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
        return self.checked(key, default, lambda v: _integer(v, minimum, maximum), f"an integer {bounds}")

    def number(self, key: str, default: float | None, low: float, high: float = math.inf,
               low_open: bool = False) -> float | None:
        """A number in [low, high] ((low, high] when `low_open`)."""
        bounds = f"{'>' if low_open else '>='} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
        return self.checked(key, default, lambda v: _number(v, low, high, low_open), f"a number {bounds}")

    def choice(self, key: str, default: str | None, choices: Any) -> str | None:
        """One of `choices` (a registry's names)."""
        names = tuple(choices)
        return self.checked(key, default, lambda v: _choice(v, names), f"one of {', '.join(names)}")

    def path(self, key: str, base_dir: Path, kind: str = "any") -> Path | None:
        """A path relative to `base_dir` (absolute ones stay); `kind` "file" or "folder" must exist as such,
        "any" must exist, "output" need not."""
        def resolve(value: Any) -> Path:
            path = Path(_string(value)).expanduser()
            path = path if path.is_absolute() else base_dir / path
            if kind == "file" and path.is_dir():
                raise ValueError(f"{path} is a folder, not a file")
            if kind == "folder" and path.is_file():
                raise ValueError(f"{path} is a file, not a folder")
            if kind == "file" and not path.is_file() or kind == "folder" and not path.is_dir() \
                    or kind == "any" and not path.exists():
                raise ValueError(f"{path}: no such {'file or folder' if kind == 'any' else kind}")
            return path

        return self.checked(key, None, resolve, "a path")

    def strings(self, key: str, default: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
        """A list of strings."""
        return self.checked(key, default, _strings, "a list of strings")

    def done(self) -> None:
        """Record every key that was never read: a typo, or a key of another table."""
        unknown = sorted(set(self._raw) - self._read)
        if unknown:
            known = ", ".join(sorted(self._read)) or "none"
            self.errors.append(f"{self.source}: {self.prefix.rstrip('.') or 'the top level'} has unknown key(s) "
                               f"{', '.join(map(repr, unknown))}; known: {known}")


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError("")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError("")
    return value


def _integer(value: Any, minimum: int, maximum: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum \
            or (maximum is not None and value > maximum):
        raise ValueError("")
    return value


def _number(value: Any, low: float, high: float, low_open: bool) -> float:
    if not is_number(value) or not math.isfinite(value) or not (low < value if low_open else low <= value) \
            or not value <= high:
        raise ValueError("")
    return float(value)


def _choice(value: Any, names: tuple[str, ...]) -> str:
    if value not in names:
        raise ValueError("")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TypeError("")
    return tuple(value)
