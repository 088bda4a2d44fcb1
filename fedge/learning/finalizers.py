"""Builders for metric finalizers, the serializable specs a Model's metric_finalizers() returns.

The server sums clients' unfinalized metrics, then applies these (fedge.learning.metrics);
the same specs go into the artifact's manifest, so a device can finalize its own metrics.
"""

from __future__ import annotations


def divide(numerator: str, denominator: str) -> list[str]:
    """A metric that is one summed variable divided by another (0 when the denominator is 0), e.g. a mean loss."""
    return ["divide", numerator, denominator]


def identity(variable: str) -> list[str]:
    """A metric that is a summed variable itself, e.g. num_examples."""
    return ["identity", variable]
