"""Per-client datasets held as numpy arrays, in the shape of TFF's `tff.simulation.datasets.ClientData`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from fedge.simulation.datasets import _tf
from fedge.simulation.datasets._checks import require_int


@dataclass(frozen=True, eq=False)
class ClientDataset:
    """One client's examples: `x` and `y` numpy arrays with the same leading length (read-only views).

    `client_id` names the client when known (ClientData sets it); federated processes derive
    the client's shuffle seed from it, as a device derives its own from its device id.
    """

    x: np.ndarray
    y: np.ndarray
    client_id: str | None = None

    def __post_init__(self) -> None:
        """Check the shapes and store read-only views, so shared arrays cannot be changed through a dataset."""
        x, y = np.asarray(self.x), np.asarray(self.y)
        if x.ndim == 0 or y.ndim == 0:
            raise ValueError(f"x and y need a leading example axis, got shapes {x.shape} and {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y must hold the same number of examples, got {x.shape[0]} and {y.shape[0]}")
        if self.client_id is not None and not isinstance(self.client_id, str):
            raise TypeError(f"client_id must be a string or None, got {type(self.client_id).__name__}")
        for name, array in (("x", x), ("y", y)):
            view = array.view()
            view.flags.writeable = False
            object.__setattr__(self, name, view)

    def __len__(self) -> int:
        """Number of examples."""
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        """Shapes and dtypes (and the id, when known), not the data."""
        named = "" if self.client_id is None else f"client_id={self.client_id!r}, "
        return f"ClientDataset({named}x={self.x.dtype}{list(self.x.shape)}, y={self.y.dtype}{list(self.y.shape)})"

    @property
    def num_examples(self) -> int:
        """Number of examples (what FedAvg weights a client by)."""
        return len(self)

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray]:
        """The `(x, y)` pair, the form fedge's federated processes take."""
        return self.x, self.y

    def shuffled(self, seed: int) -> ClientDataset:
        """The same examples in a seeded random order."""
        order = np.random.default_rng(seed).permutation(len(self))
        return ClientDataset(self.x[order], self.y[order], self.client_id)

    def take(self, n: int) -> ClientDataset:
        """The first `n` examples (all of them when there are fewer)."""
        n = require_int("n", n, 0)
        return ClientDataset(self.x[:n], self.y[:n], self.client_id)

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive `(x, y)` batches of `batch_size`; the last one is partial rather than dropped."""
        return self._batches(require_int("batch_size", batch_size, 1))

    def _batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Generator behind `batches` (kept separate so argument errors raise at call time)."""
        for start in range(0, len(self), batch_size):
            yield self.x[start : start + batch_size], self.y[start : start + batch_size]

    def to_tf_dataset(self) -> Any:
        """An unbatched `tf.data.Dataset` of `(x, y)` elements for TFF-style code (imports TensorFlow)."""
        return _tf.to_tf_dataset(self.x, self.y)

    @staticmethod
    def from_tf_dataset(dataset: Any, batched: bool | None = None) -> ClientDataset:
        """Materialize a `tf.data.Dataset` of `(x, y)` tuples or `{"x": ..., "y": ...}` dicts (TFF's form) into numpy.

        Batched datasets are concatenated, unbatched ones stacked. `batched=None` treats the dataset as
        batched when the leading dimension of x and y is unknown, which is what `.batch(n)` gives; pass
        `batched=True` for a dataset batched with `drop_remainder=True`. Imports TensorFlow.
        """
        return ClientDataset(*_tf.from_tf_dataset(dataset, batched))


DatasetLike = Union[ClientDataset, tuple[np.ndarray, np.ndarray]]


def as_client_dataset(data: DatasetLike, what: str = "dataset") -> ClientDataset:
    """A ClientDataset from a ClientDataset or an `(x, y)` pair; `what` names the value in errors."""
    if isinstance(data, ClientDataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return ClientDataset(*data)
    raise TypeError(f"{what} must be a ClientDataset or an (x, y) pair, got {type(data).__name__}")


class ClientData:
    """A federated dataset: client ids and a way to build each client's dataset (lazily, on request)."""

    def __init__(self, client_ids: Sequence[str], load: Callable[[str], ClientDataset]) -> None:
        """Wrap sorted unique string ids and a loader; use `from_arrays` or `from_function` to build one."""
        ids = list(client_ids)
        if not all(isinstance(cid, str) for cid in ids):
            raise TypeError("client ids must be strings")
        if len(set(ids)) != len(ids):
            raise ValueError("client ids must be unique")
        self._client_ids = sorted(ids)
        self._known = frozenset(ids)
        self._load = load

    @classmethod
    def from_arrays(cls, mapping: Mapping[str, DatasetLike]) -> ClientData:
        """ClientData over in-memory `{client_id: (x, y)}`; every pair is checked now."""
        datasets = {cid: as_client_dataset(data, f"data of client {cid!r}") for cid, data in mapping.items()}
        return cls(list(datasets), datasets.__getitem__)

    @classmethod
    def from_function(
        cls, client_ids: Sequence[str], fn: Callable[[str], DatasetLike], cache: bool = False
    ) -> ClientData:
        """ClientData whose client datasets are built by `fn(client_id)` on request (memoized if `cache`)."""

        def load(client_id: str) -> ClientDataset:
            return as_client_dataset(fn(client_id), f"fn({client_id!r})")

        if not cache:
            return cls(client_ids, load)
        memo: dict[str, ClientDataset] = {}

        def load_cached(client_id: str) -> ClientDataset:
            if client_id not in memo:
                memo[client_id] = load(client_id)
            return memo[client_id]

        return cls(client_ids, load_cached)

    @property
    def client_ids(self) -> list[str]:
        """The client ids, sorted."""
        return list(self._client_ids)

    def __len__(self) -> int:
        """Number of clients."""
        return len(self._client_ids)

    def __repr__(self) -> str:
        """Client count and the first ids."""
        head = ", ".join(self._client_ids[:3]) + (", ..." if len(self) > 3 else "")
        return f"ClientData({len(self)} clients: {head})"

    def create_dataset_for_client(self, client_id: str) -> ClientDataset:
        """The dataset of one client, carrying its id; a KeyError names an unknown id."""
        if client_id not in self._known:
            raise KeyError(f"unknown client id {client_id!r} ({len(self)} clients, e.g. {self._client_ids[:3]})")
        dataset = self._load(client_id)
        return dataset if dataset.client_id == client_id else ClientDataset(dataset.x, dataset.y, client_id)

    def create_tf_dataset_for_client(self, client_id: str) -> Any:
        """TFF's accessor: one client's examples as an unbatched `tf.data.Dataset` of (x, y) (imports TensorFlow)."""
        return self.create_dataset_for_client(client_id).to_tf_dataset()

    def create_tf_dataset_from_all_clients(self) -> Any:
        """TFF's accessor: every client's examples as one unbatched `tf.data.Dataset` (imports TensorFlow)."""
        return self.create_dataset_from_all_clients().to_tf_dataset()

    def create_dataset_from_all_clients(self) -> ClientDataset:
        """Every client's examples concatenated in `client_ids` order (centralized baselines, evaluation)."""
        if not self._client_ids:
            raise ValueError("ClientData has no clients")
        parts = [self.create_dataset_for_client(cid) for cid in self._client_ids]
        return ClientDataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))

    def datasets(self, limit_count: int | None = None, seed: int | None = None) -> Iterator[ClientDataset]:
        """Client datasets in `client_ids` order (seeded random order when `seed` is given), at most `limit_count`."""
        if limit_count is not None:
            limit_count = require_int("limit_count", limit_count, 0)
        ids = self.client_ids
        if seed is not None:
            ids = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
        return (self.create_dataset_for_client(cid) for cid in ids[:limit_count])

    def preprocess(self, fn: Callable[[ClientDataset], DatasetLike]) -> ClientData:
        """ClientData whose client datasets are `fn(original)` (lazy; chained calls compose left to right)."""

        def load(client_id: str) -> ClientDataset:
            return as_client_dataset(fn(self._load(client_id)), f"preprocess fn result for client {client_id!r}")

        return ClientData(self._client_ids, load)

    def _select(self, client_ids: Sequence[str]) -> ClientData:
        """The same data restricted to some of the clients."""
        return ClientData(client_ids, self._load)

    @staticmethod
    def train_test_client_split(
        client_data: ClientData, num_test_clients: int, seed: int | None = None
    ) -> tuple[ClientData, ClientData]:
        """Split the clients (not their examples) into train and test ClientData; seeded, as in TFF."""
        count = len(client_data)
        num_test_clients = require_int("num_test_clients", num_test_clients, 1)
        if num_test_clients >= count:
            raise ValueError(f"num_test_clients must be below the number of clients ({count}), got {num_test_clients}")
        order = np.random.default_rng(seed).permutation(count)
        ids = client_data.client_ids
        test = [ids[i] for i in order[:num_test_clients]]
        train = [ids[i] for i in order[num_test_clients:]]
        return client_data._select(train), client_data._select(test)


train_test_client_split = ClientData.train_test_client_split
