"""Aggregators: how a round's client deltas become one delta (the aggregator part of a federated process).

An `Aggregator` is a process's replaceable aggregation piece (TFF's aggregation factory): each
round it starts a `RoundAggregation`, clients are added one at a time as their updates arrive,
and `result()` gives the delta the server optimizer steps with. `MeanAggregator` (the default,
FedAvg's weighted mean) streams into running sums, memory O(model); `NormClipping` wraps another
aggregator; fedge.learning.robust holds the median and trimmed mean, fedge.learning.privacy DP-FedAvg.
"""

from __future__ import annotations

import abc
import enum
import math
from collections.abc import Sequence
from typing import Any

import numpy as np


class ClientWeighting(enum.Enum):
    """How much each client's delta counts in the mean (TFF's ClientWeighting)."""

    NUM_EXAMPLES = "num_examples"  # by the examples it trained on (epochs counted): FedAvg's weighting
    UNIFORM = "uniform"  # every client that trained on something counts the same

    def weight(self, num_examples: int) -> float:
        """The weight of a client that trained on `num_examples`; 0 when it trained on nothing."""
        if num_examples <= 0:
            return 0.0
        return float(num_examples) if self is ClientWeighting.NUM_EXAMPLES else 1.0


class RoundAggregation(abc.ABC):
    """One round of an aggregator: `add` each client's delta and weight, then `result()` and `measurements()`.

    A client of weight 0 (it trained on nothing) is counted in `num_clients` and otherwise ignored.
    """

    def __init__(self) -> None:
        """No client yet."""
        self.num_clients = 0
        self.total_weight = 0.0

    def add(self, delta: Sequence[np.ndarray], weight: float) -> None:
        """Count one client and fold its delta (every weight, manifest order) into the aggregate."""
        self.num_clients += 1
        if weight == 0:
            return
        self.total_weight += weight
        self._add(delta, weight)

    @abc.abstractmethod
    def _add(self, delta: Sequence[np.ndarray], weight: float) -> None:
        """Fold in one client of weight > 0."""

    @abc.abstractmethod
    def result(self) -> list[np.ndarray] | None:
        """The aggregate delta as float32 arrays, or None when no client had a weight above 0."""

    def measurements(self) -> dict[str, Any]:
        """What the aggregator adds to the round's metrics (e.g. clipped clients, epsilon)."""
        return {}


class Aggregator(abc.ABC):
    """A process's aggregation piece; `start(round_num)` gives that round's RoundAggregation."""

    @abc.abstractmethod
    def start(self, round_num: int) -> RoundAggregation:
        """An empty aggregation for round `round_num`."""


class WeightedMean(RoundAggregation):
    """Accumulates sum(weight * delta) and sum(weight) one client at a time, in float64: memory O(model)."""

    def __init__(self) -> None:
        """An empty mean; the sums are allocated by the first contributing client."""
        super().__init__()
        self._sums: list[np.ndarray] | None = None

    def _add(self, delta: Sequence[np.ndarray], weight: float) -> None:
        """Add weight * delta to the running sums."""
        if self._sums is None:
            self._sums = [np.zeros(np.shape(d), dtype=np.float64) for d in delta]
        for total, d in zip(self._sums, delta, strict=True):
            total += np.multiply(d, weight, dtype=np.float64)  # one float64 temporary per weight

    def result(self) -> list[np.ndarray] | None:
        """The weighted mean delta as float32."""
        if self._sums is None:
            return None
        return [(total / self.total_weight).astype(np.float32) for total in self._sums]


class MeanAggregator(Aggregator):
    """FedAvg's aggregator (TFF's MeanFactory): the weighted mean of the deltas, streamed (memory O(model))."""

    def start(self, round_num: int) -> RoundAggregation:
        """A fresh WeightedMean."""
        return WeightedMean()

    def __repr__(self) -> str:
        """MeanAggregator()."""
        return "MeanAggregator()"


def global_norm(delta: Sequence[np.ndarray]) -> float:
    """The L2 norm of a whole delta (all its tensors as one vector), computed in float64."""
    return math.sqrt(sum(float(np.sum(np.square(d, dtype=np.float64))) for d in delta))


def clip_to_norm(delta: Sequence[np.ndarray], clipping_norm: float) -> tuple[list[np.ndarray], bool]:
    """`delta` scaled down to L2 norm `clipping_norm` when its norm is larger; (delta, whether it was clipped)."""
    norm = global_norm(delta)
    if norm <= clipping_norm:
        return list(delta), False
    scale = clipping_norm / norm
    return [np.multiply(d, scale, dtype=np.float64).astype(np.float32) for d in delta], True


def check_clipping_norm(clipping_norm: Any) -> float:
    """`clipping_norm` as a float, or ValueError unless it is a finite number > 0."""
    if isinstance(clipping_norm, bool) or not isinstance(clipping_norm, (int, float)) \
            or not math.isfinite(clipping_norm) or clipping_norm <= 0:
        raise ValueError(f"clipping_norm must be a finite number > 0, got {clipping_norm!r}")
    return float(clipping_norm)


class _ClippedAggregation(RoundAggregation):
    """Clips each client's delta to an L2 norm, then hands it to the inner aggregation."""

    def __init__(self, inner: RoundAggregation, clipping_norm: float) -> None:
        """Clip to `clipping_norm` in front of `inner`."""
        super().__init__()
        self._inner, self._clipping_norm = inner, clipping_norm
        self.clipped_clients = 0

    def _add(self, delta: Sequence[np.ndarray], weight: float) -> None:
        """Clip, count, pass on."""
        clipped, was_clipped = clip_to_norm(delta, self._clipping_norm)
        self.clipped_clients += was_clipped
        self._inner.add(clipped, weight)

    def result(self) -> list[np.ndarray] | None:
        """The inner aggregation's result over the clipped deltas."""
        return self._inner.result()

    def measurements(self) -> dict[str, Any]:
        """The clipping norm, how many clients were clipped, and the inner aggregation's measurements."""
        return {"clipping_norm": self._clipping_norm, "clipped_clients": self.clipped_clients,
                **self._inner.measurements()}


class NormClipping(Aggregator):
    """Clips each client's whole delta to L2 norm `clipping_norm`, then aggregates with `inner` (TFF: clipping_factory).

    A poisoned client can then move the aggregate by at most its weight times `clipping_norm`.
    """

    def __init__(self, clipping_norm: float, inner: Aggregator | None = None) -> None:
        """`inner` None clips in front of the weighted mean (MeanAggregator)."""
        self.clipping_norm = check_clipping_norm(clipping_norm)
        inner = MeanAggregator() if inner is None else inner
        if not isinstance(inner, Aggregator):
            raise TypeError(f"inner must be a fedge.learning.aggregation.Aggregator, got {type(inner).__name__}")
        self.inner = inner

    def start(self, round_num: int) -> RoundAggregation:
        """The inner aggregator's round, behind a clip."""
        return _ClippedAggregation(self.inner.start(round_num), self.clipping_norm)

    def __repr__(self) -> str:
        """NormClipping(clipping_norm, inner)."""
        return f"NormClipping({self.clipping_norm!r}, {self.inner!r})"
