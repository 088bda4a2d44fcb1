"""A fleet of emulated devices from a scenario: few loop threads for many MQTT clients, one shared training pool."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from device_runtime.connection import TlsFiles, parse_broker_url
from device_runtime.data import load_local_data
from device_runtime.interpreter import default_num_threads
from device_runtime.signing import Ed25519PublicKey
from simulator.device import DeviceContext, DeviceStats, SimulatedDevice
from simulator.network import LoopThread
from simulator.scenario import Scenario, load_scenario
from simulator.trainer import TrainerPool

if TYPE_CHECKING:
    from collections.abc import Mapping

    from fedge.job.spec import Job
    from fedge.simulation.datasets import ClientData

logger = logging.getLogger(__name__)

DEVICES_PER_LOOP = 250
CONNECTOR_THREADS = 8
_SPARE_FILES = 64


class Fleet:
    """The devices of a scenario, each a real MQTT client, sharing a few loop threads and a training pool."""

    def __init__(self, scenario: Scenario, broker_url: str, client_data: ClientData, *,
                 username: str | None = None, password: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, workers: int | None = None,
                 devices_per_loop: int = DEVICES_PER_LOOP, server_public_key: Ed25519PublicKey | None = None) -> None:
        """Check the arguments and give device i the i-th client of `client_data`; nothing connects before start().

        With `server_public_key` every device runs only tasks signed by that key."""
        if len(client_data) < scenario.num_devices:
            raise ValueError(f"the scenario has {scenario.num_devices} devices but the client data holds only "
                             f"{len(client_data)} clients (one per device)")
        for name, value in (("workers", workers), ("devices_per_loop", devices_per_loop)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        tls_files = None if (tls_ca, tls_cert, tls_key) == (None, None, None) else TlsFiles(tls_ca, tls_cert, tls_key)
        if tls_files is not None:
            tls_files.check()
        self.scenario = scenario
        self._broker = parse_broker_url(broker_url)
        self._credentials = (username, password, tls_files)
        self._server_public_key = server_public_key
        self._workers = workers or default_num_threads()
        self._devices_per_loop = devices_per_loop
        client_ids = client_data.client_ids
        self._data = [load_local_data(client_data.create_dataset_for_client(client_ids[i]).as_tuple())
                      for i in range(scenario.num_devices)]
        self._devices: list[SimulatedDevice] = []
        self._loops: list[LoopThread] = []
        self._connector: ThreadPoolExecutor | None = None
        self._trainer: TrainerPool | None = None
        self._final_stats: dict[str, DeviceStats] = {}

    @classmethod
    def from_scenario(cls, scenario: str | os.PathLike[str] | Mapping[str, Any] | Scenario, broker_url: str, *,
                      client_data: ClientData | None = None, **options: Any) -> Fleet:
        """A fleet from a scenario file, dict or Scenario; clients from its [data] unless `client_data` is given."""
        if not isinstance(scenario, Scenario):
            scenario = load_scenario(scenario)
        if client_data is None:
            client_data, _ = scenario.load_data()
        return cls(scenario, broker_url, client_data, **options)

    @classmethod
    def from_job(cls, job: Job, broker_url: str, **options: Any) -> Fleet:
        """The fleet of a job ([fleet] groups), each device holding one client of its [data] (seeded choice);
        ValueError, one line per problem, when the job cannot be simulated."""
        problems = job.simulation_problems()
        if problems:
            raise ValueError("\n".join(problems))
        client_data, _ = job.data.load(job.fleet.num_devices, job.rounds.seed)
        return cls(job.fleet.scenario(job.rounds.seed), broker_url, client_data, **options)

    @property
    def device_ids(self) -> list[str]:
        """Every device id, in scenario order."""
        return [profile.device_id for profile in self.scenario.devices]

    def start(self) -> None:
        """Start the loop threads and the training pool; each device connects when its availability window opens."""
        if self._devices:
            raise RuntimeError("the fleet is already started")
        profiles = self.scenario.devices
        loops = math.ceil(len(profiles) / self._devices_per_loop)
        _ensure_open_files(len(profiles) + CONNECTOR_THREADS + 3 * loops + _SPARE_FILES)
        self._trainer = TrainerPool(self._workers)
        self._connector = ThreadPoolExecutor(CONNECTOR_THREADS, thread_name_prefix="fedge-sim-connect")
        self._loops = [LoopThread(f"fedge-sim-loop-{i}") for i in range(loops)]
        username, password, tls_files = self._credentials
        context = DeviceContext(self.scenario.fleet, self.scenario.seed, self._broker, self._connector,
                                self._trainer, time.monotonic(), username, password, tls_files,
                                self._server_public_key)
        self._devices = [SimulatedDevice(profile, data, context, self._loops[i // self._devices_per_loop])
                         for i, (profile, data) in enumerate(zip(profiles, self._data))]
        for loop in self._loops:
            loop.start()
            loop.submit(_start(self._on(loop)))
        logger.info("fleet %s: %d devices on %d loop thread(s), %d training worker(s), broker %s:%d",
                    self.scenario.fleet, len(profiles), loops, self._workers, self._broker.host, self._broker.port)

    def stop(self, timeout: float = 30.0) -> None:
        """Abandon rounds in progress, take every device offline cleanly (status 'offline'), stop the threads.

        Devices not offline within `timeout` seconds (a broker that stopped answering, say) are
        named in an error log and their connections dropped, so stop() always returns.
        """
        if not self._devices:
            return
        pending = [loop.submit(_shut_down(self._on(loop))) for loop in self._loops]
        _, late = wait(pending, timeout)
        if late:
            stuck = [device.device_id for device in self._devices if not device.stopped]
            logger.error("fleet %s: %d device(s) not offline within %.0f s, dropping their connections: %s",
                         self.scenario.fleet, len(stuck), timeout, ", ".join(stuck[:20]))
        for loop in self._loops:
            loop.stop()
        for device in self._devices:
            device.drop_connection()
        self._connector.shutdown(wait=True, cancel_futures=True)
        self._trainer.close()
        self._final_stats = self.stats()
        self._devices, self._loops = [], []

    def connected_count(self) -> int:
        """How many devices are connected to the broker now."""
        return sum(device.connected for device in self._devices)

    def wait_connected(self, count: int | None = None, timeout: float = 60.0) -> bool:
        """Wait until at least `count` devices (default: all) are connected; False on timeout."""
        count = self.scenario.num_devices if count is None else count
        end = time.monotonic() + timeout
        while self.connected_count() < count:
            if time.monotonic() > end:
                return False
            time.sleep(0.05)
        return True

    def stats(self) -> dict[str, DeviceStats]:
        """A snapshot of every device's counters, by device id (the final ones after stop())."""
        if not self._devices:
            return dict(self._final_stats)
        return {device.device_id: dataclasses.replace(device.stats) for device in self._devices}

    def totals(self) -> DeviceStats:
        """The counters summed over the fleet."""
        total = DeviceStats()
        for stats in self.stats().values():
            for field in dataclasses.fields(DeviceStats):
                setattr(total, field.name, getattr(total, field.name) + getattr(stats, field.name))
        return total

    def __enter__(self) -> Fleet:
        """Start the fleet."""
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the fleet."""
        self.stop()

    def _on(self, loop: LoopThread) -> list[SimulatedDevice]:
        """The devices living on `loop`."""
        index = self._loops.index(loop)
        return self._devices[index * self._devices_per_loop:(index + 1) * self._devices_per_loop]


async def _start(devices: list[SimulatedDevice]) -> None:
    """Start every device's life on the running loop."""
    for device in devices:
        device.start()


async def _shut_down(devices: list[SimulatedDevice]) -> None:
    """Take the devices offline concurrently."""
    await asyncio.gather(*(device.shutdown() for device in devices), return_exceptions=True)


def _ensure_open_files(needed: int) -> None:
    """Raise this process's soft limit of open files to `needed` (one socket per device); error above the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(f"the fleet needs {needed} open files (one socket per device) but the hard limit is "
                           f"{hard}; raise it (ulimit -Hn, or LimitNOFILE= in a systemd unit)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    logger.info("raised the soft limit of open files from %d to %d", soft, needed)
