"""Job files (TOML, docs/job.md) to `Job` values: every key checked, every error reported at once.

`load_job(path, overrides)` reads a file and applies `--set key=value` overrides (and the named
command-line flags, which are overrides too) before checking, so an override is checked like
the file. Paths in the file are relative to its folder; paths given on the command line to the
working directory. The bundled digits job (`fedge simulate` without a file) resolves its paths
against the working directory too.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from device_runtime.connection import parse_broker_url
from device_runtime.protocol import ENCODINGS, ClientWork, check_id
from fedge.job.spec import (AGGREGATORS, ALGORITHMS, CLIENT_OPTIMIZERS, CROSS_ENTROPIES, LOSSES, SERVER_OPTIMIZERS,
                            AggregatorSpec, BrokerSpec, ClientOptimizerSpec, FleetSpec, Job, ModelSpec, OutputSpec,
                            ProcessSpec, RoundsSpec, ServerOptimizerSpec, job_label)
from fedge.learning.aggregation import ClientWeighting
from fedge.simulation.data_spec import DataSpec, parse_data
from fedge.tables import Table, TableErrors, read_toml, toml_value
from simulator.scenario import ScenarioError, load_scenario, parse_groups

BUNDLED_JOB = "digits.toml"
MODEL_SOURCES = ("keras", "factory", "tflite")
# Keys whose values are paths: given on the command line, they are relative to the working directory.
PATH_KEYS = frozenset({"model.keras", "model.tflite", "data.npz", "data.folder", "data.path", "data.test",
                       "fleet.scenario", "broker.tls_ca", "broker.tls_cert", "broker.tls_key", "broker.signing_key",
                       "output.simulation", "output.checkpoints", "output.metrics_log"})
_FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_SETTING_MAXIMA = {"momentum": 0.999, "beta_1": 0.9999, "beta_2": 0.9999}  # below 1: a moving average must move


class JobError(TableErrors):
    """A job that cannot run: one line per problem, each naming the file and the key."""


def bundled_job_path() -> Path:
    """The bundled digits job (what `fedge simulate` runs without a file)."""
    return Path(str(resources.files("fedge.job") / BUNDLED_JOB))


def parse_override(text: str) -> tuple[str, Any]:
    """('rounds.count', 50) from 'rounds.count=50': the value is read as TOML, else taken as a string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
        raise ValueError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. rounds.count=50")
    return key, toml_value(raw)


def load_job(path: str | Path | None = None, overrides: Iterable[tuple[str, Any]] = ()) -> Job:
    """The job in the TOML file at `path` (a folder: its job.toml; None: the bundled digits job) with `overrides`
    applied; JobError lists every problem at once."""
    bundled = path is None
    source = bundled_job_path() if bundled else Path(path)
    if source.is_dir() and (source / "job.toml").is_file():  # the folder `fedge new` wrote
        source = source / "job.toml"
    try:
        document = read_toml(source, "job")
    except TableErrors as error:
        raise JobError(error.errors) from None
    base_dir = Path.cwd() if bundled else source.parent
    return parse_job(document, source, base_dir, overrides)


def parse_job(document: Mapping[str, Any], source: Path | None, base_dir: Path,
              overrides: Iterable[tuple[str, Any]] = ()) -> Job:
    """A job from its TOML document; `overrides` ((dotted key, value) pairs) replace or add keys first."""
    name_given = document.get("name")
    label = job_label(source, name_given if isinstance(name_given, str) else "job")
    errors: list[str] = []
    document = _overridden(document, overrides, errors, label)
    top = Table(document, label, "", errors)
    name = top.string("name", source.stem if source is not None else "job")
    if "groups" in document and "model" not in document:
        errors.append(f"{label}: this is a fleet scenario (it has groups and no [model]); a job names it in "
                      f"[fleet] scenario = \"...\" (docs/job.md)")
        raise JobError(errors)
    model = _model(top.table("model"), base_dir)
    data = parse_data(top.table("data"), base_dir) if top.has("data") else DataSpec()
    rounds, encoding = _rounds(top.table("rounds"))
    process = _process(top.table("process"), rounds.clients_per_round, encoding)
    fleet = _fleet(top.table("fleet"), base_dir, name)
    broker = _broker(top.table("broker"), base_dir)
    output = _output(top.table("output"), base_dir)
    top.done()
    if errors:
        raise JobError(errors)
    return Job(name=name, model=model, data=data, process=process, rounds=rounds, fleet=fleet, broker=broker,
               output=output, source=source)


def _overridden(document: Mapping[str, Any], overrides: Iterable[tuple[str, Any]], errors: list[str],
                label: str) -> dict[str, Any]:
    """A deep copy of `document` with each (dotted key, value) set, or removed by an empty value; paths made
    absolute against the working directory; a key that would replace a table by a value is an error."""
    result = copy.deepcopy(dict(document))
    for key, value in overrides:
        parts = key.split(".")
        table = result
        for part in parts[:-1]:
            if not isinstance(table.setdefault(part, {}), dict):
                errors.append(f"{label}: --set {key}: {part} is not a table")
                break
            table = table[part]
        else:
            if value == "":
                table.pop(parts[-1], None)  # `--set model.factory=` removes the key (or table)
            elif isinstance(table.get(parts[-1]), dict) and not isinstance(value, dict):
                errors.append(f"{label}: --set {key}: {key} is a table; set one of its keys")
            else:
                if key in PATH_KEYS and isinstance(value, str):
                    value = str(Path(value).expanduser().absolute())
                table[parts[-1]] = value
    return result


def _model(table: Table, base_dir: Path) -> ModelSpec:
    """[model]: exactly one of keras, factory, tflite; conversion options for the first two."""
    sources = [key for key in MODEL_SOURCES if table.has(key)]
    for key in MODEL_SOURCES:
        table.get(key)  # known keys (a typo's message lists them all); two of them are reported as alternatives
    if len(sources) != 1:
        table.error("keras" if not sources else " and ".join(sources),
                    "is required: give one of keras (a .keras file), factory ('module:function') or tflite "
                    "(a converted artifact)" if not sources else "are alternatives: give one model source")
    source = sources[0] if sources else "keras"
    if source == "factory":
        location = table.checked("factory", "", _factory, "'module:function'")
    else:
        path = table.path(source, base_dir, "file")
        location = str(path) if path is not None else ""
        if path is not None and path.suffix != f".{source}":
            table.error(source, f"must name a .{source} file, got {path.name}")
    loss = table.choice("loss", None, LOSSES)
    batch_size = table.integer("batch_size", None, minimum=1)
    optimizer = _client_optimizer(table.table("optimizer"))
    spec = ModelSpec(source, location, loss, table.boolean("from_logits", False), table.strings("metrics"),
                     batch_size, optimizer, base_dir, table.string("name"))
    if source == "tflite":
        for key in ("loss", "from_logits", "metrics", "batch_size", "optimizer", "name"):
            if table.has(key):
                table.error(key, "applies to a model that is converted; a .tflite artifact has its own")
    else:
        if source == "keras" and loss is None and not table.has("loss"):
            table.error("loss", f"is required to convert a Keras model: one of {', '.join(LOSSES)}")
        if source == "keras" and batch_size is None and not table.has("batch_size"):
            table.error("batch_size", "is required to convert a model: the fixed batch every device trains with")
        if spec.from_logits and loss not in CROSS_ENTROPIES:
            table.error("from_logits", f"applies to the cross-entropy losses, not {loss}")
        if spec.metrics is not None and not set(spec.metrics) <= {"accuracy"}:
            table.error("metrics", f"may hold \"accuracy\" only (loss, examples and batches are always reported), "
                                   f"got {list(spec.metrics)}")
    table.done()
    return spec


def _factory(value: Any) -> str:
    """'module:function'."""
    if not isinstance(value, str) or not _FACTORY.fullmatch(value):
        raise ValueError("")
    return value


def _client_optimizer(table: Table) -> ClientOptimizerSpec:
    """[model.optimizer]: sgd (momentum, nesterov) or adam (beta_1, beta_2, epsilon)."""
    name = table.choice("name", "sgd", CLIENT_OPTIMIZERS)
    spec = ClientOptimizerSpec(name, table.number("learning_rate", 0.01, low=0.0, low_open=True),
                               _optimizer_settings(table, name, CLIENT_OPTIMIZERS))
    table.done()
    return spec


def _optimizer_settings(table: Table, name: str, registry: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """The settings of optimizer `name` the table sets; a setting of another optimizer of the registry is an error."""
    values: dict[str, Any] = {}
    for option in dict.fromkeys(option for options in registry.values() for option in options):
        if not table.has(option):
            continue
        if option not in registry[name]:
            table.error(option, f"is not a setting of {name} (its settings: {', '.join(registry[name])})")
            table.get(option)
            continue
        value = table.boolean(option, False) if option == "nesterov" else \
            table.number(option, None, low=0.0, low_open=option == "epsilon", high=_SETTING_MAXIMA.get(option, math.inf))
        if value is not None:
            values[option] = value
    return values


def _rounds(table: Table) -> tuple[RoundsSpec, dict[str, Any]]:
    """[rounds]; its encoding and topk, which are the clients' work, come back apart for [process]."""
    encoding = {"encoding": table.choice("encoding", "float32", ENCODINGS),
                "topk": table.number("topk", None, low=0.0, high=1.0, low_open=True)}
    spec = RoundsSpec(
        count=table.integer("count", 10, minimum=1),
        clients_per_round=table.integer("clients_per_round", 10, minimum=1),
        min_reports=table.integer("min_reports", 1, minimum=1),
        over_selection=table.number("over_selection", 1.3, low=1.0),
        deadline=table.number("deadline", 60.0, low=0.0, low_open=True),
        checkin_wait=table.number("checkin_wait", 30.0, low=0.0, low_open=True),
        selection_grace=table.number("selection_grace", 2.0, low=0.0),
        eval_every=table.integer("eval_every", 1, minimum=1),
        seed=table.integer("seed", 0, minimum=0, maximum=2**32 - 1))  # Keras seeds a factory's model with it
    if spec.min_reports > spec.clients_per_round:
        table.error("min_reports", f"({spec.min_reports}) cannot exceed clients_per_round "
                                   f"({spec.clients_per_round})")
    table.done()
    return spec, encoding


def _process(table: Table, clients_per_round: int, encoding: dict[str, Any]) -> ProcessSpec:
    """[process] with [process.server_optimizer] and [process.aggregator]; the encoding of [rounds]."""
    algorithm = table.choice("algorithm", "fedavg", ALGORITHMS)
    mu = table.number("proximal_mu", None, low=0.0)
    if algorithm == "fedprox" and mu is None and not table.has("proximal_mu"):
        table.error("proximal_mu", "is required with algorithm = \"fedprox\" (0 behaves as FedAvg)")
    if algorithm != "fedprox" and table.has("proximal_mu"):
        table.error("proximal_mu", "applies to algorithm = \"fedprox\"")
    work_values = dict(
        epochs=table.integer("local_epochs", 1, minimum=1),
        max_steps=table.integer("max_steps", None, minimum=1),
        max_seconds=table.number("max_seconds", None, low=0.0, low_open=True),
        learning_rate=table.number("learning_rate", None, low=0.0, low_open=True),
        proximal_mu=mu if algorithm == "fedprox" else None, **encoding)
    weighting = table.choice("client_weighting", "num_examples", [w.value for w in ClientWeighting])
    server = _server_optimizer(table.table("server_optimizer"))
    aggregator = _aggregator(table.table("aggregator"), clients_per_round)
    table.done()
    try:  # ClientWork holds the bounds the wire can carry (e.g. fewer than 2**31 epochs)
        client_work = ClientWork(**work_values)
    except ValueError as error:
        table.error_here(str(error))
        client_work = ClientWork()
    return ProcessSpec(algorithm, client_work, ClientWeighting(weighting), server, aggregator)


def _server_optimizer(table: Table) -> ServerOptimizerSpec:
    """[process.server_optimizer]; the optimizer is built once here, so a bad combination is found now."""
    name = table.choice("name", "sgd", SERVER_OPTIMIZERS)
    spec = ServerOptimizerSpec(name, table.number("learning_rate", None, low=0.0, low_open=True),
                               _optimizer_settings(table, name, SERVER_OPTIMIZERS))
    table.done()
    try:
        spec.build()
    except ValueError as error:
        table.error_here(f"cannot build {name}: {error}")
    return spec


def _aggregator(table: Table, clients_per_round: int) -> AggregatorSpec:
    """[process.aggregator]."""
    spec = AggregatorSpec(
        name=table.choice("name", "mean", AGGREGATORS),
        trim_fraction=table.number("trim_fraction", None, low=0.0, high=0.49),
        clip_norm=table.number("clip_norm", None, low=0.0, low_open=True),
        dp_noise_multiplier=table.number("dp_noise_multiplier", None, low=0.0, low_open=True),
        dp_delta=table.number("dp_delta", None, low=0.0, high=0.5, low_open=True),
        dp_population=table.integer("dp_population", None, minimum=1))
    for problem in spec.problems(clients_per_round):
        table.error_here(problem)
    table.done()
    return spec


def _fleet(table: Table, base_dir: Path, name: str) -> FleetSpec:
    """[fleet]: its id, and the simulated devices' groups inline ([[fleet.groups]]) or from a scenario file."""
    groups: tuple = ()
    default_id = name
    if table.has("scenario"):
        scenario_path = table.path("scenario", base_dir, "file")
        if table.has("groups"):
            table.error("groups", "and scenario are alternatives: give the groups inline or name a scenario file")
        if scenario_path is not None:
            try:
                scenario = load_scenario(scenario_path)
                groups, default_id = scenario.groups, scenario.fleet
            except ScenarioError as error:
                table.errors.extend(error.errors)
    elif table.has("groups"):
        groups = parse_groups(table)
    fleet_id = table.checked("id", default_id, lambda v: check_id(v, "fleet id"), "a fleet id")
    if not table.has("id"):
        try:
            check_id(fleet_id)
        except ValueError as error:
            table.error("id", f"is needed: the job's name cannot be a fleet id ({error})")
    table.done()
    return FleetSpec(fleet_id, groups)


def _broker(table: Table, base_dir: Path) -> BrokerSpec:
    """[broker]."""
    def url(value: Any) -> str:
        parse_broker_url(value)
        return value

    spec = BrokerSpec(url=table.checked("url", None, url, "mqtt[s]://host[:port]"),
                      username=table.string("username"),
                      tls_ca=table.path("tls_ca", base_dir, "file"), tls_cert=table.path("tls_cert", base_dir, "file"),
                      tls_key=table.path("tls_key", base_dir, "file"),
                      signing_key=table.path("signing_key", base_dir, "file"))
    if spec.tls_key is not None and spec.tls_cert is None:
        table.error("tls_key", "needs tls_cert (a client certificate)")
    table.done()
    return spec


def _output(table: Table, base_dir: Path) -> OutputSpec:
    """[output]."""
    defaults = OutputSpec()
    spec = OutputSpec(*(table.path(key, base_dir, "output") or base_dir / getattr(defaults, key)
                        for key in ("simulation", "checkpoints", "metrics_log")))
    table.done()
    return spec
