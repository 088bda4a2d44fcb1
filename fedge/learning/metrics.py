"""Federated metrics: clients report unfinalized sums (loss_sum, num_examples, ...); the server sums, then finalizes.

Summing before dividing weights every example equally across clients (a client's mean loss
is never averaged with another's), as TFF's `sum_then_finalize`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from device_runtime import finalize_metrics

Finalizers = Mapping[str, Sequence[str]]


def finalize(finalizers: Finalizers, summed: Mapping[str, float]) -> dict[str, float]:
    """Apply manifest-style finalizers ("divide", "identity") to summed metric variables."""
    return finalize_metrics(finalizers, summed)


class SumThenFinalize:
    """An aggregator of client metrics: `add` each client's unfinalized sums, then `result()`."""

    def __init__(self, finalizers: Finalizers) -> None:
        """Aggregate with these finalizers (manifest.metrics.finalizers or Model.metric_finalizers())."""
        self.finalizers = dict(finalizers)
        self.sums: dict[str, float] = {}

    def add(self, unfinalized: Mapping[str, float]) -> None:
        """Add one client's unfinalized metric variables to the running sums."""
        for name, value in unfinalized.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def result(self) -> dict[str, float]:
        """The finalized metrics of everything added so far (0 for a divide by 0, e.g. no client)."""
        needed = {arg for _, *args in self.finalizers.values() for arg in args}
        return finalize(self.finalizers, {name: 0.0 for name in needed} | self.sums)


def sum_then_finalize(finalizers: Finalizers) -> SumThenFinalize:
    """A fresh aggregator that sums unfinalized client metrics and then finalizes them."""
    return SumThenFinalize(finalizers)
