"""A real federated dataset with no download: scikit-learn's 1797 handwritten digits, partitioned into clients."""

from __future__ import annotations

import numpy as np

from fedge.simulation.datasets import partition as _partition
from fedge.simulation.datasets.client_data import ClientData, ClientDataset

PARTITIONS = tuple(_partition.PARTITIONERS)  # the partitioners load_data takes


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All digits as x float32 [1797, 8, 8, 1] in [0, 1] (pixels / 16) and y int32 [1797] (imports scikit-learn)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32)[..., None], digits.target.astype(np.int32)


def train_test_arrays(test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): a seeded permutation, the first `1 - test_fraction` to train."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    x, y = load_arrays()
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int((1 - test_fraction) * len(x))
    train, test = order[:cut], order[cut:]
    return x[train], y[train], x[test], y[test]


def load_data(
    num_clients: int = 20,
    partition: str = "dirichlet",
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[ClientData, ClientDataset]:
    """Federated train clients and a centralized held-out test set, deterministic for a seed.

    A seeded permutation puts the first `int((1 - test_fraction) * 1797)` digits in train (1437
    train, 360 test by default, the split of examples/convert_and_train.py); the train digits
    are then partitioned with `partition.<partition>(..., seed=seed)`. `alpha` is the Dirichlet
    concentration of "dirichlet" (label skew) and of "quantity_skew" (client sizes); "iid" and
    "shards" (2 shards per client) ignore it.
    """
    x_train, y_train, x_test, y_test = train_test_arrays(test_fraction, seed)
    clients = _partition.split(partition, x_train, y_train, num_clients, seed=seed, alpha=alpha)
    return clients, ClientDataset(x_test, y_test)
