"""The one builder: a `Job` to its artifact, process, evaluation, MQTT executor and server.

`fedge serve`, `fedge simulate`, bench/ and Python users all build a job's parts here, so
a job runs the same way whoever starts it. TensorFlow is imported only to convert a model
(a job whose model is a `.tflite` never loads it).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_runtime.artifact import Artifact, ArtifactError
from device_runtime.data import load_local_data
from device_runtime.connection import BrokerSettings, TlsFiles
from device_runtime.signing import key_id, load_signing_key
from fedge.job.load import JobError
from fedge.job.spec import Job
from fedge.learning.evaluation import FederatedEvaluation
from fedge.learning.executors import Executor, FleetExecutor, InProcessExecutor
from fedge.learning.process import LearningProcess
from fedge.server.mqtt_executor import MqttExecutor
from fedge.server.rounds import FederatedServer, ServerSettings
from fedge.simulation.datasets import ClientDataset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobModel:
    """The job's trainable artifact, and the Keras model it was converted from when there is one
    (a simulation's report saves the trained weights into it)."""

    artifact: Artifact
    keras_model: Any | None = None


def build_model(job: Job) -> JobModel:
    """The job's trainable artifact: its .tflite read and verified, or its model converted (imports TensorFlow).

    JobError (one line naming the job and the key) when the file is not an artifact, the factory
    cannot be called, or the converter refuses the model."""
    spec = job.model
    if spec.source == "tflite":
        try:
            artifact = Artifact.from_file(spec.location)
        except (OSError, ArtifactError) as error:
            raise JobError([f"{job.where}: model.tflite {spec.location}: {error}"]) from None
        return JobModel(artifact)
    import keras

    from converters import ConversionError

    keras.utils.set_random_seed(job.rounds.seed)  # a factory's initial weights are the same in every run
    model = _keras_model(job) if spec.source == "keras" else _factory_model(job)
    convert = _keras_conversion(job, model) if isinstance(model, keras.Model) else _custom_conversion(job, model)
    try:
        return JobModel(convert(), model if isinstance(model, keras.Model) else None)
    except (ConversionError, ValueError) as error:
        raise JobError([f"{job.where}: model {spec.location}: {error}"]) from None


def _keras_conversion(job: Job, model: Any) -> Callable[[], Artifact]:
    """The conversion of a Keras model with the job's loss, optimizer, batch size and metrics (checked first)."""
    from converters import convert_keras_model

    spec = job.model
    if spec.loss is None:
        raise JobError([f"{job.where}: model.loss is required: model.factory returned a Keras model"])
    if spec.batch_size is None:
        raise JobError([f"{job.where}: model.batch_size is required to convert a Keras model"])
    return lambda: convert_keras_model(model, loss=spec.keras_loss(), optimizer=spec.optimizer.build(),
                                       batch_size=spec.batch_size, metrics=spec.keras_metrics(),
                                       proximal=job.process.proximal, model_name=spec.name)


def _custom_conversion(job: Job, model: Any) -> Callable[[], Artifact]:
    """The lowering of a fedge.learning.Model with the job's optimizer and batch size (checked first)."""
    from fedge.learning.model import Model

    spec = job.model
    if not isinstance(model, Model):
        raise JobError([f"{job.where}: model.factory {spec.location} returned a {type(model).__name__}; it must "
                        f"return a keras.Model or a fedge.learning.Model"])
    if spec.loss is not None:
        raise JobError([f"{job.where}: model.loss applies to a Keras model; a fedge.learning.Model has its own"])
    batch_size = spec.batch_size if spec.batch_size is not None else model.batch_size_hint
    if batch_size is None:
        raise JobError([f"{job.where}: model.batch_size is required: the model has no batch size hint"])
    return lambda: model.lower(batch_size=batch_size, optimizer=spec.optimizer.build(), proximal=job.process.proximal)


def _keras_model(job: Job) -> Any:
    """The saved Keras model (JobError when the file is not one)."""
    import keras

    try:
        return keras.models.load_model(job.model.location, compile=False)
    except Exception as error:  # Keras raises ValueError, OSError, zipfile errors... for a file that is no model
        raise JobError([f"{job.where}: model.keras {job.model.location}: not a loadable Keras model "
                        f"({type(error).__name__}: {error})"]) from None


def _factory_model(job: Job) -> Any:
    """What `module:function` returns; a module beside the job file is loaded from there (a fresh copy, so two
    jobs' `model.py` never mix), any other is imported."""
    module_name, function_name = job.model.location.split(":")
    try:
        module = _job_module(job.model.search_path, module_name)
    except Exception as error:  # ImportError, or anything the user's module raises while it loads
        raise JobError([f"{job.where}: model.factory {job.model.location}: cannot import {module_name}: "
                        f"{type(error).__name__}: {error}"]) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise JobError([f"{job.where}: model.factory {job.model.location}: {module_name} has no function "
                        f"{function_name}"])
    try:
        return function()
    except Exception as error:  # the user's code: say where it failed, in one line
        raise JobError([f"{job.where}: model.factory {job.model.location}() raised {type(error).__name__}: "
                        f"{error}"]) from None


def _job_module(folder: Path | None, name: str) -> Any:
    """The module `name`: `<folder>/<name>.py` executed afresh when it exists (the job's own), else imported."""
    path = None if folder is None else folder / (name.replace(".", "/") + ".py")
    if path is None or not path.is_file():
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"fedge_job_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))  # the module may import its neighbours
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def build_process(job: Job, artifact: Artifact, executor: Executor) -> LearningProcess:
    """The job's federated process over `executor` (any fedge.learning executor); JobError when the artifact
    cannot run it (FedProx on an artifact without the proximal term)."""
    process = job.process
    try:
        return LearningProcess(artifact, process.client_work, process.client_weighting,
                               process.server_optimizer.build(), executor,
                               process.aggregator.build(job.rounds.clients_per_round), seed=job.rounds.seed)
    except ValueError as error:
        raise JobError([f"{job.where}: {error}"]) from None


@dataclass(frozen=True)
class HeldOutEvaluation:
    """In-process federated evaluation of the job's held-out examples, checked against the model."""

    evaluation: FederatedEvaluation
    data: list[ClientDataset]


def build_evaluation(job: Job, artifact: Artifact, held_out: ClientDataset | None) -> HeldOutEvaluation | None:
    """The evaluation of the held-out examples (None without any); JobError when they do not fit the model."""
    if held_out is None:
        return None
    check_fits(job, held_out, artifact, f"the held-out examples ({job.data.test or job.data.source})")
    return HeldOutEvaluation(FederatedEvaluation(artifact, InProcessExecutor(num_workers=0)), [held_out])


def check_fits(job: Job, examples: ClientDataset, artifact: Artifact, what: str) -> None:
    """JobError naming `what` unless the examples fit the model (shapes, dtypes, the labels its loss takes)."""
    try:
        load_local_data(examples.as_tuple(), artifact.manifest)
    except ValueError as error:
        raise JobError([f"{job.where}: {what} do not fit the model: {str(error).removeprefix('data: ')}"]) from None


def build_broker(job: Job, password: str | None = None) -> BrokerSettings:
    """The job's broker (fedge serve's) with its credentials and TLS files."""
    broker = job.broker
    url = broker.url
    if url is None:
        raise JobError([f"{job.where}: broker.url is required (the [broker] table, or --broker URL)"])
    files = (broker.tls_ca, broker.tls_cert, broker.tls_key)
    tls = None if files == (None, None, None) else TlsFiles(*(None if f is None else str(f) for f in files))
    try:
        return BrokerSettings(url, broker.username, password, tls)
    except ValueError as error:
        raise JobError([f"{job.where}: broker: {error}"]) from None


def build_executor(job: Job, broker: BrokerSettings) -> MqttExecutor:
    """The MQTT executor of the job's fleet and rounds, signing tasks with the job's key when it has one."""
    rounds = job.rounds
    signing_key = None
    if job.broker.signing_key is not None:
        try:
            signing_key = load_signing_key(job.broker.signing_key)
        except (OSError, ValueError) as error:
            raise JobError([f"{job.where}: broker.signing_key {job.broker.signing_key}: {error}"]) from None
        logger.info("signing every task with key %s", key_id(signing_key.public_key()))
    return MqttExecutor(broker, job.fleet.id, clients_per_round=rounds.clients_per_round,
                        min_reports=rounds.min_reports, deadline_s=rounds.deadline,
                        over_selection=rounds.over_selection, selection_grace_s=rounds.selection_grace,
                        signing_key=signing_key)


def build_server(job: Job, process: LearningProcess, executor: FleetExecutor, checkpoint_dir: Path,
                 metrics_log: Path | None, evaluation: HeldOutEvaluation | None,
                 on_round: Callable[[dict[str, Any]], None] | None = None, keras_model: Any | None = None
                 ) -> FederatedServer:
    """The round loop: the job's rounds of `process` over `executor`, checkpointed to `checkpoint_dir`, beside which
    the model it trains is kept (the artifact, and `keras_model` when the job has one: the folder alone then gives
    the trained model, `fedge export`); JobError when the checkpoint there is of another model or server
    optimizer, or the model cannot be written beside it."""
    settings = ServerSettings(job.rounds.count, checkpoint_dir, metrics_log, job.rounds.seed,
                              job.rounds.checkin_wait, job.rounds.eval_every)
    server = FederatedServer(process, executor, settings, None if evaluation is None else evaluation.evaluation,
                             None if evaluation is None else evaluation.data, on_round=on_round)
    try:
        server.start_state()  # a checkpoint of another model or optimizer is the job's mistake: say so now
        saved = server.checkpoints.save_model(process.artifact, keras_model, keep=job.model.location)
    except (ValueError, OSError) as error:
        raise JobError([f"{job.where}: {error}"]) from None
    logger.info("the model %s (%s) beside the checkpoint: %s", job.model.location, process.artifact.content_hash,
                ", ".join(path.name for path in saved) or "already there")
    return server
