"""Scenario files: a fleet of device groups (speed, bandwidth, availability, dropout) and its data partition.

A scenario is a TOML file (or the equivalent dict):

    fleet = "digits"          # topics live under fedge/<fleet>/
    seed = 0                  # seeds the partition and every device's random draws

    [data]                    # optional: the clients the devices train on, one per device
    dataset = "digits"
    partition = "dirichlet"   # iid | dirichlet | shards | quantity_skew
    alpha = 0.5

    [[groups]]
    name = "pi"               # devices are named pi-000, pi-001, ...
    count = 30
    speed = 4.0               # training takes 4x as long as on this machine
    download = "1 MB/s"       # bytes/s as a number, or a string with B/s, kB/s, MB/s, GB/s, kbit/s, Mbit/s, Gbit/s
    upload = "256 kB/s"
    availability = [[0, 600]] # online during [start, end) seconds after the fleet starts ...
    period = 900              # ... repeating every 900 s (omit: the windows happen once)
    dropout = 0.1             # chance that a selected device vanishes mid-round ...
    downtime = 30.0           # ... and comes back this many seconds later

Every field but `groups`, `name` and `count` has a default (speed 1, unlimited bandwidth, always
online, no dropout). A bad or unknown field raises ScenarioError naming it.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_runtime.protocol import ProtocolError, check_id

if TYPE_CHECKING:
    from fedge.simulation.datasets import ClientData, ClientDataset

DATASETS = ("digits",)
PARTITIONS = ("iid", "dirichlet", "shards", "quantity_skew")
DEFAULT_DOWNTIME_S = 30.0
_UNITS = {"B/s": 1.0, "kB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "kbit/s": 125.0, "Mbit/s": 125e3, "Gbit/s": 125e6}
_BANDWIDTH = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]+)\s*")


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Availability:
    """Online windows [start, end) in seconds since the fleet started, repeating every `period` if set; none: always."""

    windows: tuple[tuple[float, float], ...] = ()
    period: float | None = None

    def next_window(self, t: float) -> tuple[float, float] | None:
        """The (start, end) of the window holding time t, else of the next one; None if none is left."""
        if not self.windows:
            return t, math.inf
        cycle, offset = self._cycle(t)
        for start, end in self.windows:
            if offset < end:
                return cycle + start, cycle + end
        if self.period is None:
            return None
        start, end = self.windows[0]
        return cycle + self.period + start, cycle + self.period + end

    def _cycle(self, t: float) -> tuple[float, float]:
        """(start of the cycle holding t, t's offset in it); one endless cycle without a period."""
        if self.period is None:
            return 0.0, t
        cycle = math.floor(t / self.period) * self.period
        return cycle, t - cycle


@dataclass(frozen=True)
class Group:
    """Devices that share a profile."""

    name: str
    count: int
    speed: float = 1.0
    download: float | None = None  # bytes per second; None: unlimited
    upload: float | None = None
    availability: Availability = Availability()
    dropout: float = 0.0
    downtime: float = DEFAULT_DOWNTIME_S


@dataclass(frozen=True)
class DeviceProfile:
    """One emulated device: its id, its place in the fleet (`index`, which client it holds) and its group's profile."""

    device_id: str
    index: int
    group: Group


@dataclass(frozen=True)
class DataSpec:
    """Which dataset the devices hold and how it is partitioned (one client per device)."""

    dataset: str = "digits"
    partition: str = "dirichlet"
    alpha: float = 0.5
    test_fraction: float = 0.2
    seed: int = 0

    def load(self, num_clients: int) -> tuple[ClientData, ClientDataset]:
        """The train clients (one per device) and the held-out test set (imports scikit-learn for digits)."""
        from fedge.simulation.datasets import digits

        return digits.load_data(num_clients=num_clients, partition=self.partition, alpha=self.alpha,
                                test_fraction=self.test_fraction, seed=self.seed)


@dataclass(frozen=True)
class Scenario:
    """A fleet: its id, its seed, its device groups and (optionally) its data."""

    fleet: str
    seed: int
    groups: tuple[Group, ...]
    data: DataSpec | None = None

    @property
    def devices(self) -> list[DeviceProfile]:
        """Every device, group by group: `<group>-000`, `<group>-001`, ..."""
        profiles = []
        for group in self.groups:
            width = max(3, len(str(group.count - 1)))
            for i in range(group.count):
                profiles.append(DeviceProfile(f"{group.name}-{i:0{width}d}", len(profiles), group))
        return profiles

    @property
    def num_devices(self) -> int:
        """How many devices the fleet has."""
        return sum(group.count for group in self.groups)

    def load_data(self) -> tuple[ClientData, ClientDataset]:
        """The clients of the scenario's [data] (one per device, in device order) and its test set."""
        if self.data is None:
            raise ScenarioError(f"scenario of fleet {self.fleet!r} has no [data] section; pass the clients explicitly")
        return self.data.load(self.num_devices)


def load_scenario(source: str | os.PathLike[str] | Mapping[str, Any]) -> Scenario:
    """Read and check a scenario from a TOML file or a dict; ScenarioError names the bad field."""
    if isinstance(source, Mapping):
        return _parse(source, "scenario")
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser, from PyPI (a desktop dependency there)
        import tomli as tomllib

    path = Path(source)
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except OSError as error:
        raise ScenarioError(f"scenario {path}: cannot read it: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ScenarioError(f"scenario {path}: invalid TOML: {error}") from None
    return _parse(table, f"scenario {path}")


def parse_bandwidth(value: Any, where: str = "bandwidth") -> float:
    """Bytes per second from a positive number or a string such as '1 MB/s' or '10 Mbit/s'."""
    if isinstance(value, str):
        match = _BANDWIDTH.fullmatch(value)
        if match is None or match.group(2) not in _UNITS:
            raise ScenarioError(f"{where} must be a number of bytes/s or a string like '1 MB/s' "
                                f"(units: {', '.join(_UNITS)}), got {value!r}")
        value = float(match.group(1)) * _UNITS[match.group(2)]
    if not _is_number(value) or not 0 < value < math.inf:
        raise ScenarioError(f"{where} must be positive, got {value!r}")
    return float(value)


class _Table:
    """Reads the fields of one TOML table, checking each, and refuses fields it was not asked for."""

    def __init__(self, table: Any, where: str) -> None:
        """Wrap `table` (which must be a table); `where` prefixes every error message."""
        if not isinstance(table, Mapping):
            raise ScenarioError(f"{where} must be a table, got {type(table).__name__}")
        self._table, self.where, self._read = table, where, set()

    def get(self, key: str, default: Any = None) -> Any:
        """The raw value of `key` (default when absent)."""
        self._read.add(key)
        return self._table.get(key, default)

    def error(self, key: str, message: str) -> ScenarioError:
        """An error about field `key`."""
        return ScenarioError(f"{self.where}: {key} {message}")

    def integer(self, key: str, default: int | None, minimum: int) -> int:
        """An integer field >= minimum (required when default is None)."""
        value = self.get(key, default)
        if value is None:
            raise self.error(key, "is required")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def number(self, key: str, default: float, low: float, high: float = math.inf, low_open: bool = False) -> float:
        """A number field in [low, high] (or (low, high] when low_open)."""
        value = self.get(key, default)
        if not _is_number(value) or not (low < value if low_open else low <= value) or not value <= high:
            bounds = f"{'>' if low_open else '>='} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
            raise self.error(key, f"must be a number {bounds}, got {value!r}")
        return float(value)

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        """A string field, one of `choices`."""
        value = self.get(key, default)
        if value not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def identifier(self, key: str, default: str | None, what: str) -> str:
        """A fleet or group name: one MQTT topic level (required when default is None)."""
        value = self.get(key, default)
        if value is None:
            raise self.error(key, "is required")
        try:
            return check_id(value, what)
        except ProtocolError as error:
            raise self.error(key, f"is invalid: {error}") from None

    def done(self) -> None:
        """Refuse any field that was not read (a typo, or a field of another table)."""
        unknown = sorted(set(self._table) - self._read)
        if unknown:
            raise ScenarioError(f"{self.where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                                f"known: {', '.join(sorted(self._read))}")


def _is_number(value: Any) -> bool:
    """Whether `value` is an int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse(table: Mapping[str, Any], where: str) -> Scenario:
    """Check a whole scenario table."""
    top = _Table(table, where)
    fleet = top.identifier("fleet", "simulation", "fleet")
    seed = top.integer("seed", 0, minimum=0)
    raw_groups = top.get("groups")
    if not isinstance(raw_groups, list) or not raw_groups:
        raise top.error("groups", f"must be a non-empty array of tables ([[groups]]), got {raw_groups!r:.80}")
    groups = tuple(_group(raw, f"{where}: groups[{i}]") for i, raw in enumerate(raw_groups))
    names = [group.name for group in groups]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise top.error("groups", f"names must be unique, {', '.join(map(repr, duplicates))} repeat(s)")
    raw_data = top.get("data")
    data = None if raw_data is None else _data(raw_data, f"{where}: data", seed)
    top.done()
    return Scenario(fleet, seed, groups, data)


def _group(raw: Any, where: str) -> Group:
    """Check one [[groups]] table."""
    table = _Table(raw, where)
    name = table.identifier("name", None, "group name")
    table.where = f"{where} ({name!r})"
    if len(name) > 50:
        raise table.error("name", f"must have at most 50 characters (device ids add a suffix), got {len(name)}")
    count = table.integer("count", None, minimum=1)
    speed = table.number("speed", 1.0, low=1.0)
    download, upload = (None if table.get(key) is None else parse_bandwidth(table.get(key), f"{table.where}: {key}")
                        for key in ("download", "upload"))
    availability = _availability(table)
    dropout = table.number("dropout", 0.0, low=0.0, high=1.0)
    downtime = table.number("downtime", DEFAULT_DOWNTIME_S, low=0.0, low_open=True)
    table.done()
    return Group(name, count, speed, download, upload, availability, dropout, downtime)


def _availability(table: _Table) -> Availability:
    """The group's availability windows and period."""
    raw = table.get("availability")
    period = table.get("period")
    if raw is None:
        if period is not None:
            raise table.error("period", "needs availability windows to repeat")
        return Availability()
    if not isinstance(raw, list) or not raw:
        raise table.error("availability", f"must be a non-empty list of [start, end] pairs, got {raw!r:.80}")
    windows = []
    for i, window in enumerate(raw):
        if (not isinstance(window, list) or len(window) != 2 or not all(map(_is_number, window))
                or not 0 <= window[0] < window[1] < math.inf):
            raise table.error(f"availability[{i}]",
                              f"must be [start, end] seconds with 0 <= start < end, got {window!r}")
        if windows and window[0] < windows[-1][1]:
            raise table.error(f"availability[{i}]", f"must start at or after the previous window's end "
                                                    f"({windows[-1][1]:g}), got {window!r}")
        windows.append((float(window[0]), float(window[1])))
    if period is not None:
        period = table.number("period", None, low=0.0, low_open=True)
        if windows[-1][1] > period:
            raise table.error("period", f"must be at least the last window's end ({windows[-1][1]:g}), got {period:g}")
    return Availability(tuple(windows), period)


def _data(raw: Any, where: str, seed: int) -> DataSpec:
    """Check the [data] table."""
    table = _Table(raw, where)
    spec = DataSpec(dataset=table.choice("dataset", "digits", DATASETS),
                    partition=table.choice("partition", "dirichlet", PARTITIONS),
                    alpha=table.number("alpha", 0.5, low=0.0, low_open=True),
                    test_fraction=table.number("test_fraction", 0.2, low=0.0, low_open=True, high=0.99),
                    seed=table.integer("seed", seed, minimum=0))
    table.done()
    return spec
