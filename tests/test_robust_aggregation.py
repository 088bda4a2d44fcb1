"""Aggregators against poisoned devices: the mean, norm clipping, coordinate-wise median and trimmed mean.

Each aggregator is checked against numpy written here; then a federated run on the digits, in
which 3 of 10 clients send their honest delta times -10, shows plain FedAvg wrecked and the
robust aggregators holding accuracy, all measured in the same test.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import fedge.learning as fl
from fedge.cli import build_parser
from fedge.learning.aggregation import Aggregator
from fedge.learning.evaluation import FederatedEvaluation
from device_runtime.artifact import Artifact
from device_runtime.protocol import ClientWork, RoundConfig
from fedge.job import JobError, parse_job
from fedge.job.options import job_overrides
from fedge.learning.executors import ClientUpdate, Executor, InProcessExecutor
from fedge.learning.process import LearningProcess
from fedge.simulation.datasets import digits

SHAPES = [(3, 4), (4,), ()]


def _deltas(count: int, seed: int = 0, scale: float = 1.0) -> list[list[np.ndarray]]:
    """`count` random client deltas of SHAPES (float32)."""
    rng = np.random.default_rng(seed)
    return [[(scale * rng.normal(size=shape)).astype(np.float32) for shape in SHAPES] for _ in range(count)]


def _aggregate(aggregator: Aggregator, deltas: Sequence[Sequence[np.ndarray]], weights: Sequence[float]
               ) -> tuple[list[np.ndarray] | None, dict[str, Any]]:
    """One round of `aggregator` over the clients: (result, measurements)."""
    aggregation = aggregator.start(0)
    for delta, weight in zip(deltas, weights):
        aggregation.add(delta, weight)
    assert aggregation.num_clients == len(deltas)
    return aggregation.result(), aggregation.measurements()


def _stacked(deltas: Sequence[Sequence[np.ndarray]], index: int) -> np.ndarray:
    """Tensor `index` of every client, stacked on a new first axis, in float64."""
    return np.stack([np.asarray(d[index], np.float64) for d in deltas])


def _assert_close(result: list[np.ndarray] | None, expected: Sequence[np.ndarray]) -> None:
    assert result is not None and len(result) == len(expected)
    for got, want in zip(result, expected):
        assert got.dtype == np.float32 and got.shape == np.shape(want)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------- unit tests


def test_mean_aggregator_is_the_weighted_mean_and_skips_clients_of_weight_zero():
    deltas, weights = _deltas(5), [3.0, 0.0, 1.0, 7.0, 2.0]
    result, measurements = _aggregate(fl.MeanAggregator(), deltas, weights)
    w = np.array(weights)
    _assert_close(result, [np.tensordot(w, _stacked(deltas, i), axes=1) / w.sum() for i in range(len(SHAPES))])
    assert measurements == {}
    assert _aggregate(fl.MeanAggregator(), deltas[:2], [0.0, 0.0])[0] is None


def test_norm_clipping_scales_each_delta_down_to_the_norm_then_aggregates():
    deltas, weights = _deltas(6, seed=1, scale=0.4), [1.0, 2.0, 3.0, 1.0, 1.0, 2.0]
    deltas[2] = [100 * d for d in deltas[2]]  # a scaled-up (poisoned) update
    norms = [np.sqrt(sum(np.sum(np.square(t, dtype=np.float64)) for t in d)) for d in deltas]
    clip = float(np.median(norms))
    result, measurements = _aggregate(fl.NormClipping(clip), deltas, weights)
    factors = np.minimum(1.0, clip / np.array(norms))
    w = np.array(weights) * factors  # clipping = scaling each client's delta by min(1, S / ||delta||)
    _assert_close(result, [np.tensordot(w, _stacked(deltas, i), axes=1) / np.sum(weights) for i in range(3)])
    assert measurements == {"clipping_norm": clip, "clipped_clients": int(np.sum(np.array(norms) > clip))}
    assert measurements["clipped_clients"] == 3

    # in front of another aggregator: the median of the clipped deltas
    median, _ = _aggregate(fl.NormClipping(clip, fl.CoordinateMedian()), deltas, weights)
    _assert_close(median, [np.median(_stacked(deltas, i) * factors.reshape((-1,) + (1,) * len(SHAPES[i])), axis=0)
                           for i in range(3)])


@pytest.mark.parametrize("count", [5, 6])
def test_coordinate_median_is_numpys_median_over_contributing_clients_whatever_their_weight(count):
    deltas = _deltas(count, seed=2)
    weights = [1.0, 50.0, 2.0, 0.0, 1.0, 9.0][:count]
    result, _ = _aggregate(fl.CoordinateMedian(), deltas, weights)
    kept = [d for d, w in zip(deltas, weights) if w > 0]
    _assert_close(result, [np.median(_stacked(kept, i), axis=0) for i in range(3)])
    assert _aggregate(fl.CoordinateMedian(), deltas[:1], [0.0])[0] is None


@pytest.mark.parametrize("trim_fraction", [0.0, 0.1, 0.25, 0.3, 0.49])
def test_trimmed_mean_drops_floor_fraction_times_clients_at_each_end(trim_fraction):
    deltas = _deltas(10, seed=3)
    result, measurements = _aggregate(fl.TrimmedMean(trim_fraction), deltas, [1.0] * 10)
    k = int(np.floor(trim_fraction * 10))
    expected = [np.sort(_stacked(deltas, i), axis=0)[k:10 - k].mean(axis=0) for i in range(3)]
    _assert_close(result, expected)
    _assert_close(result, [scipy.stats.trim_mean(_stacked(deltas, i), trim_fraction, axis=0) for i in range(3)])
    assert measurements == {"trimmed_per_side": k}


def test_robust_aggregators_ignore_how_large_the_outliers_are():
    honest = _deltas(7, seed=4)
    results = []
    for factor in (-10.0, -100.0, -1e6):
        poisoned = [[factor * (1 + np.abs(t)) for t in d] for d in _deltas(3, seed=5)]  # all below every honest value
        results.append([_aggregate(aggregator, honest + poisoned, [1.0] * 10)[0]
                         for aggregator in (fl.TrimmedMean(0.3), fl.CoordinateMedian(), fl.NormClipping(1.0))])
    for robust in (0, 1):  # the 3 outliers are always the ones trimmed, always below the median
        for first, last in zip(results[0][robust], results[-1][robust]):
            np.testing.assert_array_equal(first, last)
    for clipped_a, clipped_b in zip(results[0][2], results[-1][2]):
        np.testing.assert_allclose(clipped_a, clipped_b, atol=1e-6)  # each clipped to the same norm


@pytest.mark.parametrize("make, message", [
    (lambda: fl.TrimmedMean(0.5), "trim_fraction must be a number in [0, 0.5)"),
    (lambda: fl.TrimmedMean(-0.1), "trim_fraction must be a number in [0, 0.5)"),
    (lambda: fl.NormClipping(0.0), "clipping_norm must be a finite number > 0"),
    (lambda: fl.NormClipping(float("nan")), "clipping_norm must be a finite number > 0"),
    (lambda: fl.NormClipping(1.0, "median"), "inner must be a fedge.learning.aggregation.Aggregator"),
])
def test_bad_aggregator_arguments_are_refused_with_their_name(make, message):
    with pytest.raises((ValueError, TypeError)) as error:
        make()
    assert message in str(error.value)


def serve_aggregator(*flags: str) -> Aggregator:
    """The aggregator `fedge serve` builds from these flags: parsed by its parser, checked by the job loader."""
    args = build_parser().parse_args(["serve", "model.tflite", "--broker", "mqtt://localhost", "--fleet", "f",
                                      "--clients-per-round", "4", *flags])
    job = parse_job({"model": {"factory": "models:build"}}, None, Path.cwd(), job_overrides(args))
    return job.process.aggregator.build(job.rounds.clients_per_round)  # as fedge.job.build builds the process


def test_fedge_serve_flags_select_the_aggregator():
    assert isinstance(serve_aggregator(), fl.MeanAggregator)
    assert isinstance(serve_aggregator("--aggregator", "median"), fl.CoordinateMedian)
    trimmed = serve_aggregator("--aggregator", "trimmed_mean", "--trim-fraction", "0.3")
    assert isinstance(trimmed, fl.TrimmedMean) and trimmed.trim_fraction == 0.3
    assert serve_aggregator("--aggregator", "trimmed_mean").trim_fraction == 0.1
    clipped = serve_aggregator("--aggregator", "median", "--clip-norm", "2.5")
    assert isinstance(clipped, fl.NormClipping) and clipped.clipping_norm == 2.5
    assert isinstance(clipped.inner, fl.CoordinateMedian)


@pytest.mark.parametrize("flags, message", [
    (["--trim-fraction", "0.2"], 'process.aggregator: trim_fraction applies to name = "trimmed_mean"'),
    (["--aggregator", "trimmed_mean", "--trim-fraction", "0.5"],
     "process.aggregator.trim_fraction must be a number >= 0 and <= 0.49, got 0.5"),
])
def test_fedge_serve_refuses_clashing_aggregator_flags(flags, message):
    with pytest.raises(JobError) as error:
        serve_aggregator(*flags)
    assert message in str(error.value)


def test_a_process_refuses_something_that_is_not_an_aggregator(process_parts):
    artifact, executor = process_parts
    with pytest.raises(TypeError, match="model_aggregator must be a fedge.learning.aggregation.Aggregator, got str"):
        LearningProcess(artifact, ClientWork(), fl.ClientWeighting.NUM_EXAMPLES, fl.optimizers.SGD(1.0),
                        executor, "median")


# ------------------------------------------------------------------------------ poisoned devices

NUM_CLIENTS, POISONED, FACTOR, ROUNDS = 10, (0, 1, 2), -10.0, 20


class PoisoningExecutor(Executor):
    """TEST-ONLY attacker: runs `inner` honestly, then multiplies the deltas of the `poisoned` clients by `factor`.

    This is what a malicious device can send: any delta it likes, with its honest example count.
    """

    def __init__(self, inner: Executor, poisoned: Sequence[int], factor: float) -> None:
        self.inner, self.poisoned, self.factor = inner, set(poisoned), factor

    def train(self, artifact: Artifact, weights: Sequence[np.ndarray], clients: Sequence[Any],
              config: RoundConfig) -> Iterator[ClientUpdate]:
        for index, update in enumerate(self.inner.train(artifact, weights, clients, config)):
            if index in self.poisoned:
                update.delta = [(self.factor * d).astype(np.float32) for d in update.delta]
            yield update

    def evaluate(self, artifact: Artifact, weights: Sequence[np.ndarray], clients: Sequence[Any]) -> Iterator[dict]:
        return self.inner.evaluate(artifact, weights, clients)


def _digits_model_fn() -> fl.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    spec = (tf.TensorSpec([None, 8, 8, 1], tf.float32), tf.TensorSpec([None], tf.int32))
    return fl.from_keras_model(model, loss="sparse_categorical_crossentropy", input_spec=spec, metrics=["accuracy"])


@pytest.fixture(scope="module")
def inline() -> Iterator[InProcessExecutor]:
    with InProcessExecutor(num_workers=0) as executor:
        yield executor


@pytest.fixture(scope="module")
def process_parts(inline: InProcessExecutor) -> tuple[Artifact, InProcessExecutor]:
    """The digits softmax-regression artifact (converted once) and the inline executor."""
    process = fl.build_federated_averaging_process(_digits_model_fn, lambda: keras.optimizers.SGD(0.3),
                                                   batch_size=16, executor=inline)
    return process.artifact, inline


def test_poisoned_devices_wreck_fedavg_and_the_robust_aggregators_hold_accuracy(process_parts):
    artifact, inline = process_parts
    train, test = digits.load_data(num_clients=NUM_CLIENTS, partition="iid", seed=0)
    clients = [train.create_dataset_for_client(c) for c in train.client_ids]
    evaluation = FederatedEvaluation(artifact, inline)
    # clipping norm: a little under the honest clients' first-round delta norms (about 1.2 here)
    runs: dict[str, tuple[Aggregator | None, tuple[int, ...]]] = {
        "fedavg, no attack": (None, ()),
        "fedavg": (None, POISONED),
        "median": (fl.CoordinateMedian(), POISONED),
        "trimmed mean 0.3": (fl.TrimmedMean(0.3), POISONED),
        "norm clipping 1.0": (fl.NormClipping(1.0), POISONED),
    }
    accuracy, last_metrics = {}, {}
    for name, (aggregator, poisoned) in runs.items():
        process = LearningProcess(artifact, ClientWork(), fl.ClientWeighting.NUM_EXAMPLES,
                                  fl.optimizers.SGD(1.0), PoisoningExecutor(inline, poisoned, FACTOR), aggregator)
        state = process.initialize()
        for _ in range(ROUNDS):
            state, last_metrics[name] = process.next(state, clients)
        accuracy[name] = evaluation(process.get_model_weights(state), [test])["eval"]["accuracy"]
    print(f"\nheld-out accuracy after {ROUNDS} rounds, clients {list(POISONED)} of {NUM_CLIENTS} sending "
          f"{FACTOR:g} x their delta: " + ", ".join(f"{name} {value:.3f}" for name, value in accuracy.items()))

    clean = accuracy["fedavg, no attack"]
    assert clean > 0.85
    assert accuracy["fedavg"] < clean - 0.5  # harmed: near chance (0.1)
    assert accuracy["median"] > clean - 0.05
    assert accuracy["trimmed mean 0.3"] > clean - 0.05
    assert accuracy["norm clipping 1.0"] > accuracy["fedavg"] + 0.4  # bounded harm: attackers count at most S each
    assert last_metrics["norm clipping 1.0"]["aggregator"]["clipped_clients"] >= len(POISONED)
    assert last_metrics["trimmed mean 0.3"]["aggregator"]["trimmed_per_side"] == 3
    assert last_metrics["fedavg"]["finalizer"]["update_norm"] > 5 * last_metrics["median"]["finalizer"]["update_norm"]
