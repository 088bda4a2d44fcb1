"""A federated job as typed values: the model, the data, the process, the rounds, the fleet, the broker, the outputs.

`fedge simulate` and `fedge serve` run a `Job`, whether it came from a job file
(fedge.job.load_job, docs/job.md), from command-line flags, or from Python. The registries
here (losses, client and server optimizers, aggregators, partitioners, encodings) are the
names the job file, the command line and these dataclasses accept. Nothing here imports
TensorFlow: a job whose model is a `.tflite` is served without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from device_runtime.protocol import ClientWork
from fedge.learning import optimizers
from fedge.learning.aggregation import Aggregator, ClientWeighting, MeanAggregator, NormClipping
from fedge.learning.privacy import GaussianFixedDP
from fedge.learning.robust import CoordinateMedian, TrimmedMean
from fedge.simulation.data_spec import DataSpec
from simulator.scenario import Group, Scenario

LOSSES = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy", "mean_squared_error")
CROSS_ENTROPIES = LOSSES[:3]
# optimizer name -> the settings it takes besides its learning rate
CLIENT_OPTIMIZERS = {"sgd": ("momentum", "nesterov"), "adam": ("beta_1", "beta_2", "epsilon")}
SERVER_OPTIMIZERS = {"sgd": ("momentum",), "adam": ("beta_1", "beta_2", "epsilon"),
                     "yogi": ("beta_1", "beta_2", "epsilon"), "adagrad": ("beta_1", "epsilon")}
_SERVER_OPTIMIZER_CLASSES: dict[str, type[optimizers.ServerOptimizer]] = {
    "sgd": optimizers.SGD, "adam": optimizers.Adam, "yogi": optimizers.Yogi, "adagrad": optimizers.Adagrad}
AGGREGATORS = ("mean", "median", "trimmed_mean")
ALGORITHMS = ("fedavg", "fedprox")


@dataclass(frozen=True)
class ClientOptimizerSpec:
    """The client optimizer baked into the artifact: 'sgd' (momentum, nesterov) or 'adam' (beta_1, beta_2, epsilon)."""

    name: str = "sgd"
    learning_rate: float = 0.01
    settings: Mapping[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        """The Keras optimizer the converter lowers (imports Keras)."""
        import keras

        if self.name == "sgd":
            return keras.optimizers.SGD(self.learning_rate, **self.settings)
        return keras.optimizers.Adam(self.learning_rate, **self.settings)


@dataclass(frozen=True)
class ModelSpec:
    """Where the model comes from and how it is lowered; `source` is 'keras' (a .keras file), 'factory'
    ('module:function' returning a Keras model or a fedge.learning.Model) or 'tflite' (a converted artifact)."""

    source: str
    location: str  # a path for keras and tflite, 'module:function' for factory
    loss: str | None = None  # None for a tflite artifact and for a fedge.learning.Model (its own loss)
    from_logits: bool = False
    metrics: tuple[str, ...] | None = None  # None: accuracy with a cross-entropy loss, nothing else otherwise
    batch_size: int | None = None
    optimizer: ClientOptimizerSpec = ClientOptimizerSpec()
    search_path: Path | None = None  # where a factory's module lives (the job file's folder)
    name: str | None = None  # recorded in the manifest (None: the model's own name)

    @property
    def converts(self) -> bool:
        """Whether the model is converted first (which needs TensorFlow)."""
        return self.source != "tflite"

    def keras_metrics(self) -> list[str]:
        """The metrics the converter tracks."""
        if self.metrics is not None:
            return list(self.metrics)
        return ["accuracy"] if self.loss in CROSS_ENTROPIES else []

    def keras_loss(self) -> Any:
        """The loss the converter takes: its name, or a Keras loss object reading logits (imports Keras)."""
        if not self.from_logits:
            return self.loss
        import keras

        classes = {"sparse_categorical_crossentropy": keras.losses.SparseCategoricalCrossentropy,
                   "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
                   "binary_crossentropy": keras.losses.BinaryCrossentropy}
        return classes[self.loss](from_logits=True)


@dataclass(frozen=True)
class AggregatorSpec:
    """How client deltas are combined: the mean, the coordinate-wise median or trimmed mean, with optional
    norm clipping, and DP-FedAvg (Gaussian noise on the clipped sum) when `dp_noise_multiplier` is set."""

    name: str = "mean"
    trim_fraction: float | None = None
    clip_norm: float | None = None
    dp_noise_multiplier: float | None = None
    dp_delta: float | None = None
    dp_population: int | None = None

    def problems(self, clients_per_round: int) -> list[str]:
        """What cannot work together, each as '<key> <why>' (an empty list when the settings are sound)."""
        problems = []
        dp = self.dp_noise_multiplier is not None
        if self.trim_fraction is not None and self.name != "trimmed_mean":
            problems.append("trim_fraction applies to name = \"trimmed_mean\"")
        if not dp and (self.dp_delta is not None or self.dp_population is not None):
            problems.append("dp_delta and dp_population apply to DP-FedAvg: set dp_noise_multiplier too")
        if dp and self.name != "mean":
            problems.append(f"dp_noise_multiplier (DP-FedAvg, a noisy mean of clipped updates) cannot be combined "
                            f"with name = {self.name!r}")
        if dp and self.clip_norm is None:
            problems.append("dp_noise_multiplier (DP-FedAvg) needs clip_norm, the bound on each update's norm")
        if dp and self.dp_population is not None and self.dp_population < clients_per_round:
            problems.append(f"dp_population ({self.dp_population}) cannot be below rounds.clients_per_round "
                            f"({clients_per_round})")
        return problems

    def build(self, clients_per_round: int) -> Aggregator:
        """The aggregator; ValueError when the settings cannot work together."""
        problems = self.problems(clients_per_round)
        if problems:
            raise ValueError("; ".join(problems))
        if self.dp_noise_multiplier is not None:
            sampling = 1.0 if self.dp_population is None else clients_per_round / self.dp_population
            return GaussianFixedDP(self.dp_noise_multiplier, clients_per_round, self.clip_norm,
                                   target_delta=1e-5 if self.dp_delta is None else self.dp_delta,
                                   sampling_probability=sampling)
        if self.name == "median":
            inner: Aggregator = CoordinateMedian()
        elif self.name == "trimmed_mean":
            inner = TrimmedMean(0.1 if self.trim_fraction is None else self.trim_fraction)
        else:
            inner = MeanAggregator()
        return inner if self.clip_norm is None else NormClipping(self.clip_norm, inner)


@dataclass(frozen=True)
class ServerOptimizerSpec:
    """The server optimizer: 'sgd' (FedAvg; momentum gives FedAvgM), 'adam', 'yogi' or 'adagrad' (Reddi et al.)."""

    name: str = "sgd"
    learning_rate: float | None = None  # None: 1.0 for sgd, 0.01 for the adaptive ones
    settings: Mapping[str, Any] = field(default_factory=dict)  # momentum; beta_1, beta_2, epsilon

    def build(self) -> optimizers.ServerOptimizer:
        """The optimizer; ValueError naming a bad setting."""
        learning_rate = self.learning_rate if self.learning_rate is not None else (
            1.0 if self.name == "sgd" else 0.01)
        return _SERVER_OPTIMIZER_CLASSES[self.name](learning_rate, **self.settings)


@dataclass(frozen=True)
class ProcessSpec:
    """The federated process: FedAvg or FedProx, client work, client weighting, server optimizer, aggregator."""

    algorithm: str = "fedavg"
    client_work: ClientWork = ClientWork()
    client_weighting: ClientWeighting = ClientWeighting.NUM_EXAMPLES
    server_optimizer: ServerOptimizerSpec = ServerOptimizerSpec()
    aggregator: AggregatorSpec = AggregatorSpec()

    @property
    def proximal(self) -> bool:
        """Whether the artifact needs FedProx's proximal term."""
        return self.algorithm == "fedprox"


@dataclass(frozen=True)
class RoundsSpec:
    """How rounds run: how many, how many reports close one and how many it needs, over-selection, the
    reporting deadline, how long to wait for devices to check in (and for over-selection's margin once the goal is
    available), evaluation cadence and the seed."""

    count: int = 10
    clients_per_round: int = 10
    min_reports: int = 1
    over_selection: float = 1.3
    deadline: float = 60.0
    checkin_wait: float = 30.0
    selection_grace: float = 2.0
    eval_every: int = 1
    seed: int = 0


@dataclass(frozen=True)
class FleetSpec:
    """The fleet: its id (topics live under fedge/<id>/) and, for simulation, its device groups."""

    id: str = "fedge"
    groups: tuple[Group, ...] = ()

    @property
    def num_devices(self) -> int:
        """How many simulated devices the groups hold."""
        return sum(group.count for group in self.groups)

    def scenario(self, seed: int) -> Scenario:
        """The simulator's scenario of these devices (each one's random draws seeded by `seed`)."""
        return Scenario(self.id, seed, self.groups)


@dataclass(frozen=True)
class BrokerSpec:
    """The broker `fedge serve` uses (and `fedge simulate` instead of its embedded one, when `url` is set);
    the password comes from the command line or FEDGE_MQTT_PASSWORD, never from the file."""

    url: str | None = None
    username: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    signing_key: Path | None = None


@dataclass(frozen=True)
class OutputSpec:
    """Where results go: the simulation's report folder, the server's checkpoints (resumed from) and metrics log."""

    simulation: Path = Path("reports/simulation")
    checkpoints: Path = Path("reports/serve/checkpoints")
    metrics_log: Path = Path("reports/serve/metrics.jsonl")


@dataclass(frozen=True)
class Job:
    """One federated job, simulated (`fedge simulate`) or served to devices (`fedge serve`) alike."""

    name: str
    model: ModelSpec
    data: DataSpec = DataSpec()
    process: ProcessSpec = ProcessSpec()
    rounds: RoundsSpec = RoundsSpec()
    fleet: FleetSpec = FleetSpec()
    broker: BrokerSpec = BrokerSpec()
    output: OutputSpec = OutputSpec()
    source: Path | None = None  # the job file, when it came from one

    def summary(self) -> str:
        """The job in a line or two, as a report's plots caption it: model, data, process, rounds, fleet."""
        process, rounds, work = self.process, self.rounds, self.process.client_work
        algorithm = f"FedProx mu {work.proximal_mu:g}" if self.process.proximal else "FedAvg"
        client, server, aggregator = self.model.optimizer, process.server_optimizer, process.aggregator
        if self.model.converts:  # a .tflite's optimizer is baked in: only a learning rate sent in tasks is known
            learning_rate = client.learning_rate if work.learning_rate is None else work.learning_rate
            client_optimizer = f"{client.name} lr {learning_rate:g}{_numbers(client.settings)}"
        else:
            rate = "" if work.learning_rate is None else f" at lr {work.learning_rate:g}"
            client_optimizer = f"the artifact's optimizer{rate}"
        data = self.data.source + ("" if self.data.natural_clients else f" ({self.data.partition})")
        server_rate = "" if server.learning_rate is None else f" lr {server.learning_rate:g}"
        settings = (("trim", aggregator.trim_fraction), ("clip", aggregator.clip_norm),
                    ("dp noise", aggregator.dp_noise_multiplier))
        robust = "".join(f" {name} {value:g}" for name, value in settings if value is not None)
        return (f"{self.name}: {self.model.location} on {data}; {algorithm}, {work.epochs} local epoch(s) of "
                f"{client_optimizer}, server {server.name}{server_rate}{_numbers(server.settings)}, "
                f"{aggregator.name}{robust}; {rounds.clients_per_round} of {self.fleet.num_devices} devices a round "
                f"(over-selection {rounds.over_selection:g}, deadline {rounds.deadline:g} s, {work.encoding}), "
                f"seed {rounds.seed}")

    @property
    def where(self) -> str:
        """How messages name the job: its file, else its name."""
        return job_label(self.source, self.name)

    def simulation_problems(self) -> list[str]:
        """What the job lacks to be simulated (data for its devices, a fleet of them, enough of them), one line each."""
        problems = []
        if not self.data.has_source:
            problems.append(f"{self.where}: [data] is required to simulate: dataset, npz or folder (docs/job.md)")
        if not self.fleet.groups:
            problems.append(f"{self.where}: fleet.groups (or fleet.scenario) is required to simulate: the devices "
                            f"to emulate (docs/job.md)")
        elif self.rounds.min_reports > self.fleet.num_devices:
            problems.append(f"{self.where}: rounds.min_reports ({self.rounds.min_reports}) is more than the fleet's "
                            f"{self.fleet.num_devices} devices: no round could ever complete")
        return problems


def _numbers(settings: Mapping[str, Any]) -> str:
    """An optimizer's numeric settings as ' momentum 0.9 beta_1 0.8' (flags such as nesterov left out)."""
    return "".join(f" {name} {value:g}" for name, value in settings.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool))


def job_label(source: Path | None, name: str) -> str:
    """How messages name a job: its file, else its name."""
    return str(source) if source is not None else f"job {name!r}"
