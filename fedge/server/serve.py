"""`fedge serve`: convert the model if needed, then run federated rounds over MQTT until done or stopped.

SIGINT (Ctrl-C) and SIGTERM stop the server: the round in progress is abandoned and the
checkpoint keeps the state after the last finished round, so the same command resumes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from device_runtime.artifact import Artifact, ArtifactError
from device_runtime.data import load_local_data
from device_runtime.signing import key_id, load_signing_key
from fedge.learning import optimizers
from fedge.learning.aggregation import Aggregator, ClientWeighting, MeanAggregator, NormClipping
from fedge.learning.evaluation import FederatedEvaluation
from fedge.learning.executors import InProcessExecutor
from fedge.learning.privacy import GaussianFixedDP
from fedge.learning.process import ClientWork, LearningProcess
from fedge.learning.robust import CoordinateMedian, TrimmedMean
from fedge.server.mqtt_executor import MqttExecutor
from fedge.server.rounds import FederatedServer, ServerSettings

logger = logging.getLogger("fedge.serve")

CROSS_ENTROPY_LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy")
CONVERTED_MODEL = "model.tflite"


class UsageError(Exception):
    """Arguments that cannot work together; `fedge serve` prints the message and exits with 2."""


def load_artifact(args: argparse.Namespace) -> Artifact:
    """The trainable artifact: a .tflite as is (content hash verified), a .keras model converted first."""
    path = Path(args.model)
    if path.suffix == ".keras":
        if args.loss is None or args.batch_size is None:
            raise UsageError("converting a .keras model needs --loss and --batch-size")
        import keras

        from converters import ConversionError, convert_keras_model

        model = keras.models.load_model(path, compile=False)
        try:
            result = convert_keras_model(model, loss=args.loss,
                                         optimizer=keras.optimizers.SGD(args.learning_rate or 0.01),
                                         batch_size=args.batch_size,
                                         metrics=["accuracy"] if args.loss in CROSS_ENTROPY_LOSSES else [])
        except ConversionError as error:
            raise UsageError(f"{path}: {error}") from None
        Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
        saved = result.save(Path(args.checkpoint_dir) / CONVERTED_MODEL)
        logger.info("converted %s to %s (%s)", path, saved, result.manifest["content_hash"])
        return result
    if path.suffix != ".tflite":
        raise UsageError(f"{path}: expected a .keras model or a trainable .tflite artifact")
    if args.loss is not None or args.batch_size is not None:
        raise UsageError("--loss and --batch-size apply to a .keras model; a .tflite artifact has its own")
    try:
        return Artifact.from_file(path)
    except (OSError, ArtifactError) as error:
        raise UsageError(f"{path}: {error}") from None


def server_optimizer(args: argparse.Namespace) -> optimizers.ServerOptimizer:
    """The server optimizer named by --server-optimizer (learning rate 1.0 for SGD, 0.01 for the adaptive ones)."""
    if args.server_optimizer == "sgd":
        return optimizers.SGD(args.server_learning_rate or 1.0, momentum=args.server_momentum)
    adaptive = {"adam": optimizers.Adam, "yogi": optimizers.Yogi, "adagrad": optimizers.Adagrad}
    return adaptive[args.server_optimizer](args.server_learning_rate or 0.01)


def model_aggregator(args: argparse.Namespace) -> Aggregator:
    """The aggregator of --aggregator, --trim-fraction, --clip-norm and the --dp-* flags; UsageError if they clash."""
    dp = args.dp_noise_multiplier is not None
    if args.trim_fraction is not None and args.aggregator != "trimmed_mean":
        raise UsageError("--trim-fraction applies to --aggregator trimmed_mean")
    if not dp and (args.dp_delta is not None or args.dp_population is not None):
        raise UsageError("--dp-delta and --dp-population apply to DP-FedAvg: give --dp-noise-multiplier too")
    if dp:
        if args.aggregator != "mean":
            raise UsageError(f"DP-FedAvg (--dp-noise-multiplier) is a noisy mean of clipped updates; "
                             f"it cannot be combined with --aggregator {args.aggregator}")
        if args.clip_norm is None:
            raise UsageError("DP-FedAvg (--dp-noise-multiplier) needs --clip-norm S, the bound on each update's norm")
        if args.dp_population is not None and args.dp_population < args.clients_per_round:
            raise UsageError(f"--dp-population ({args.dp_population}) cannot be below --clients-per-round "
                             f"({args.clients_per_round})")
        sampling = 1.0 if args.dp_population is None else args.clients_per_round / args.dp_population
        return GaussianFixedDP(args.dp_noise_multiplier, args.clients_per_round, args.clip_norm,
                               target_delta=1e-5 if args.dp_delta is None else args.dp_delta,
                               sampling_probability=sampling)
    inner = {"mean": MeanAggregator, "median": CoordinateMedian}.get(args.aggregator)
    aggregator = TrimmedMean(0.1 if args.trim_fraction is None else args.trim_fraction) if inner is None else inner()
    return aggregator if args.clip_norm is None else NormClipping(args.clip_norm, aggregator)


def build_server(args: argparse.Namespace, password: str | None) -> FederatedServer:
    """The process, executor and round loop that the arguments describe (the executor first: it checks the settings)."""
    signing_key = None if args.signing_key is None else load_signing_key(args.signing_key)
    executor = MqttExecutor(args.broker, args.fleet, clients_per_round=args.clients_per_round,
                            min_reports=args.min_reports, deadline_s=args.deadline,
                            over_selection=args.over_selection, encoding=args.encoding, topk=args.topk,
                            max_seconds=args.max_seconds, username=args.username, password=password,
                            tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                            signing_key=signing_key)
    if signing_key is None:
        logger.warning("no --signing-key: tasks are unsigned; devices given a server public key will refuse them")
    else:
        logger.info("signing every task with key %s", key_id(signing_key.public_key()))
    artifact = load_artifact(args)
    finalizers = artifact.manifest["metrics"]["finalizers"]
    work = ClientWork(args.local_epochs, args.max_steps, None, args.seed, args.learning_rate)
    process = LearningProcess(artifact, finalizers, work, ClientWeighting(args.client_weighting),
                              server_optimizer(args), executor, model_aggregator(args))
    evaluation: FederatedEvaluation | None = None
    eval_data: list[Any] | None = None
    if args.eval_data is not None:
        evaluation = FederatedEvaluation(artifact, finalizers, InProcessExecutor(num_workers=0))
        eval_data = [load_local_data(args.eval_data)]
    settings = ServerSettings(args.rounds, args.checkpoint_dir, args.metrics_log, args.seed, args.checkin_timeout,
                              args.eval_every)
    return FederatedServer(process, executor, settings, evaluation, eval_data)


def serve(args: argparse.Namespace, password: str | None) -> int:
    """Run the server; 0 when the rounds are done or it was stopped, 1 without a broker or when every round
    of this run failed, 2 for bad arguments."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server = build_server(args, password)
    except (UsageError, ValueError, TypeError, OSError) as error:
        print(f"fedge serve: error: {error}", file=sys.stderr)
        return 2

    def request_stop(signum: int, frame: object) -> None:
        logger.info("received %s: stopping after abandoning the round in progress", signal.Signals(signum).name)
        server.stop()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with server.executor:
            state = server.run()
    except ConnectionError as error:
        print(f"fedge serve: error: {error}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    done = "all rounds done" if state.round_num >= args.rounds else "stopped; the same command resumes"
    print(f"fedge serve: {done}: {state.round_num} of {args.rounds} rounds ({server.rounds_failed} failed in this "
          f"run); checkpoint {server.checkpoints.path}")
    if server.rounds_run and server.rounds_failed == server.rounds_run:
        print(f"fedge serve: error: every round of this run failed ({server.rounds_failed} of {server.rounds_run}); "
              f"the metrics log and the log above say why", file=sys.stderr)
        return 1
    return 0
