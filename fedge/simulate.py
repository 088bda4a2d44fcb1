"""`fedge simulate [JOB.toml]`: a job's federated rounds on an emulated fleet, end to end on one machine.

It loads the job's data and splits it over the fleet's devices, converts the model (unless the
job names a `.tflite`), starts a broker (embedded unless `--broker` names one), the MQTT server
and the simulated fleet, shows each round's reports, loss and held-out accuracy, and writes a
report folder (docs/simulator.md). Without a job file it runs the bundled digits job.
`fedge serve JOB.toml` runs the same job with real devices.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_runtime.cli import print_errors, stopping_on_signals
from fedge.job.load import JobError, load_job
from fedge.job.options import add_job_flags, job_overrides
from fedge.job.spec import Job
from fedge.simulation.datasets import ClientData

if TYPE_CHECKING:
    from fedge.job.build import HeldOutEvaluation, JobModel

SIMULATE_FLAGS = ("--rounds", "--clients-per-round", "--min-reports", "--deadline", "--over-selection", "--encoding",
                  "--topk", "--eval-every", "--seed", "--local-epochs", "--max-steps", "--max-seconds",
                  "--learning-rate", "--proximal-mu", "--client-weighting", "--server-optimizer",
                  "--server-learning-rate", "--server-momentum", "--aggregator", "--trim-fraction", "--clip-norm",
                  "--dp-noise-multiplier", "--dp-delta", "--dp-population", "--batch-size", "--eval-data", "--out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`fedge simulate`'s options: the job file, flags that override its keys, the broker, logging."""
    parser.add_argument("job", nargs="?", help="a job file (docs/job.md; default: the bundled 40-device digits job)")
    parser.add_argument("--broker", metavar="URL", dest="simulation_broker",
                        help="an external broker that takes anonymous clients (default: start an embedded one; "
                             "the job's [broker] is fedge serve's)")
    parser.add_argument("--embedded-broker", choices=["auto", "mosquitto", "amqtt"], default="auto",
                        help="which embedded broker: Mosquitto when installed, else amqtt (default: auto)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the stopped run in the report folder from its checkpoint (its metrics and "
                             "log are appended to; a larger --rounds extends a finished run)")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_job_flags(parser, SIMULATE_FLAGS)


@dataclass(frozen=True)
class Prepared:
    """What a simulation needs before anything is written: the devices' clients, the model, the evaluation."""

    clients: ClientData
    model: JobModel
    evaluation: HeldOutEvaluation | None


def simulate_command(args: argparse.Namespace) -> int:
    """Load the job and its data and model, refuse what cannot run (exit 2, every problem on its own line), then
    claim the report folder and simulate."""
    from fedge.report import ReportFolderError, claim_report_folder, reopen_report_folder

    try:
        job = load_job(args.job, job_overrides(args))
        problems = job.simulation_problems()
        if problems:
            raise JobError(problems)
        prepared = prepare(job)
        if args.resume:
            out = reopen_report_folder(job.output.simulation)
        else:
            out = claim_report_folder(job.output.simulation)  # only once everything else is known to be sound
    except (JobError, ReportFolderError, ValueError, TypeError, OSError) as error:
        print_errors("fedge simulate", error)
        return 2
    return run_simulation(job, prepared, out, broker_url=args.simulation_broker,
                          embedded_broker=args.embedded_broker, log_level=args.log_level)


def prepare(job: Job) -> Prepared:
    """The job's clients (one per device), model (converted unless a .tflite) and held-out evaluation, with every
    device's examples and the held-out ones checked against the model; JobError or ValueError naming the problem."""
    from fedge.job.build import build_evaluation, build_model, check_fits

    started = time.perf_counter()
    clients, held_out = job.data.load(job.fleet.num_devices, job.rounds.seed)
    model = build_model(job)
    for client_id in clients.client_ids:
        check_fits(job, clients.create_dataset_for_client(client_id), model.artifact,
                   f"the examples of client {client_id} of {job.data.source}")
    evaluation = build_evaluation(job, model.artifact, held_out)
    manifest = model.artifact.manifest
    print(f"{'converted' if job.model.converts else 'loaded'} {manifest.model_name} ({manifest.num_parameters:,} "
          f"parameters, {len(model.artifact.tflite_bytes):,}-byte trainable .tflite) in "
          f"{time.perf_counter() - started:.1f} s; {job.fleet.num_devices} devices in {len(job.fleet.groups)} "
          f"group{'s' if len(job.fleet.groups) != 1 else ''}, "
          f"{'no' if held_out is None else len(held_out)} held-out examples")
    return Prepared(clients, model, evaluation)


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


def run_simulation(job: Job, prepared: Prepared, out: Path, *, broker_url: str | None = None,
                   embedded_broker: str = "auto", log_level: str = "WARNING") -> int:
    """Simulate `job` into the report folder `out` (from its checkpoint when there is one: a resumed run);
    0 when its rounds ran, 1 when every round failed or the broker could not be reached, 128 + the signal when
    SIGINT or SIGTERM stopped it (the report then holds the rounds that finished)."""
    from rich.console import Console

    from device_runtime.connection import BrokerSettings
    from fedge.job.build import build_executor, build_process, build_server
    from fedge.report import CHECKPOINTS, METRICS_LOG, SIMULATION_LOG
    from fedge.server.metrics_log import read_metrics_log
    from simulator.fleet import Fleet

    # Devices dropping out and coming back log what happened to them: into the report folder, not over the progress
    # (force: converting the model imported absl, whose handler on the root logger would print to the terminal).
    logging.basicConfig(level=log_level, filename=out / SIMULATION_LOG,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    console = Console(soft_wrap=True)  # a round is one line, also when the output is piped
    artifact = prepared.model.artifact
    with _broker(broker_url, embedded_broker) as url:
        try:
            executor = build_executor(job, BrokerSettings(url))
            process = build_process(job, artifact, executor)
            server = build_server(job, process, executor, out / CHECKPOINTS, out / METRICS_LOG, prepared.evaluation,
                                  on_round=lambda line: show_round(line),  # the progress below, once it is shown
                                  keras_model=prepared.model.keras_model)
        except JobError as error:
            print_errors("fedge simulate", error)
            return 2
        start = server.start_state().round_num
        if start:
            console.print(f"resuming from {server.checkpoints.path}: {start} of {job.rounds.count} rounds done")
        fleet = Fleet(job.fleet.scenario(job.rounds.seed), url, prepared.clients)
        fleet.start()
        try:
            with (executor, stopping_on_signals(server.stop) as signals,
                  _progress(console, job.rounds.count, start) as show_round):
                state = server.run()
        except ConnectionError as error:
            print_errors("fedge simulate", error)
            return 1
        finally:
            fleet.stop()
    rounds = read_metrics_log(out / METRICS_LOG) if (out / METRICS_LOG).exists() else []
    _report(console, out, rounds, fleet, prepared.model.keras_model, process.get_model_weights(state).to_list(),
            job.summary())
    if signals:
        console.print(f"stopped by {signal.Signals(signals[0]).name} after {state.round_num} of {job.rounds.count} "
                      f"rounds; the same command with --resume continues it")
        return 128 + signals[0]
    return 1 if server.rounds_run and server.rounds_failed == server.rounds_run else 0


@contextlib.contextmanager
def _progress(console: Any, total: int, done: int) -> Iterator[Any]:
    """A progress bar over the rounds (`done` of them already) with the time left; yields the callback that prints
    a round's line and advances it."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from fedge.server.reports import surplus_and_refused

    with Progress(TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"),
                  console=console) as progress:
        bar = progress.add_task("", total=total, completed=done)

        def on_round(record: dict[str, Any]) -> None:
            surplus, refused = surplus_and_refused(record["dropped"])
            if record["outcome"] == "completed":
                outcome = (f"loss {record.get('train_loss', math.nan):.3f} acc "
                           f"{record.get('train_accuracy', math.nan):.3f}  held-out "
                           f"{record.get('eval_accuracy', math.nan):.3f}")
            else:
                outcome = f"{record['outcome'].upper()}: weights unchanged"
            progress.console.print(
                f"round {record['round']:3d}  reports {record['accepted']:2d}/{record['selected']:<2d} "
                f"surplus {surplus:2d}" + (f" [red]refused {refused}[/red]" if refused else "") + f"  {outcome}"
                f"  {(record['bytes_up'] + record['bytes_down']) / 1e3:4.0f} kB {record['seconds']:4.1f} s"
                + (f"  epsilon {record['dp_epsilon']:.2f}" if "dp_epsilon" in record else ""),
                highlight=False)
            progress.update(bar, advance=1, description=f"held-out accuracy {record.get('eval_accuracy', 0):.3f}")

        yield on_round


def _report(console: Any, out: Path, rounds: list[dict[str, Any]], fleet: Any, keras_model: Any, weights: list[Any],
            caption: str) -> None:
    """Plots (captioned with the job) and the final model into the report folder, and the run's summary on the
    console."""
    from fedge.report import write_report

    written = write_report(out, rounds, keras_model, weights, caption)
    totals = fleet.totals()
    final = rounds[-1] if rounds else {}
    failed = sum(record["outcome"] == "failed" for record in rounds)
    console.print(f"{len(rounds)} rounds ({failed} failed); held-out accuracy "
                  f"{final.get('eval_accuracy', math.nan):.3f}; devices trained {totals.rounds_trained} times, "
                  f"{totals.rounds_dropped} dropped out mid-round")
    console.print(f"report: {out}/ ({', '.join(path.name for path in sorted(written))})")
