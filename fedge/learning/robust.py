"""Robust aggregators against poisoned updates: coordinate-wise median and trimmed mean (Yin et al., 2018).

Both are unweighted: every client that trained on something counts once, whatever its
weight, because a device's example count is its own claim and a liar could claim a huge one.
Unlike the streaming mean they must hold every update of the round until it closes: memory
O(clients x model), float32.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedge.learning.aggregation import Aggregator, RoundAggregation


class _HeldUpdates(RoundAggregation):
    """Keeps every contributing client's delta as one flat float32 vector; the subclass reduces them per coordinate."""

    def __init__(self) -> None:
        """No update held yet."""
        super().__init__()
        self._flat: list[np.ndarray] = []
        self._shapes: list[tuple[int, ...]] = []

    def _add(self, delta: Sequence[np.ndarray], weight: float) -> None:
        """Hold a flat float32 copy of the delta."""
        if not self._shapes:
            self._shapes = [np.shape(d) for d in delta]
        self._flat.append(np.concatenate([np.ravel(np.asarray(d, dtype=np.float32)) for d in delta]))

    def result(self) -> list[np.ndarray] | None:
        """The per-coordinate reduction of the held updates, reshaped like the deltas."""
        if not self._flat:
            return None
        reduced = self._reduce(np.stack(self._flat)).astype(np.float32)
        sizes = [math.prod(shape) for shape in self._shapes]
        pieces = np.split(reduced, np.cumsum(sizes)[:-1])
        return [piece.reshape(shape) for piece, shape in zip(pieces, self._shapes)]

    @abc.abstractmethod
    def _reduce(self, updates: np.ndarray) -> np.ndarray:
        """One value per coordinate from `updates` (clients x coordinates)."""


class _Median(_HeldUpdates):
    """Coordinate-wise median (the mean of the two middle values for an even count)."""

    def _reduce(self, updates: np.ndarray) -> np.ndarray:
        """np.median over clients."""
        return np.median(updates, axis=0)


class _TrimmedMean(_HeldUpdates):
    """Coordinate-wise mean after dropping the k largest and k smallest values, k = floor(trim_fraction * clients)."""

    def __init__(self, trim_fraction: float) -> None:
        """Trim `trim_fraction` of the clients at each end."""
        super().__init__()
        self._trim_fraction = trim_fraction
        self.trimmed_per_side = 0

    def _reduce(self, updates: np.ndarray) -> np.ndarray:
        """Sort each coordinate over clients, drop k at each end, average the rest in float64."""
        count = updates.shape[0]
        self.trimmed_per_side = math.floor(self._trim_fraction * count)
        kept = np.sort(updates, axis=0)[self.trimmed_per_side:count - self.trimmed_per_side]
        return kept.mean(axis=0, dtype=np.float64)

    def measurements(self) -> dict[str, Any]:
        """How many values were dropped at each end of every coordinate."""
        return {"trimmed_per_side": self.trimmed_per_side}


class CoordinateMedian(Aggregator):
    """Each coordinate of the aggregate is the median of the clients' values: holds while fewer than half lie."""

    def start(self, round_num: int) -> RoundAggregation:
        """A round that holds every update until it closes."""
        return _Median()

    def __repr__(self) -> str:
        """CoordinateMedian()."""
        return "CoordinateMedian()"


class TrimmedMean(Aggregator):
    """Each coordinate is the mean of the clients' values without the k largest and k smallest.

    k = floor(trim_fraction * contributing clients) per side, so 0 <= trim_fraction < 0.5; it
    withstands up to k poisoned clients, so set trim_fraction at least the fraction you expect to lie.
    """

    def __init__(self, trim_fraction: float = 0.1) -> None:
        """ValueError unless 0 <= trim_fraction < 0.5 (at least one value per coordinate must remain)."""
        if isinstance(trim_fraction, bool) or not isinstance(trim_fraction, (int, float)) \
                or not 0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be a number in [0, 0.5), got {trim_fraction!r}")
        self.trim_fraction = float(trim_fraction)

    def start(self, round_num: int) -> RoundAggregation:
        """A round that holds every update until it closes."""
        return _TrimmedMean(self.trim_fraction)

    def __repr__(self) -> str:
        """TrimmedMean(trim_fraction)."""
        return f"TrimmedMean({self.trim_fraction!r})"
