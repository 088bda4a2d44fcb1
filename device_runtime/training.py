"""Local training and evaluation of a TrainableModel on a device's own data (a federated client's work)."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_runtime.data import load_local_data
from device_runtime.model import Batch, TrainableModel


@dataclass
class LocalResult:
    """The outcome of one local training run.

    `delta` is weights after minus weights before, float32, for every weight in manifest order.
    `num_examples` counts the examples trained on, each once per epoch it was used in (padding
    rows excluded, so 10 examples for 2 epochs count 20). `metrics` are the unfinalized metric
    sums of this run alone. `stopped_early` is true when max_steps or max_seconds cut the run short.
    """

    delta: list[np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    steps: int
    seconds: float
    stopped_early: bool


def train_locally(model: TrainableModel, data: Any, *, epochs: int = 1, shuffle_seed: int | None = None,
                  max_steps: int | None = None, max_seconds: float | None = None,
                  learning_rate: float | None = None, initial_weights: Sequence[Any] | None = None,
                  reset_optimizer: bool = True, proximal_mu: float | None = None) -> LocalResult:
    """Train `model` on `data` (anything load_local_data accepts) and return the weight delta and metrics.

    Epoch e is shuffled with seed `shuffle_seed + e` (no shuffling when None). The budgets are
    checked between steps. `initial_weights`, `learning_rate` and FedProx's `proximal_mu` (artifacts
    converted with proximal=True; anchored at the weights last set, e.g. `initial_weights`), when
    given, stay set on the model.
    Data is checked before any step; if a stream's later batch is bad, or anything else fails
    mid-run, the weights are restored to those at the start and the error is raised.
    """
    _check_count("epochs", epochs, minimum=1)
    if max_steps is not None:
        _check_count("max_steps", max_steps, minimum=0)
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds >= 0
                                        and math.isfinite(max_seconds)):
        raise ValueError(f"max_seconds must be a finite number >= 0 or None, got {max_seconds!r}")
    local = load_local_data(data, model.manifest)
    if epochs > 1 and not local.reiterable:
        raise ValueError(f"epochs={epochs} needs data that can be iterated again; a one-shot iterator "
                         "(e.g. a generator) supports one epoch: pass a list or a re-iterable object")
    seeds = [None if shuffle_seed is None else shuffle_seed + e for e in range(epochs)]
    first_epoch = local.batches(model.batch_size, seeds[0])  # usage errors raise before the model changes
    if initial_weights is not None:
        model.set_weights(initial_weights)
    if learning_rate is not None:
        model.set_learning_rate(learning_rate)
    if proximal_mu is not None:
        model.set_proximal_mu(proximal_mu)
    if reset_optimizer:
        model.reset_optimizer()
    model.reset_metrics()
    before = model.get_weights()
    epoch_batches = itertools.chain([first_epoch], (local.batches(model.batch_size, seed) for seed in seeds[1:]))
    start = time.monotonic()
    try:
        steps, num_examples, stopped_early = _run_steps(model, "train", epoch_batches, max_steps, max_seconds, start)
    except BaseException:
        model.set_weights(before)
        raise
    seconds = time.monotonic() - start
    delta = [np.subtract(after, old, dtype=np.float32) for after, old in zip(model.get_weights(), before)]
    return LocalResult(delta, num_examples, model.report_metrics(), steps, seconds, stopped_early)


def evaluate_locally(model: TrainableModel, data: Any) -> dict[str, float]:
    """The unfinalized metrics of `model` over all of `data`; weights are unchanged."""
    local = load_local_data(data, model.manifest)
    model.reset_metrics()
    _run_steps(model, "evaluate", [local.batches(model.batch_size)], None, None, time.monotonic())
    return model.report_metrics()


def _run_steps(model: TrainableModel, signature: str, epoch_batches: Iterable[Iterable[Batch]],
               max_steps: int | None, max_seconds: float | None, start: float) -> tuple[int, int, bool]:
    """Run `signature` on every batch until a budget runs out; returns (steps, examples, stopped early)."""
    steps = examples = 0
    for batches in epoch_batches:
        for x, y, mask in batches:
            if (max_steps is not None and steps >= max_steps) or (
                    max_seconds is not None and time.monotonic() - start >= max_seconds):
                return steps, examples, True
            # Batches were checked against the manifest once (data.py); skip TrainableModel's per-batch checks.
            model._run(signature, x=x, y=y, mask=mask)
            steps += 1
            examples += mask.shape[0] if mask[-1] else int(mask.sum())  # real rows come first
    return steps, examples, False


def _check_count(name: str, value: Any, minimum: int) -> None:
    """ValueError unless `value` is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
