"""The main job, `fedge simulate`: a federated simulation of a device fleet, end to end on one machine.

It converts the scenario's model, starts a broker (embedded unless `--broker` names one), the
MQTT server and the simulated fleet, shows each round's loss, accuracy, reports and bytes,
evaluates on held-out data after every round, and writes a report folder (docs/simulator.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from device_runtime.cli import positive

DEFAULT_SCENARIO = "digits.toml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`fedge simulate`'s options."""
    parser.add_argument("scenario", nargs="?", help="scenario TOML (default: the bundled 40-device digits fleet)")
    parser.add_argument("--broker", metavar="URL", help="an external broker (default: start an embedded one)")
    parser.add_argument("--embedded-broker", choices=["auto", "mosquitto", "amqtt"], default="auto",
                        help="which embedded broker: Mosquitto when installed, else amqtt (default: auto)")
    parser.add_argument("--rounds", type=positive(int), default=40)
    parser.add_argument("--clients-per-round", type=positive(int), default=20, help="reports that close a round")
    parser.add_argument("--min-reports", type=positive(int), default=10, help="fewer reports by the deadline fail the round")
    parser.add_argument("--deadline", type=positive(float), default=20.0, metavar="SECONDS", help="reporting deadline")
    parser.add_argument("--local-epochs", type=positive(int), default=5)
    parser.add_argument("--learning-rate", type=positive(float), default=0.1, help="client SGD learning rate (momentum 0.9)")
    parser.add_argument("--batch-size", type=positive(int), default=16)
    parser.add_argument("--encoding", choices=["float32", "float16", "int8"], default="float32")
    parser.add_argument("--out", default="reports/simulation",
                        help="report folder (an earlier report there is replaced; a folder with other files is refused)")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])


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


def _scenario_path(name: str | None) -> Any:
    return Path(name) if name else resources.files("simulator") / "scenarios" / DEFAULT_SCENARIO


def run(args: argparse.Namespace) -> int:
    """Run the simulation and write the report; 0 when every round was attempted."""
    from fedge.report import CHECKPOINTS, SIMULATION_LOG, ReportFolderError, claim_report_folder
    from fedge.server.serve import UsageError, model_aggregator
    from simulator.scenario import ScenarioError, load_scenario

    try:  # everything that can refuse the job before the report folder is touched
        scenario = load_scenario(_scenario_path(args.scenario))
        if scenario.data is None or scenario.data.dataset != "digits":
            raise UsageError(f"{args.scenario or DEFAULT_SCENARIO}: the scenario needs a [data] section with "
                             f"dataset = \"digits\"")
        aggregator = model_aggregator(args)
        # A simulation starts over (`fedge serve` is the one that resumes), in a folder it may replace.
        out = claim_report_folder(Path(args.out))
    except (ScenarioError, UsageError, ValueError, ReportFolderError, OSError) as error:
        print(f"fedge simulate: error: {error}", file=sys.stderr)
        return 2
    # Devices dropping out and coming back log what happened to them: into the report folder, not over the progress.
    logging.basicConfig(level=args.log_level, filename=out / SIMULATION_LOG,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import keras
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from converters import convert_keras_model
    from fedge.learning import optimizers
    from fedge.learning.aggregation import ClientWeighting
    from fedge.learning.evaluation import FederatedEvaluation
    from fedge.learning.executors import InProcessExecutor
    from fedge.learning.process import ClientWork, LearningProcess
    from fedge.report import write_report
    from fedge.server.mqtt_executor import MqttExecutor
    from fedge.server.rounds import FederatedServer, ServerSettings
    from fedge.simulation import models
    from simulator.fleet import Fleet

    console = Console()
    train_clients, test_data = scenario.load_data()
    keras.utils.set_random_seed(scenario.seed)
    keras_model = models.digits_cnn()
    started = time.perf_counter()
    artifact = convert_keras_model(keras_model, loss="sparse_categorical_crossentropy",
                                   optimizer=keras.optimizers.SGD(args.learning_rate, momentum=0.9),
                                   batch_size=args.batch_size, metrics=["accuracy"])
    console.print(f"converted {keras_model.name} ({artifact.manifest['num_parameters']:,} parameters) to a "
                  f"{len(artifact.tflite_bytes):,}-byte trainable .tflite in {time.perf_counter() - started:.1f} s; "
                  f"{scenario.num_devices} devices in {len(scenario.groups)} groups, "
                  f"{len(test_data)} held-out examples")
    finalizers = artifact.manifest["metrics"]["finalizers"]
    rounds: list[dict[str, Any]] = []
    with _broker(args.broker, args.embedded_broker) as url:
        executor = MqttExecutor(url, scenario.fleet, clients_per_round=args.clients_per_round,
                                min_reports=min(args.min_reports, args.clients_per_round),
                                deadline_s=args.deadline, encoding=args.encoding)
        process = LearningProcess(artifact, finalizers, ClientWork(args.local_epochs, None, None, scenario.seed, None),
                                  ClientWeighting.NUM_EXAMPLES, optimizers.SGD(1.0), executor, aggregator)
        evaluation = FederatedEvaluation(artifact, finalizers, InProcessExecutor(num_workers=0))
        fleet = Fleet.from_scenario(scenario, url, client_data=train_clients)
        with Progress(TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=console) as progress:
            bar = progress.add_task("", total=args.rounds)

            def on_round(record: dict[str, Any]) -> None:
                rounds.append(record)
                dropped = sum(record["dropped"].values())
                outcome = "" if record["outcome"] == "completed" else f" {record['outcome'].upper()}"
                progress.console.print(
                    f"round {record['round'] + 1:3d}{outcome}  reports {record['accepted']:2d}/{record['selected']:<2d} "
                    f"dropped {dropped:2d}  loss {record.get('train_loss', math.nan):.3f} acc "
                    f"{record.get('train_accuracy', math.nan):.3f}  held-out {record.get('eval_accuracy', math.nan):.3f}"
                    f"  {(record['bytes_up'] + record['bytes_down']) / 1e3:4.0f} kB {record['seconds']:4.1f} s"
                    + (f"  epsilon {record['dp_epsilon']:.2f}" if "dp_epsilon" in record else ""),
                    highlight=False)
                progress.update(bar, advance=1, description=f"held-out accuracy {record.get('eval_accuracy', 0):.3f}")

            server = FederatedServer(process, executor, ServerSettings(args.rounds, out / CHECKPOINTS, None,
                                                                       scenario.seed, 60.0, 1),
                                     evaluation, [test_data], on_round=on_round)
            fleet.start()
            try:
                with executor:
                    state = server.run()
            finally:
                fleet.stop()
    weights = process.get_model_weights(state).to_list()
    written = write_report(out, [dict(r, round=r["round"] + 1) for r in rounds], keras_model, weights)
    totals = fleet.totals()
    final = rounds[-1] if rounds else {}
    console.print(f"{len(rounds)} rounds ({server.rounds_failed} failed); held-out accuracy "
                  f"{final.get('eval_accuracy', math.nan):.3f}; devices trained {totals.rounds_trained} times, "
                  f"{totals.rounds_dropped} dropped out mid-round")
    console.print(f"report: {out}/ ({', '.join(path.name for path in written)})")
    return 0
