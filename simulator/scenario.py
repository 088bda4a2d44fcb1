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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_runtime.protocol import check_id
from fedge.simulation.data_spec import DataSpec, parse_data
from fedge.tables import Table, TableErrors, is_number, read_toml

if TYPE_CHECKING:
    from fedge.simulation.datasets import ClientData, ClientDataset

DEFAULT_DOWNTIME_S = 30.0
_UNITS = {"B/s": 1.0, "kB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9, "kbit/s": 125.0, "Mbit/s": 125e3, "Gbit/s": 125e6}
_BANDWIDTH = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]+)\s*")


class ScenarioError(TableErrors):
    """A scenario that cannot be used; each line of the message names the file and the field."""


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

    def load_data(self) -> tuple[ClientData, ClientDataset | None]:
        """The clients of the scenario's [data] (one per device, in device order) and its held-out examples."""
        if self.data is None:
            raise ScenarioError([f"scenario of fleet {self.fleet!r} has no [data] section; pass the clients explicitly"])
        return self.data.load(self.num_devices, self.seed)


def load_scenario(source: str | os.PathLike[str] | Mapping[str, Any]) -> Scenario:
    """Read and check a scenario from a TOML file or a dict; ScenarioError lists every bad field, each named.

    Paths in its [data] are relative to the file's folder (to the working directory for a dict)."""
    if isinstance(source, Mapping):
        document, where, base_dir = source, "scenario", Path.cwd()
    else:
        try:
            document = read_toml(Path(source), "scenario")
        except TableErrors as error:
            raise ScenarioError(error.errors) from None
        where, base_dir = f"scenario {source}", Path(source).parent
    errors: list[str] = []
    scenario = parse_scenario(Table(document, where, "", errors), base_dir)
    if errors:
        raise ScenarioError(errors)
    return scenario


def parse_bandwidth(value: Any) -> float:
    """Bytes per second from a positive number or a string such as '1 MB/s' or '10 Mbit/s'; ValueError otherwise."""
    if isinstance(value, str):
        match = _BANDWIDTH.fullmatch(value)
        if match is None or match.group(2) not in _UNITS:
            raise ValueError(f"must be a number of bytes/s or a string like '1 MB/s' (units: {', '.join(_UNITS)}), "
                             f"got {value!r}")
        value = float(match.group(1)) * _UNITS[match.group(2)]
    if not is_number(value) or not 0 < value < math.inf:
        raise ValueError(f"must be positive, got {value!r}")
    return float(value)


def parse_scenario(top: Table, base_dir: Path) -> Scenario:
    """A whole scenario table (errors go to the table's list; a placeholder stands in for a bad value)."""
    fleet = top.checked("fleet", "simulation", lambda v: check_id(v, "fleet"), "a fleet id")
    seed = top.integer("seed", 0, minimum=0)
    groups = parse_groups(top)
    data = parse_data(top.table("data"), base_dir) if top.has("data") else None
    top.done()
    return Scenario(fleet, seed, groups, data)


def parse_groups(top: Table) -> tuple[Group, ...]:
    """The `[[groups]]` of a table: at least one, unique names."""
    raw = top.get("groups")
    if not isinstance(raw, list) or not raw:
        top.error("groups", f"must be a non-empty array of tables ([[groups]]), got {raw!r:.80}")
        return ()
    groups = tuple(_group(table) for table in top.tables("groups"))
    names = [group.name for group in groups]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        top.error("groups", f"names must be unique, {', '.join(map(repr, duplicates))} repeat(s)")
    return groups


def _group(table: Table) -> Group:
    """One [[groups]] table."""
    for key in ("name", "count"):
        if not table.has(key):
            table.error(key, "is required")
    name = table.checked("name", "group", lambda v: check_id(v, "group name"), "a group name")
    if len(name) > 50:
        table.error("name", f"must have at most 50 characters (device ids add a suffix), got {len(name)}")
    count = table.integer("count", 1, minimum=1)
    speed = table.number("speed", 1.0, low=1.0)
    download, upload = (table.checked(key, None, parse_bandwidth, "a bandwidth") for key in ("download", "upload"))
    availability = _availability(table)
    dropout = table.number("dropout", 0.0, low=0.0, high=1.0)
    downtime = table.number("downtime", DEFAULT_DOWNTIME_S, low=0.0, low_open=True)
    table.done()
    return Group(name, count, speed, download, upload, availability, dropout, downtime)


def _availability(table: Table) -> Availability:
    """The group's availability windows and period."""
    raw = table.get("availability")
    period = table.get("period")
    if raw is None:
        if period is not None:
            table.error("period", "needs availability windows to repeat")
        return Availability()
    if not isinstance(raw, list) or not raw:
        table.error("availability", f"must be a non-empty list of [start, end] pairs, got {raw!r:.80}")
        return Availability()
    windows: list[tuple[float, float]] = []
    for i, window in enumerate(raw):
        if (not isinstance(window, list) or len(window) != 2 or not all(map(is_number, window))
                or not 0 <= window[0] < window[1] < math.inf):
            table.error(f"availability[{i}]", f"must be [start, end] seconds with 0 <= start < end, got {window!r}")
            return Availability()
        if windows and window[0] < windows[-1][1]:
            table.error(f"availability[{i}]", f"must start at or after the previous window's end "
                                              f"({windows[-1][1]:g}), got {window!r}")
            return Availability()
        windows.append((float(window[0]), float(window[1])))
    if period is not None:
        period = table.number("period", None, low=0.0, low_open=True)
        if period is not None and windows[-1][1] > period:
            table.error("period", f"must be at least the last window's end ({windows[-1][1]:g}), got {period:g}")
            return Availability()
    return Availability(tuple(windows), period)
