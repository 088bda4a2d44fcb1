"""`fedge simulate [JOB.toml]`: a job's federated rounds on an emulated fleet, end to end on one machine.

It loads the job's data and splits it over the fleet's devices, converts the model (unless the
job names a `.tflite`), starts a broker (embedded unless the job or `--broker` names one), the
MQTT server and the simulated fleet, shows each round's reports, loss and held-out accuracy,
and writes a report folder (docs/simulator.md). Without a job file it runs the bundled digits job.
`fedge serve JOB.toml` runs the same job with real devices.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedge.job.load import JobError, load_job
from fedge.job.options import add_job_flags, job_overrides
from fedge.job.spec import Job

SIMULATE_FLAGS = ("--broker", "--rounds", "--clients-per-round", "--min-reports", "--deadline", "--over-selection",
                  "--encoding", "--topk", "--eval-every", "--seed", "--local-epochs", "--max-steps", "--max-seconds",
                  "--learning-rate", "--proximal-mu", "--client-weighting", "--server-optimizer",
                  "--server-learning-rate", "--server-momentum", "--aggregator", "--trim-fraction", "--clip-norm",
                  "--dp-noise-multiplier", "--dp-delta", "--dp-population", "--batch-size", "--out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`fedge simulate`'s options: the job file, flags that override its keys, the embedded broker, logging."""
    parser.add_argument("job", nargs="?", help="a job file (docs/job.md; default: the bundled 40-device digits job)")
    parser.add_argument("--embedded-broker", choices=["auto", "mosquitto", "amqtt"], default="auto",
                        help="which embedded broker: Mosquitto when installed, else amqtt (default: auto)")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_job_flags(parser, SIMULATE_FLAGS)


def simulate_command(args: argparse.Namespace) -> int:
    """Load the job, refuse what cannot run (exit 2, every problem on its own line), then simulate it."""
    from fedge.report import ReportFolderError, claim_report_folder

    try:
        job = load_job(args.job, job_overrides(args))
        problems = simulation_problems(job)
        if problems:
            raise JobError(problems)
        out = claim_report_folder(job.output.simulation)  # only after everything else is known to be sound
    except (JobError, ReportFolderError) as error:
        print("\n".join(f"fedge simulate: error: {line}" for line in str(error).splitlines()), file=sys.stderr)
        return 2
    return run_simulation(job, out, embedded_broker=args.embedded_broker, log_level=args.log_level)


def simulation_problems(job: Job) -> list[str]:
    """What a job lacks to be simulated: data for its devices and a fleet of them."""
    problems = []
    if job.data.dataset is None and job.data.npz is None and job.data.folder is None:
        problems.append(f"{job.where}: [data] is required to simulate: dataset, npz or folder (docs/job.md)")
    if not job.fleet.groups:
        problems.append(f"{job.where}: fleet.groups (or fleet.scenario) is required to simulate: the devices to "
                        f"emulate (docs/job.md)")
    return problems


@contextlib.contextmanager
def _broker(url: str | None, kind: str) -> Iterator[str]:
    """The given broker URL, or an embedded broker's for the duration of the block."""
    if url is not None:
        yield url
        return
    from fedge.broker import EmbeddedBroker

    with EmbeddedBroker(kind) as broker:
        print(f"embedded {broker.kind} broker on {broker.url}")
        yield broker.url


def run_simulation(job: Job, out: Path, *, embedded_broker: str = "auto", log_level: str = "WARNING") -> int:
    """Simulate `job` into the report folder `out`; 0 when its rounds ran, 1 when every round failed, 2 when its
    data or model cannot be used (one line each on stderr)."""
    from fedge.report import CHECKPOINTS, METRICS_LOG, SIMULATION_LOG

    # Devices dropping out and coming back log what happened to them: into the report folder, not over the progress.
    logging.basicConfig(level=log_level, filename=out / SIMULATION_LOG,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rich.console import Console

    from fedge.job.build import build_broker, build_executor, build_model, build_process, build_server
    from fedge.learning.federated_data import local_clients
    from simulator.fleet import Fleet

    console = Console(soft_wrap=True)  # a round is one line, also when the output is piped
    started = time.perf_counter()
    try:
        train_clients, held_out = job.data.load(job.fleet.num_devices, job.rounds.seed)
        model = build_model(job)
        artifact = model.artifact
        local_clients([train_clients.create_dataset_for_client(cid) for cid in train_clients.client_ids],
                      artifact.manifest)  # every device's data fits the model, or the job stops here
    except (JobError, ValueError, TypeError, OSError) as error:
        print("\n".join(f"fedge simulate: error: {line}" for line in str(error).splitlines()), file=sys.stderr)
        return 2
    what = "converted" if job.model.converts else "loaded"
    console.print(f"{what} {artifact.manifest.model_name} ({artifact.manifest.num_parameters:,} parameters, "
                  f"{len(artifact.tflite_bytes):,}-byte trainable .tflite) in {time.perf_counter() - started:.1f} s; "
                  f"{job.fleet.num_devices} devices in {len(job.fleet.groups)} groups, "
                  f"{'no' if held_out is None else len(held_out)} held-out examples")
    rounds: list[dict[str, Any]] = []
    with _broker(job.broker.url, embedded_broker) as url:
        try:
            executor = build_executor(job, build_broker(job, url))
            process = build_process(job, artifact, executor)
            fleet = Fleet(job.fleet.scenario(job.rounds.seed), url, train_clients)  # the clients checked above
            with _progress(console, job.rounds.count) as on_round:
                def record(line: dict[str, Any]) -> None:
                    rounds.append(line)
                    on_round(line)

                server = build_server(job, process, executor, out / CHECKPOINTS, out / METRICS_LOG, held_out,
                                      on_round=record)
                fleet.start()
                try:
                    with executor:
                        state = server.run()
                finally:
                    fleet.stop()
        except (JobError, ValueError) as error:
            print("\n".join(f"fedge simulate: error: {line}" for line in str(error).splitlines()), file=sys.stderr)
            return 2
        except ConnectionError as error:
            print(f"fedge simulate: error: {error}", file=sys.stderr)
            return 1
    _report(console, out, rounds, server, fleet, model.keras_model, process.get_model_weights(state).to_list())
    return 1 if server.rounds_run and server.rounds_failed == server.rounds_run else 0


@contextlib.contextmanager
def _progress(console: Any, total: int) -> Iterator[Any]:
    """A progress bar over the rounds; yields the callback that prints a round's line and advances it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console) as progress:
        bar = progress.add_task("", total=total)

        def on_round(record: dict[str, Any]) -> None:
            dropped = sum(record["dropped"].values())
            if record["outcome"] == "completed":
                outcome = (f"loss {record.get('train_loss', math.nan):.3f} acc "
                           f"{record.get('train_accuracy', math.nan):.3f}  held-out "
                           f"{record.get('eval_accuracy', math.nan):.3f}")
            else:
                outcome = f"{record['outcome'].upper()}: weights unchanged"
            progress.console.print(
                f"round {record['round']:3d}  reports {record['accepted']:2d}/{record['selected']:<2d} "
                f"dropped {dropped:2d}  {outcome}"
                f"  {(record['bytes_up'] + record['bytes_down']) / 1e3:4.0f} kB {record['seconds']:4.1f} s"
                + (f"  epsilon {record['dp_epsilon']:.2f}" if "dp_epsilon" in record else ""),
                highlight=False)
            progress.update(bar, advance=1, description=f"held-out accuracy {record.get('eval_accuracy', 0):.3f}")

        yield on_round


def _report(console: Any, out: Path, rounds: list[dict[str, Any]], server: Any, fleet: Any, keras_model: Any,
            weights: list[Any]) -> None:
    """Plots and the final model into the report folder, and the run's summary on the console."""
    from fedge.report import write_report

    written = write_report(out, rounds, keras_model, weights)
    totals = fleet.totals()
    final = rounds[-1] if rounds else {}
    console.print(f"{len(rounds)} rounds ({server.rounds_failed} failed); held-out accuracy "
                  f"{final.get('eval_accuracy', math.nan):.3f}; devices trained {totals.rounds_trained} times, "
                  f"{totals.rounds_dropped} dropped out mid-round")
    console.print(f"report: {out}/ ({', '.join(path.name for path in sorted(written))})")
