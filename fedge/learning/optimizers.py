"""Server optimizers in numpy: they turn the round's mean client delta into the next global weights.

The mean client delta acts as a negative pseudo-gradient (Reddi et al., 2021, "Adaptive
Federated Optimization", Algorithm 2). `SGD(1.0)` is plain FedAvg, `SGD(lr, momentum)` is
FedAvgM, `Adam`, `Yogi` and `Adagrad` are FedAdam, FedYogi and FedAdagrad. The adaptive ones
follow Algorithm 2 exactly, without bias correction:

    m = beta_1 * m + (1 - beta_1) * delta
    v = v + delta**2                                          (Adagrad)
    v = v - (1 - beta_2) * delta**2 * sign(v - delta**2)      (Yogi)
    v = beta_2 * v + (1 - beta_2) * delta**2                  (Adam)
    x = x + learning_rate * m / (sqrt(v) + epsilon)

`epsilon` is the paper's tau (adaptivity); v starts at `initial_accumulator_value`.
Optimizers are stateless objects: `initialize` builds the state, `apply` returns a new one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

State = dict[str, list[np.ndarray]]


def _zeros(weights: Sequence[np.ndarray], value: float = 0.0) -> list[np.ndarray]:
    """One float32 array filled with `value` per weight."""
    return [np.full(np.shape(w), value, dtype=np.float32) for w in weights]


def _check(name: str, value: float, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """`value` as a float in [low, high) (or (low, high) when `low_open`); ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < low or (low_open and value == low) or value >= high:
        raise ValueError(f"{name} must be a finite number in {'(' if low_open else '['}{low}, {high}), got {value!r}")
    return float(value)


class ServerOptimizer:
    """Interface: `initialize(trainable_weights) -> state`, `apply(state, weights, mean_delta) -> (state, weights)`."""

    def initialize(self, trainable_weights: Sequence[np.ndarray]) -> State:
        """The optimizer state for these weights: slot name -> one array per weight."""
        raise NotImplementedError

    def apply(self, state: State, weights: Sequence[np.ndarray],
              mean_delta: Sequence[np.ndarray]) -> tuple[State, list[np.ndarray]]:
        """One server step; inputs are left unchanged."""
        raise NotImplementedError


class SGD(ServerOptimizer):
    """x += learning_rate * m with m = momentum * m + delta (FedAvgM; momentum 0 is FedAvg's x += lr * delta)."""

    def __init__(self, learning_rate: float = 1.0, momentum: float = 0.0) -> None:
        """learning_rate > 0 (1.0 applies the mean delta as is); momentum in [0, 1)."""
        self.learning_rate = _check("learning_rate", learning_rate, 0.0, low_open=True)
        self.momentum = _check("momentum", momentum, 0.0, 1.0)

    def initialize(self, trainable_weights: Sequence[np.ndarray]) -> State:
        """No state without momentum; a momentum buffer per weight otherwise."""
        return {"momentum": _zeros(trainable_weights)} if self.momentum else {}

    def apply(self, state: State, weights: Sequence[np.ndarray],
              mean_delta: Sequence[np.ndarray]) -> tuple[State, list[np.ndarray]]:
        """One FedAvg(M) step."""
        lr = np.float32(self.learning_rate)
        if not self.momentum:
            return {}, [w + lr * d for w, d in zip(weights, mean_delta)]
        momentum = [np.float32(self.momentum) * m + d for m, d in zip(state["momentum"], mean_delta)]
        return {"momentum": momentum}, [w + lr * m for w, m in zip(weights, momentum)]


class _Adaptive(ServerOptimizer):
    """Reddi et al.'s Algorithm 2; subclasses define the second-moment update."""

    def __init__(self, learning_rate: float, beta_1: float, beta_2: float, epsilon: float,
                 initial_accumulator_value: float) -> None:
        """Check and keep the hyper-parameters."""
        self.learning_rate = _check("learning_rate", learning_rate, 0.0, low_open=True)
        self.beta_1 = _check("beta_1", beta_1, 0.0, 1.0)
        self.beta_2 = _check("beta_2", beta_2, 0.0, 1.0)
        self.epsilon = _check("epsilon", epsilon, 0.0, low_open=True)
        self.initial_accumulator_value = _check("initial_accumulator_value", initial_accumulator_value, 0.0)

    def initialize(self, trainable_weights: Sequence[np.ndarray]) -> State:
        """First moment m = 0 and second moment v = initial_accumulator_value, per weight."""
        return {"m": _zeros(trainable_weights), "v": _zeros(trainable_weights, self.initial_accumulator_value)}

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """The new v from the old v and delta**2."""
        raise NotImplementedError

    def apply(self, state: State, weights: Sequence[np.ndarray],
              mean_delta: Sequence[np.ndarray]) -> tuple[State, list[np.ndarray]]:
        """One adaptive server step."""
        b1, lr, eps = np.float32(self.beta_1), np.float32(self.learning_rate), np.float32(self.epsilon)
        m = [b1 * m + (1 - b1) * d for m, d in zip(state["m"], mean_delta)]
        v = [self._second_moment(v, np.square(d)) for v, d in zip(state["v"], mean_delta)]
        new_weights = [w + lr * m_i / (np.sqrt(v_i) + eps) for w, m_i, v_i in zip(weights, m, v)]
        return {"m": m, "v": v}, new_weights


class Adam(_Adaptive):
    """FedAdam: v = beta_2 * v + (1 - beta_2) * delta**2."""

    def __init__(self, learning_rate: float, beta_1: float = 0.9, beta_2: float = 0.99, epsilon: float = 1e-3,
                 initial_accumulator_value: float = 0.0) -> None:
        """Defaults are the paper's beta_1, beta_2 and tau = 1e-3."""
        super().__init__(learning_rate, beta_1, beta_2, epsilon, initial_accumulator_value)

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """Exponential moving average of delta**2."""
        b2 = np.float32(self.beta_2)
        return b2 * v + (1 - b2) * squared


class Yogi(_Adaptive):
    """FedYogi: v = v - (1 - beta_2) * delta**2 * sign(v - delta**2)."""

    def __init__(self, learning_rate: float, beta_1: float = 0.9, beta_2: float = 0.99, epsilon: float = 1e-3,
                 initial_accumulator_value: float = 1e-6) -> None:
        """Defaults are the paper's beta_1, beta_2 and tau = 1e-3, and TFF's initial accumulator 1e-6."""
        super().__init__(learning_rate, beta_1, beta_2, epsilon, initial_accumulator_value)

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """Additive update that moves v towards delta**2 by at most (1 - beta_2) * delta**2."""
        return v - (1 - np.float32(self.beta_2)) * squared * np.sign(v - squared)


class Adagrad(_Adaptive):
    """FedAdagrad: v = v + delta**2 (with the paper's first moment m; beta_1=0 gives plain Adagrad)."""

    def __init__(self, learning_rate: float, beta_1: float = 0.9, epsilon: float = 1e-3,
                 initial_accumulator_value: float = 0.0) -> None:
        """Defaults are the paper's beta_1 and tau = 1e-3."""
        super().__init__(learning_rate, beta_1, 0.0, epsilon, initial_accumulator_value)

    def _second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """Sum of every round's delta**2."""
        return v + squared
