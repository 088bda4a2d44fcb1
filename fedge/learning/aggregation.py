"""Streaming weighted mean of client deltas: running sums, memory O(model), never a list of updates."""

from __future__ import annotations

import enum
from collections.abc import Sequence

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


class WeightedMean:
    """Accumulates sum(weight * delta) and sum(weight) one client at a time, in float64."""

    def __init__(self) -> None:
        """An empty mean; the sums are allocated by the first contributing client."""
        self._sums: list[np.ndarray] | None = None
        self.total_weight = 0.0
        self.num_clients = 0

    def add(self, delta: Sequence[np.ndarray], weight: float) -> None:
        """Count one client; a client of weight 0 is counted but changes no sum."""
        self.num_clients += 1
        if weight == 0:
            return
        if self._sums is None:
            self._sums = [np.zeros(np.shape(d), dtype=np.float64) for d in delta]
        for total, d in zip(self._sums, delta, strict=True):
            total += np.multiply(d, weight, dtype=np.float64)  # one float64 temporary per weight
        self.total_weight += weight

    def mean(self) -> list[np.ndarray] | None:
        """The weighted mean delta as float32, or None when no client had a weight above 0."""
        if self._sums is None:
            return None
        return [(total / self.total_weight).astype(np.float32) for total in self._sums]
