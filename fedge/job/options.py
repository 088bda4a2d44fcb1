"""The command-line flags that set job keys: `--rounds 50` is `--set rounds.count=50`, and so on.

Each flag only parses its value's syntax; the job loader checks it like the same key in a file,
so a flag and a key fail with the same message. `fedge simulate` and `fedge serve` add the
flags they offer from this one table.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from device_runtime.protocol import ENCODINGS
from fedge.job.load import parse_override
from fedge.job.spec import AGGREGATORS, LOSSES, SERVER_OPTIMIZERS
from fedge.learning.aggregation import ClientWeighting


@dataclass(frozen=True)
class JobFlag:
    """A flag and the job key it sets."""

    flag: str
    key: str
    type: Any = str
    help: str = ""
    choices: tuple[str, ...] | None = None
    metavar: str | None = None


JOB_FLAGS = {flag.flag: flag for flag in (
    JobFlag("--fleet", "fleet.id", help="fleet id: topics live under fedge/<fleet>/"),
    JobFlag("--broker", "broker.url", metavar="URL", help="mqtt://host[:port] or mqtts://host[:port]"),
    JobFlag("--rounds", "rounds.count", int, "round ids to run (a failed round uses one)", metavar="N"),
    JobFlag("--clients-per-round", "rounds.clients_per_round", int, "reports that close a round (the goal)",
            metavar="K"),
    JobFlag("--min-reports", "rounds.min_reports", int, "reports a round needs by its deadline, else it fails",
            metavar="M"),
    JobFlag("--deadline", "rounds.deadline", float, "seconds from the task to the reporting deadline", metavar="S"),
    JobFlag("--over-selection", "rounds.over_selection", float, "select ceil(this * K) available devices"),
    JobFlag("--checkin-timeout", "rounds.checkin_wait", float,
            "how long to wait for enough devices before selecting", metavar="S"),
    JobFlag("--encoding", "rounds.encoding", help="how devices encode their updates", choices=tuple(ENCODINGS)),
    JobFlag("--topk", "rounds.topk", float, "top-k sparsification of updates: the fraction of entries kept"),
    JobFlag("--eval-every", "rounds.eval_every", int, "evaluate every N rounds and after the last", metavar="N"),
    JobFlag("--seed", "rounds.seed", int, "selection, partition and shuffling seed"),
    JobFlag("--local-epochs", "process.local_epochs", int, "passes over each device's data per round"),
    JobFlag("--max-steps", "process.max_steps", int, "cap on each device's training steps per round"),
    JobFlag("--max-seconds", "process.max_seconds", float, "cap on each device's training time per round"),
    JobFlag("--learning-rate", "process.learning_rate", float,
            "the devices' learning rate (default: the artifact's)"),
    JobFlag("--proximal-mu", "process.proximal_mu", float, "FedProx's mu (with --set process.algorithm=fedprox)"),
    JobFlag("--client-weighting", "process.client_weighting", choices=tuple(w.value for w in ClientWeighting)),
    JobFlag("--server-optimizer", "process.server_optimizer.name", choices=tuple(SERVER_OPTIMIZERS)),
    JobFlag("--server-learning-rate", "process.server_optimizer.learning_rate", float,
            "default: 1.0 for sgd, 0.01 for the adaptive optimizers"),
    JobFlag("--server-momentum", "process.server_optimizer.momentum", float, "sgd momentum (FedAvgM)"),
    JobFlag("--aggregator", "process.aggregator.name", choices=AGGREGATORS,
            help="how updates are combined: the weighted mean (FedAvg), or the coordinate-wise median or trimmed "
                 "mean, which resist poisoned updates but hold every update of a round in memory"),
    JobFlag("--trim-fraction", "process.aggregator.trim_fraction", float,
            "trimmed_mean: the fraction of reports dropped at each end of every coordinate (default 0.1)",
            metavar="F"),
    JobFlag("--clip-norm", "process.aggregator.clip_norm", float,
            "clip every update to L2 norm S before aggregating (with DP: DP-FedAvg's clip)", metavar="S"),
    JobFlag("--dp-noise-multiplier", "process.aggregator.dp_noise_multiplier", float,
            "DP-FedAvg: Gaussian noise of std Z*S on the sum of clipped updates; needs --clip-norm", metavar="Z"),
    JobFlag("--dp-delta", "process.aggregator.dp_delta", float, "the delta epsilon is reported at (default 1e-5)",
            metavar="DELTA"),
    JobFlag("--dp-population", "process.aggregator.dp_population", int,
            "devices in the fleet: epsilon counts sampling K of N per round", metavar="N"),
    JobFlag("--loss", "model.loss", help="to convert a .keras model", choices=LOSSES),
    JobFlag("--batch-size", "model.batch_size", int, "to convert a model"),
    JobFlag("--eval-data", "data.test", help="held-out examples (x, y) evaluated in-process", metavar="NPZ"),
    JobFlag("--out", "output.simulation", help="the report folder (an earlier report there is replaced; a folder "
                                               "with files fedge did not write is refused)", metavar="DIR"),
    JobFlag("--checkpoint-dir", "output.checkpoints", help="the state after every round; resumed from on start",
            metavar="DIR"),
    JobFlag("--metrics-log", "output.metrics_log", help="JSON lines, one per round (appended)", metavar="FILE"),
    JobFlag("--username", "broker.username", help="MQTT user name"),
    JobFlag("--tls-ca", "broker.tls_ca", help="CA bundle to verify the broker (default: system CAs)", metavar="PEM"),
    JobFlag("--tls-cert", "broker.tls_cert", help="client certificate for mutual TLS", metavar="PEM"),
    JobFlag("--tls-key", "broker.tls_key", help="client private key for mutual TLS", metavar="PEM"),
    JobFlag("--signing-key", "broker.signing_key", metavar="PEM",
            help="Ed25519 private key that signs every task (fedge signing-key)"),
)}


def add_job_flags(parser: argparse.ArgumentParser, flags: Iterable[str]) -> None:
    """Add `--set KEY=VALUE` and the named flags to a command's parser (each sets its key only when given)."""
    parser.add_argument("--set", dest="job_overrides", action="append", default=[], metavar="KEY=VALUE",
                        type=_override, help="set any job key, e.g. --set rounds.count=50 (repeatable; "
                                             "the value is read as TOML, else as a string)")
    for name in flags:
        flag = JOB_FLAGS[name]
        parser.add_argument(flag.flag, dest=flag.key, type=flag.type, choices=flag.choices, metavar=flag.metavar,
                            help=flag.help or None, default=argparse.SUPPRESS)


def job_overrides(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The (key, value) overrides of the parsed command line: --set first, then the named flags."""
    named = [(flag.key, getattr(args, flag.key)) for flag in JOB_FLAGS.values() if hasattr(args, flag.key)]
    return [*args.job_overrides, *named]


def _override(text: str) -> tuple[str, Any]:
    """argparse type of --set."""
    try:
        return parse_override(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
