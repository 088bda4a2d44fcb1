"""DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent Language Models").

Each client's delta is clipped to L2 norm S, the clipped deltas are summed, Gaussian noise of
standard deviation z * S is added to every coordinate of the sum, and the sum is divided by a
fixed denominator, the expected clients per round, never by how many reported (which would
leak). The privacy spent is accounted by dp-accounting's RDP accountant, not by hand: one
Gaussian mechanism per round, Poisson-subsampled with the sampling probability when clients
are a sample of a population. This is central DP: the server sees the clipped deltas.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedge.learning.aggregation import Aggregator, RoundAggregation, check_clipping_norm, clip_to_norm

def dp_epsilon(noise_multiplier: float, rounds: int, target_delta: float, sampling_probability: float = 1.0) -> float:
    """The epsilon spent by `rounds` rounds of DP-FedAvg at `target_delta`, by dp-accounting's RDP accountant.

    Each round is a Gaussian mechanism of noise multiplier z on a sum of sensitivity S (one
    client added or removed), Poisson-subsampled with `sampling_probability` when it is below 1
    (then at the accountant's integer RDP orders only).
    """
    return _epsilon(float(noise_multiplier), int(rounds), float(target_delta), float(sampling_probability))


@functools.lru_cache(maxsize=256)
def _epsilon(noise_multiplier: float, rounds: int, target_delta: float, sampling_probability: float) -> float:
    """dp_epsilon, cached: a server asks once per round with the same parameters (imported here: scipy is slow)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS

    orders = list(DEFAULT_RDP_ORDERS)
    event: Any = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_probability < 1:
        event = dp_accounting.PoissonSampledDpEvent(sampling_probability, event)
        # Integer orders only: the library's series at fractional orders may not converge for a subsampled
        # Gaussian (it then skips the order and logs a warning, each round); integer orders are exact.
        orders = [order for order in orders if float(order).is_integer()]
    accountant = RdpAccountant(orders)
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(target_delta))


class _GaussianSum(RoundAggregation):
    """Sums clipped deltas in float64 (memory O(model)); the result adds the noise and divides by the denominator."""

    def __init__(self, factory: GaussianFixedDP, round_num: int) -> None:
        """One round of `factory`; its noise generator is seeded from (seed, round) when the factory has a seed."""
        super().__init__()
        self._factory, self._round_num = factory, round_num
        self._rng = np.random.default_rng(None if factory.seed is None else [factory.seed, round_num])
        self._sums: list[np.ndarray] | None = None
        self.clipped_clients = 0

    def _add(self, delta: Sequence[np.ndarray], weight: float) -> None:
        """Clip to S and add; the client's weight is not used (each client counts once)."""
        clipped, was_clipped = clip_to_norm(delta, self._factory.clipping_norm)
        self.clipped_clients += was_clipped
        if self._sums is None:
            self._sums = [np.zeros(np.shape(d), dtype=np.float64) for d in clipped]
        for total, d in zip(self._sums, clipped, strict=True):
            total += d

    def result(self) -> list[np.ndarray] | None:
        """(sum of clipped deltas + N(0, (z S)^2) per coordinate) / clients_per_round, as float32."""
        if self._sums is None:
            return None
        factory = self._factory
        std = factory.noise_multiplier * factory.clipping_norm
        return [((total + self._rng.normal(0.0, std, total.shape)) / factory.clients_per_round).astype(np.float32)
                for total in self._sums]

    def measurements(self) -> dict[str, Any]:
        """Epsilon spent after this round (rounds 0..round_num) at the target delta, and the mechanism's parameters."""
        factory = self._factory
        return {"dp_epsilon": factory.epsilon(self._round_num + 1), "dp_delta": factory.target_delta,
                "dp_noise_multiplier": factory.noise_multiplier, "clipping_norm": factory.clipping_norm,
                "clipped_clients": self.clipped_clients}


class GaussianFixedDP(Aggregator):
    """DP-FedAvg (TFF's DifferentiallyPrivateFactory.gaussian_fixed): clip to S, noise of std z*S, fixed denominator.

    `clients_per_round` is the denominator (the expected number of reporting clients);
    `sampling_probability` the chance a given client takes part in a round (clients per round
    over population) for privacy amplification, 1.0 for none; `target_delta` the delta epsilon
    is reported at; `seed` makes the noise reproducible, for tests only: noise an adversary can
    predict protects nothing, so leave it None (fresh OS entropy every round) in production.
    """

    def __init__(self, noise_multiplier: float, clients_per_round: int, clipping_norm: float, *,
                 target_delta: float = 1e-5, sampling_probability: float = 1.0, seed: int | None = None) -> None:
        """ValueError naming the argument when a value cannot work."""
        if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)) \
                or not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be a finite number > 0 (for clipping alone use NormClipping), "
                             f"got {noise_multiplier!r}")
        if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, (int, np.integer)) \
                or clients_per_round < 1:
            raise ValueError(f"clients_per_round must be an integer >= 1, got {clients_per_round!r}")
        if isinstance(target_delta, bool) or not isinstance(target_delta, (int, float)) or not 0 < target_delta < 1:
            raise ValueError(f"target_delta must be a number in (0, 1), got {target_delta!r}")
        if isinstance(sampling_probability, bool) or not isinstance(sampling_probability, (int, float)) \
                or not 0 < sampling_probability <= 1:
            raise ValueError(f"sampling_probability must be a number in (0, 1], got {sampling_probability!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.clients_per_round = int(clients_per_round)
        self.clipping_norm = check_clipping_norm(clipping_norm)
        self.target_delta = float(target_delta)
        self.sampling_probability = float(sampling_probability)
        self.seed = seed

    def start(self, round_num: int) -> RoundAggregation:
        """An empty noisy sum for round `round_num`."""
        return _GaussianSum(self, round_num)

    def epsilon(self, rounds: int) -> float:
        """The epsilon spent after `rounds` rounds at `target_delta`."""
        return dp_epsilon(self.noise_multiplier, rounds, self.target_delta, self.sampling_probability)

    def __repr__(self) -> str:
        """GaussianFixedDP(...) with its parameters (not the seed)."""
        return (f"GaussianFixedDP(noise_multiplier={self.noise_multiplier!r}, "
                f"clients_per_round={self.clients_per_round!r}, clipping_norm={self.clipping_norm!r}, "
                f"target_delta={self.target_delta!r}, sampling_probability={self.sampling_probability!r})")
