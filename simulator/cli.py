"""`python -m simulator`: run the fleet of a scenario or a job file against a broker until stopped.

`fedge simulate JOB.toml` runs a whole job (broker, server and fleet); this runs only its devices, for a
server started elsewhere (`fedge serve JOB.toml`), or the devices of a plain scenario file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_runtime.cli import (LOG_LEVELS, ArgumentParser, add_broker_credentials, add_debug_flag, broker_password,
                                positive, print_errors, run_command, stop_on_signals)

if TYPE_CHECKING:
    from simulator.fleet import Fleet

logger = logging.getLogger("simulator.cli")


DESCRIPTION = ("Emulate a fleet of edge devices (a scenario file, or a job file's [fleet] holding its [data]) as "
               "real MQTT clients against a broker.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `python -m simulator`."""
    parser.add_argument("scenario", help="a scenario file (e.g. simulator/scenarios/fleet_1000.toml) or a job file")
    parser.add_argument("--broker", required=True, metavar="URL", help="mqtt://host[:port] or mqtts://host[:port]")
    add_broker_credentials(parser, username_help="MQTT user name of every device")
    parser.add_argument("--server-public-key", metavar="PEM",
                        help="the server's Ed25519 public key: devices run only tasks it signed (fedge signing-key)")
    parser.add_argument("--duration", type=positive(float), metavar="SECONDS",
                        help="stop after this long (default: run until SIGTERM or Ctrl-C)")
    parser.add_argument("--workers", type=int, metavar="N", help="training worker threads (default: one per core)")
    parser.add_argument("--report-every", type=positive(float), default=10.0, metavar="SECONDS",
                        help="print the fleet's counters this often (default: %(default)s)")
    parser.add_argument("--stats", metavar="PATH", help="write every device's final counters to this JSON file")
    parser.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                        help="logging verbosity (default: %(default)s)")
    add_debug_flag(parser)


def main(argv: Sequence[str] | None = None, prog: str = "python -m simulator") -> int:
    """Parse the arguments and run the fleet (see run)."""
    parser = ArgumentParser(prog=prog, description=DESCRIPTION)
    add_arguments(parser)
    return run_command(parser.parse_args(argv), lambda args: run(args, prog))


def run(args: argparse.Namespace, prog: str = "python -m simulator") -> int:
    """Run the fleet until the duration ends or SIGTERM/SIGINT; 0 after a clean stop, 2 for bad arguments."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        password = broker_password(args)
    except ValueError as error:
        print_errors(prog, error)
        return 2

    from device_runtime.signing import load_public_key  # after parsing: --help stays fast

    try:
        public_key = None if args.server_public_key is None else load_public_key(args.server_public_key)
        fleet = _fleet(args.scenario, args.broker, username=args.username, password=password, tls_ca=args.tls_ca,
                       tls_cert=args.tls_cert, tls_key=args.tls_key, workers=args.workers,
                       server_public_key=public_key)
    except (ValueError, TypeError, OSError) as error:
        print_errors(prog, error)
        return 2

    stop = stop_on_signals()
    total = fleet.scenario.num_devices
    print(f"fleet {fleet.scenario.fleet!r}: {total} devices in {len(fleet.scenario.groups)} group(s) -> {args.broker}",
          flush=True)
    start = time.monotonic()
    fleet.start()
    all_connected = False
    next_report = start + args.report_every
    end = None if args.duration is None else start + args.duration
    while not stop.wait(0.05):
        now = time.monotonic()
        if not all_connected and fleet.connected_count() == total:
            all_connected = True
            print(f"all {total} devices connected after {now - start:.2f} s", flush=True)
        if now >= next_report:
            print(_progress(fleet, now - start), flush=True)
            next_report += args.report_every
        if end is not None and now >= end:
            break
    fleet.stop()
    print(_progress(fleet, time.monotonic() - start), flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump({device: dataclasses.asdict(stats) for device, stats in fleet.stats().items()}, f, indent=1)
    return 0


def _fleet(path: str, broker_url: str, **options: Any) -> Fleet:
    """The fleet of a job file (it has a [model]) or of a scenario file."""
    from fedge.job.load import load_job
    from fedge.tables import read_toml
    from simulator.fleet import Fleet

    if "model" in read_toml(Path(path), "scenario or job"):
        return Fleet.from_job(load_job(path), broker_url, **options)
    return Fleet.from_scenario(path, broker_url, **options)


def _progress(fleet: Fleet, elapsed: float) -> str:
    """One line of fleet counters."""
    totals = fleet.totals()
    return (f"t={elapsed:7.1f} s  connected {fleet.connected_count()}/{fleet.scenario.num_devices}  "
            f"trained {totals.rounds_trained}  dropped {totals.rounds_dropped}  updates {totals.updates_published}  "
            f"down {totals.bytes_down / 1e6:.1f} MB  up {totals.bytes_up / 1e6:.1f} MB")


