"""`fedge serve JOB.toml | MODEL`: a job's federated rounds over MQTT with real devices, until done or stopped.

The job is a job file (the one `fedge simulate` runs), or a model (a `.tflite` artifact, or a
`.keras` model to convert) with flags for the rest. SIGINT (Ctrl-C) and SIGTERM stop the
server: the round in progress is abandoned and the checkpoint keeps the state after the last
finished round, so the same command resumes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from device_runtime.cli import PASSWORD_ENV, print_errors, stopping_on_signals
from fedge.job.load import JobError, load_job, parse_job
from fedge.job.options import add_job_flags, job_overrides
from fedge.job.spec import Job

logger = logging.getLogger("fedge.serve")

SERVE_FLAGS = ("--broker", "--fleet", "--rounds", "--clients-per-round", "--min-reports", "--deadline",
               "--over-selection", "--checkin-timeout", "--encoding", "--topk", "--eval-every", "--seed",
               "--local-epochs", "--max-steps", "--max-seconds", "--learning-rate", "--proximal-mu",
               "--client-weighting", "--server-optimizer", "--server-learning-rate", "--server-momentum",
               "--aggregator", "--trim-fraction", "--clip-norm", "--dp-noise-multiplier", "--dp-delta",
               "--dp-population", "--loss", "--batch-size", "--eval-data", "--checkpoint-dir", "--metrics-log",
               "--username", "--tls-ca", "--tls-cert", "--tls-key", "--signing-key")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`fedge serve`'s options."""
    parser.add_argument("job", metavar="JOB_OR_MODEL",
                        help="a job file (.toml, docs/job.md), a trainable .tflite artifact, or a .keras model to "
                             "convert first")
    parser.add_argument("--password", help=f"MQTT password (prefer the {PASSWORD_ENV} environment variable)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_job_flags(parser, SERVE_FLAGS)


def load_serve_job(source: str, overrides: list[tuple[str, object]]) -> Job:
    """The job to serve: a job file with the overrides, or a job made of a model file and the overrides alone."""
    path = Path(source)
    if path.suffix == ".toml":
        return load_job(path, overrides)
    if path.suffix not in (".tflite", ".keras"):
        raise JobError([f"{source}: expected a job file (.toml), a trainable .tflite artifact or a .keras model"])
    if not any(key == "fleet.id" for key, _ in overrides):
        raise JobError(["--fleet is required to serve a model file (a job file names its fleet in [fleet] id)"])
    model_key = "model.tflite" if path.suffix == ".tflite" else "model.keras"
    return parse_job({"name": path.stem}, None, Path.cwd(), [(model_key, str(path.absolute())), *overrides])


def serve_command(args: argparse.Namespace) -> int:
    """Run the server; 0 when the rounds are done or it was stopped, 1 without a broker or when every round
    of this run failed, 2 for a job that cannot run (every problem on its own line)."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from fedge.job.build import build_broker, build_evaluation, build_executor, build_model, build_process, build_server

    try:
        job = load_serve_job(args.job, job_overrides(args))
        password = args.password if args.password is not None else os.environ.get(PASSWORD_ENV)
        executor = build_executor(job, build_broker(job, password))
        model = build_model(job)
        process = build_process(job, model.artifact, executor)
        evaluation = build_evaluation(job, model.artifact, job.data.load_test(job.rounds.seed))
        server = build_server(job, process, executor, job.output.checkpoints, job.output.metrics_log, evaluation,
                              keras_model=model.keras_model)
    except (JobError, ValueError, TypeError, OSError) as error:
        print_errors("fedge serve", error)
        return 2
    if job.broker.signing_key is None:
        logger.warning("no signing key: tasks are unsigned; devices given a server public key will refuse them")

    try:
        with server.executor, stopping_on_signals(server.stop):
            state = server.run()
    except ConnectionError as error:
        print_errors("fedge serve", error)
        return 1
    rounds = job.rounds.count
    done = "all rounds done" if state.round_num >= rounds else "stopped; the same command resumes"
    print(f"fedge serve: {done}: {state.round_num} of {rounds} rounds ({server.rounds_failed} failed in this "
          f"run); checkpoint {server.checkpoints.path}")
    if server.rounds_run and server.rounds_failed == server.rounds_run:
        print(f"fedge serve: error: every round of this run failed ({server.rounds_failed} of {server.rounds_run}); "
              f"the metrics log and the log above say why", file=sys.stderr)
        return 1
    return 0
