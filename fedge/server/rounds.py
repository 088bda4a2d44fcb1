"""The server's round loop (Bonawitz et al., 2019): check-in, selection, one process round, evaluation, checkpoint.

The round itself (configuration, reporting, streaming aggregation, server optimizer step) is
`process.next(state, selected_device_ids)` with an MqttExecutor: the same process code the
in-process executor runs. Around it this loop waits for devices, selects them with
over-selection, evaluates every `eval_every` rounds on held-out data in-process, checkpoints
after every round and appends one JSON line per round to the metrics log. On start it resumes
from the checkpoint when there is one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedge.learning.evaluation import FederatedEvaluation
from fedge.learning.process import LearningProcess, Metrics
from fedge.learning.state import LearningProcessState
from fedge.server.checkpoint import Checkpoints
from fedge.server.journal import JOURNAL_FILE
from fedge.server.metrics_log import MetricsLog
from fedge.learning.executors import FleetExecutor, RoundInterruptedError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    """How many rounds, where state and metrics go, how devices are waited for and selected, when to evaluate."""

    rounds: int
    checkpoint_dir: str | os.PathLike[str]
    metrics_log: str | os.PathLike[str] | None = None
    seed: int | None = 0  # selection seed; rounds draw from (seed, round)
    checkin_timeout_s: float = 30.0
    eval_every: int = 1


class FederatedServer:
    """Runs `settings.rounds` rounds of `process` over `executor`'s fleet, resuming from its checkpoint."""

    def __init__(self, process: LearningProcess, executor: FleetExecutor, settings: ServerSettings,
                 evaluation: FederatedEvaluation | None = None, eval_data: Sequence[Any] | None = None,
                 on_round: Callable[[dict[str, Any]], None] | None = None) -> None:
        """`evaluation` and `eval_data` (client datasets) together enable periodic federated evaluation;
        `on_round` receives each round's metrics record (what the metrics log gets)."""
        if (evaluation is None) != (eval_data is None):
            raise ValueError("evaluation and eval_data go together")
        if settings.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {settings.eval_every}")
        self.process, self.executor, self.settings = process, executor, settings
        self._evaluation, self._eval_data = evaluation, eval_data
        self.checkpoints = Checkpoints(settings.checkpoint_dir)
        self._set_up = False  # whether start_state has set up the journal and the run id (after the checkpoint's check)
        self._log = None if settings.metrics_log is None else MetricsLog(settings.metrics_log)
        self._start: LearningProcessState | None = None
        self._stopping = threading.Event()
        self.rounds_run = self.rounds_failed = 0  # in this run, not counting rounds resumed from
        self._on_round = on_round

    def stop(self) -> None:
        """Stop soon: the round in progress is abandoned; the checkpoint keeps the last finished round."""
        self._stopping.set()
        self.executor.interrupt()

    def start_state(self) -> LearningProcessState:
        """The state run() starts from: the checkpoint's, checked against the process (its model's weights and its
        server optimizer's slots), else a fresh one; ValueError naming the checkpoint when it cannot be resumed,
        before anything is written beside it. Then the update journal (a killed server loses no acknowledged
        update) and the job's run id (kept by a resumed job) are set up, once."""
        if self._start is None:
            state = self.checkpoints.latest(self.process.artifact.manifest)
            if state is None:
                state = self.process.initialize()
            else:
                try:
                    self.process.check_state(state)
                except ValueError as error:
                    raise ValueError(f"{self.checkpoints.path}: {error}; {self.checkpoints.NEW_JOB}") from None
            self._start = state
        if not self._set_up:
            self.executor.use_journal(self.checkpoints.directory / JOURNAL_FILE)
            self.executor.run_id = self.checkpoints.run_id(self.executor.run_id)
            self._set_up = True
        return self._start

    def run(self) -> LearningProcessState:
        """Run rounds until `settings.rounds` are done or stop() is called; returns the last checkpointed state."""
        try:
            return self._run_rounds()
        finally:
            if self._log is not None:
                self._log.close()  # its TensorBoard event file; a later run() opens a new one

    def _run_rounds(self) -> LearningProcessState:
        """run()'s loop: select, run the process's round, evaluate, checkpoint, report."""
        state, self._start = self.start_state(), None
        while state.round_num < self.settings.rounds and not self._stopping.is_set():
            started = time.time()
            selected = self._select(state.round_num)
            if selected is None:
                break
            checked_in = time.time()
            try:
                next_state, metrics = self.process.next(state, selected)
            except RoundInterruptedError as interruption:
                kept = (f"{self.checkpoints.path} holds round {state.round_num}'s starting state"
                        if self.checkpoints.path.exists() else "no round had finished, so no checkpoint was written")
                logger.info("%s; %s", interruption, kept)
                break
            trained = time.time()
            outcome = metrics["distributor"]["outcome"]
            self.rounds_run += 1
            self.rounds_failed += outcome == "failed"
            evaluation = self._evaluate(next_state) if outcome == "completed" else None
            evaluated = time.time()
            self.checkpoints.save(next_state)
            self.executor.checkpointed()
            times = {"checkin": checked_in - started, "round": trained - checked_in, "evaluation": evaluated - trained,
                     "checkpoint": time.time() - evaluated}
            self._report(state.round_num, started, times, metrics, evaluation)
            state = next_state
        return state

    def _select(self, round_num: int) -> list[str] | None:
        """Wait until at least min_reports devices are available, then select; None when stopping."""
        while not self._stopping.is_set():
            available = self.executor.wait_for_devices(self.settings.checkin_timeout_s)
            if len(available) >= self.executor.min_reports:
                return self.executor.select(self.settings.seed, round_num)
            if not self._stopping.is_set():
                logger.info("round %d: %d devices available, waiting for at least %d", round_num, len(available),
                            self.executor.min_reports)
        return None

    def _evaluate(self, state: LearningProcessState) -> dict[str, Any] | None:
        """Federated evaluation of the new weights when one is due (every eval_every rounds and after the last)."""
        if self._evaluation is None or self._eval_data is None:
            return None
        done = state.round_num
        if done % self.settings.eval_every and done != self.settings.rounds:
            return None
        return self._evaluation(self.process.get_model_weights(state), self._eval_data)["eval"]

    def _report(self, round_num: int, started: float, times: dict[str, float], metrics: Metrics,
                evaluation: dict[str, Any] | None) -> None:
        """Log the round's summary and append its metrics line."""
        distributor, train = metrics["distributor"], metrics["client_work"]["train"]
        record = {
            "round": round_num, "outcome": distributor["outcome"], "closed_by": distributor["closed_by"],
            "started": started, "seconds": sum(times.values()),
            "times": {**times, "configure": distributor["configure_seconds"],
                      "reporting": distributor["reporting_seconds"]},
            "selected": distributor["selected"], "goal": distributor["goal"], "accepted": distributor["accepted"],
            "dropped": distributor["dropped"], "bytes_down": distributor["bytes_down"],
            "bytes_up": metrics["aggregator"]["bytes_up"], "bytes_published": distributor["bytes_published"],
            "update_norm": metrics["finalizer"]["update_norm"],
            **({"refused": distributor["refused"]} if "refused" in distributor else {}),  # why a round was refused
            **{name: value for name, value in metrics["aggregator"].items()  # e.g. dp_epsilon, clipped_clients
               if name not in ("num_clients", "bytes_up", "mean_weight")},
            **{f"train_{name}": value for name, value in train.items()},
            **{f"eval_{name}": value for name, value in (evaluation or {}).items()},
        }
        if self._log is not None:
            self._log.write(record)
        if self._on_round is not None:
            self._on_round(record)
        logger.info("round %d %s: %d of %d selected devices reported; train %s; eval %s; %.1f s", round_num,
                    distributor["outcome"], distributor["accepted"], distributor["selected"], _brief(train),
                    _brief(evaluation), record["seconds"])


def _brief(metrics: Mapping[str, float] | None) -> str:
    """'loss 0.41 accuracy 0.88' from a metrics dict, '-' without one."""
    if not metrics:
        return "-"
    return " ".join(f"{name} {metrics[name]:.4g}" for name in ("loss", "accuracy") if name in metrics)
