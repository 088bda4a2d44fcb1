"""Partitioners: split one centralized `(x, y)` into a seeded, non-overlapping ClientData.

Every partitioner assigns each example to exactly one client, returns clients named
`client_000`, `client_001`, ... (zero-padded so sorted ids are in numeric order), keeps each
client's examples in a seeded random order, and gives the same split for the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedge.simulation.datasets._checks import require_int
from fedge.simulation.datasets.client_data import ClientData

_MAX_DIRICHLET_DRAWS = 1000


def client_id(index: int, num_clients: int) -> str:
    """The id of client `index` of `num_clients`: `client_007`, wider when there are 1000+ clients."""
    return f"client_{index:0{max(3, len(str(num_clients - 1)))}d}"


def _check(x: np.ndarray, y: np.ndarray, num_clients: int, min_per_client: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Arrays with matching lengths and enough examples for `num_clients` clients of `min_per_client`."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same leading length, got shapes {x.shape} and {y.shape}")
    num_clients = require_int("num_clients", num_clients, 1)
    if num_clients * min_per_client > len(x):
        raise ValueError(
            f"{len(x)} examples cannot give {num_clients} clients at least {min_per_client} example(s) each"
        )
    return x, y


def _labels(y: np.ndarray) -> np.ndarray:
    """Integer class labels of shape [N] (label-skew partitioners need them)."""
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"label-skew partitioning needs integer labels of shape [N], got {y.dtype}{list(y.shape)}")
    return y


def _build(x: np.ndarray, y: np.ndarray, parts: Sequence[np.ndarray], rng: np.random.Generator) -> ClientData:
    """ClientData with client i holding x[parts[i]], y[parts[i]] in a seeded random order."""
    mapping = {}
    for i, part in enumerate(parts):
        index = rng.permutation(np.asarray(part, dtype=np.int64))
        mapping[client_id(i, len(parts))] = (x[index], y[index])
    return ClientData.from_arrays(mapping)


def iid(x: np.ndarray, y: np.ndarray, num_clients: int, *, seed: int) -> ClientData:
    """Uniformly random clients of equal size (sizes differ by at most one): the IID baseline."""
    x, y = _check(x, y, num_clients)
    rng = np.random.default_rng(seed)
    return _build(x, y, np.array_split(rng.permutation(len(x)), num_clients), rng)


def dirichlet(
    x: np.ndarray, y: np.ndarray, num_clients: int, *, seed: int, alpha: float = 0.5, min_size: int = 10
) -> ClientData:
    """Label skew: each class is spread over clients in proportions drawn from Dirichlet(alpha).

    Small alpha concentrates each client on few labels; large alpha approaches IID. This is the
    scheme of the usual FL benchmark code (Yurochkin et al. 2019, NIID-Bench of Li et al. 2022):
    a client already holding N/num_clients examples gets no more of the next class, and the
    whole draw is repeated until every client holds at least `min_size` examples (ValueError
    after 1000 draws: lower `min_size` or raise `alpha`).
    """
    min_size = require_int("min_size", min_size, 0)
    x, y = _check(x, y, num_clients, min_size)
    labels = _labels(y)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    rng = np.random.default_rng(seed)
    quota = len(x) / num_clients
    for _ in range(_MAX_DIRICHLET_DRAWS):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == label))
            below = np.array([len(p) < quota for p in parts], dtype=np.float64)
            weights = rng.dirichlet(np.full(num_clients, alpha)) * below
            weights = weights / weights.sum() if weights.sum() > 0 else below / below.sum()
            cuts = (np.cumsum(weights) * len(members)).astype(np.int64)[:-1]
            for part, chunk in zip(parts, np.split(members, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return _build(x, y, [np.array(p) for p in parts], rng)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {_MAX_DIRICHLET_DRAWS} gave every one of {num_clients} clients "
        f"{min_size} examples; lower min_size or raise alpha"
    )


def shards(x: np.ndarray, y: np.ndarray, num_clients: int, *, seed: int, shards_per_client: int = 2) -> ClientData:
    """McMahan et al. 2017's pathological non-IID split: label-sorted shards, `shards_per_client` random ones each.

    Examples are sorted by label (ties in seeded random order) and cut into
    `num_clients * shards_per_client` contiguous shards of equal size (differing by at most one).
    A shard can straddle a label boundary, so a client holds at most `shards_per_client` labels
    exactly when every class size is a multiple of the shard size, as in the paper's MNIST setup.
    """
    shards_per_client = require_int("shards_per_client", shards_per_client, 1)
    x, y = _check(x, y, num_clients, shards_per_client)
    labels = _labels(y)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(x))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_clients * shards_per_client)
    order = rng.permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return _build(x, y, [np.concatenate([pieces[s] for s in row]) for row in order], rng)


def quantity_skew(
    x: np.ndarray,
    y: np.ndarray,
    num_clients: int,
    *,
    seed: int,
    sigma: float | None = None,
    alpha: float | None = None,
    min_size: int = 1,
) -> ClientData:
    """Unequal client sizes with IID labels; sizes follow log-normal(0, sigma) weights or Dirichlet(alpha).

    Give at most one of `sigma` (log-normal, as in FedProx/LEAF-style unbalanced data; default
    sigma=1.0) or `alpha` (Dirichlet proportions, NIID-Bench's quantity skew; smaller is more
    skewed). Each client first gets `min_size` examples; the rest are shared out in proportion
    to the weights (largest remainders get the leftovers), then filled from a random permutation.
    """
    if sigma is not None and alpha is not None:
        raise ValueError("give sigma (log-normal sizes) or alpha (Dirichlet sizes), not both")
    min_size = require_int("min_size", min_size, 0)
    x, y = _check(x, y, num_clients, min_size)
    rng = np.random.default_rng(seed)
    if alpha is not None:
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha!r}")
        weights = rng.dirichlet(np.full(num_clients, alpha))
    else:
        sigma = 1.0 if sigma is None else sigma
        if not sigma >= 0:
            raise ValueError(f"sigma must be non-negative, got {sigma!r}")
        weights = rng.lognormal(0.0, sigma, num_clients)
    rest = len(x) - num_clients * min_size
    share = weights / weights.sum() * rest
    sizes = np.floor(share).astype(np.int64)
    sizes[np.argsort(sizes - share, kind="stable")[: rest - sizes.sum()]] += 1
    sizes += min_size
    return _build(x, y, np.split(rng.permutation(len(x)), np.cumsum(sizes)[:-1]), rng)


PARTITIONERS = {"iid": iid, "dirichlet": dirichlet, "shards": shards, "quantity_skew": quantity_skew}
_TAKES_ALPHA = ("dirichlet", "quantity_skew")


def split(name: str, x: np.ndarray, y: np.ndarray, num_clients: int, *, seed: int, alpha: float = 0.5) -> ClientData:
    """The partitioner `name` of PARTITIONERS; `alpha` is the Dirichlet concentration of dirichlet and quantity_skew
    (iid and shards, 2 shards per client, ignore it)."""
    if name not in PARTITIONERS:
        raise ValueError(f"partition must be one of {tuple(PARTITIONERS)}, got {name!r}")
    return PARTITIONERS[name](x, y, num_clients, seed=seed, **({"alpha": alpha} if name in _TAKES_ALPHA else {}))
