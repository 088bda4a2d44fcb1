"""Fleets of emulated edge devices, each a real MQTT client running device_runtime's protocol and training.

`Fleet.from_scenario("simulator/scenarios/fleet_1000.toml", "mqtt://localhost:1883")` builds the
devices a scenario file describes (groups with compute speed, bandwidth, availability
windows, dropout, and a data partition), `Fleet.from_job(job, url)` a job file's [fleet] holding
its [data]; `start()` connects them as their windows open,
`stop()` takes them offline. Thousands of devices share a few asyncio loop threads (paho's
external-loop API) and a small pool of training workers. Never imports TensorFlow.
"""

from simulator.device import DeviceStats
from simulator.fleet import Fleet
from simulator.scenario import Availability, DataSpec, DeviceProfile, Group, Scenario, ScenarioError, load_scenario

__all__ = [
    "Availability",
    "DataSpec",
    "DeviceProfile",
    "DeviceStats",
    "Fleet",
    "Group",
    "Scenario",
    "ScenarioError",
    "load_scenario",
]
