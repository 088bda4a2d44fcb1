"""Where a simulation's data comes from: a `DataSpec` read from a job's (or a scenario's) `[data]` table.

Training examples come from one source: a built-in `dataset` (scikit-learn's digits, a
Shakespeare play's text, LEAF or TFF files), an `npz` file (arrays x and y) split over the
devices by a partitioner, or a `folder` of .npz files, one per device. Held-out examples come
from a `test` .npz, or from `test_fraction`: that share of the examples (digits, an npz) or
of the clients (datasets with natural clients: a folder, Shakespeare's roles, LEAF and TFF
writers) is set aside before the rest goes to the devices. Every split is seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedge.simulation.datasets.client_data import ClientData, ClientDataset
from fedge.simulation.datasets.partition import PARTITIONERS, split
from fedge.tables import Table

NATURAL_DATASETS = ("shakespeare", "shakespeare_leaf", "shakespeare_tff", "emnist_leaf", "emnist_tff")
DATASETS = ("digits", *NATURAL_DATASETS)
SOURCES = ("dataset", "npz", "folder")
DEFAULT_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class DataSpec:
    """One source of training examples (`dataset`, `npz` or `folder`) and where held-out examples come from."""

    dataset: str | None = None
    npz: Path | None = None
    folder: Path | None = None
    path: Path | None = None  # a built-in dataset's file: the play's text, a LEAF JSON file or folder, a TFF .h5
    partition: str = "iid"
    alpha: float = 0.5
    test: Path | None = None
    test_fraction: float | None = None
    seed: int | None = None  # None: the job's seed

    @property
    def has_source(self) -> bool:
        """Whether training examples are named (fedge serve needs none: its devices hold their own)."""
        return self.dataset is not None or self.npz is not None or self.folder is not None

    @property
    def natural_clients(self) -> bool:
        """Whether the source comes with its own clients (so it is not partitioned)."""
        return self.folder is not None or self.dataset in NATURAL_DATASETS

    def load(self, num_clients: int, seed: int) -> tuple[ClientData, ClientDataset | None]:
        """`num_clients` train clients and the held-out examples (None when neither `test` nor a fraction is set).

        With natural clients, a seeded choice of `num_clients` of them (ValueError when there are fewer)."""
        if not self.has_source:
            raise ValueError("[data] names no training examples: dataset, npz or folder (docs/job.md)")
        seed = self.seed if self.seed is not None else seed
        if self.natural_clients:
            clients, held_out = self._natural(seed)
            if len(clients) < num_clients:
                raise ValueError(f"{self.source} holds {len(clients)} clients, fewer than the {num_clients} "
                                 f"devices to simulate (one client per device)")
            chosen = [clients.client_ids[i] for i in np.random.default_rng(seed).permutation(len(clients))]
            train = ClientData.from_function(chosen[:num_clients], clients.create_dataset_for_client)
        else:
            x, y, held_out = self._examples(seed)
            train = split(self.partition, x, y, num_clients, seed=seed, alpha=self.alpha)
        return train, self._test_file() if self.test is not None else held_out

    def load_test(self, seed: int) -> ClientDataset | None:
        """The held-out examples alone (what fedge serve evaluates), or None without any."""
        if self.test is not None:
            return self._test_file()
        if self.test_fraction is None and self.dataset != "digits":
            return None
        seed = self.seed if self.seed is not None else seed
        return self._natural(seed)[1] if self.natural_clients else self._examples(seed)[2]

    @property
    def source(self) -> str:
        """The training source, as messages name it."""
        return str(self.npz or self.folder or self.path or self.dataset)

    def _test_file(self) -> ClientDataset:
        """The `test` .npz file."""
        from device_runtime.data import load_local_data

        data = load_local_data(self.test)
        return ClientDataset(data.x, data.y)

    def _examples(self, seed: int) -> tuple[np.ndarray, np.ndarray, ClientDataset | None]:
        """(x, y) to partition and the held-out share of a centralized source (digits or an npz)."""
        if self.dataset == "digits":
            from fedge.simulation.datasets import digits

            fraction = self.test_fraction if self.test_fraction is not None or self.test is not None \
                else DEFAULT_TEST_FRACTION  # a test file holds the held-out examples: train on every digit
            if fraction is None:
                x, y = digits.load_arrays()
                return x, y, None
            x_train, y_train, x_test, y_test = digits.train_test_arrays(fraction, seed)
            return x_train, y_train, ClientDataset(x_test, y_test)
        from device_runtime.data import load_local_data

        data = load_local_data(self.npz)
        if self.test_fraction is None:
            return data.x, data.y, None
        order = np.random.default_rng(seed).permutation(len(data.x))
        cut = int(round((1 - self.test_fraction) * len(order)))
        if not 0 < cut < len(order):
            raise ValueError(f"{self.npz}: test_fraction {self.test_fraction} of {len(order)} examples leaves "
                             f"no training or no held-out example")
        train, test = order[:cut], order[cut:]
        return data.x[train], data.y[train], ClientDataset(data.x[test], data.y[test])

    def _natural(self, seed: int) -> tuple[ClientData, ClientDataset | None]:
        """The source's own clients, less the held-out share of them (concatenated as the held-out examples)."""
        clients = _NATURAL_LOADERS[self.dataset or "folder"](self.folder or self.path)
        if self.test_fraction is None:
            return clients, None
        count = int(round(self.test_fraction * len(clients)))
        if not 0 < count < len(clients):
            raise ValueError(f"{self.source}: test_fraction {self.test_fraction} of {len(clients)} clients "
                             f"leaves no training or no held-out client")
        train, test = ClientData.train_test_client_split(clients, count, seed)
        return train, test.create_dataset_from_all_clients()


def _folder_clients(folder: Path) -> ClientData:
    """One client per .npz file of a folder, named by the file's stem."""
    from device_runtime.data import load_local_data

    files = sorted(Path(folder).glob("*.npz"))
    if not files:
        raise ValueError(f"{folder}: the folder holds no .npz files")

    def load(stem: str) -> ClientDataset:
        data = load_local_data(Path(folder) / f"{stem}.npz")
        return ClientDataset(data.x, data.y)

    return ClientData.from_function([file.stem for file in files], load, cache=True)


def _shakespeare(path: Path) -> ClientData:
    from fedge.simulation.datasets import shakespeare

    return shakespeare.load_play_text(path)


def _shakespeare_leaf(path: Path) -> ClientData:
    from fedge.simulation.datasets import shakespeare

    return shakespeare.load_leaf(path)


def _shakespeare_tff(path: Path) -> ClientData:
    from fedge.simulation.datasets import shakespeare

    return shakespeare.load_tff_h5(path)


def _emnist_leaf(path: Path) -> ClientData:
    from fedge.simulation.datasets import emnist

    return emnist.load_leaf(path)


def _emnist_tff(path: Path) -> ClientData:
    from fedge.simulation.datasets import emnist

    return emnist.load_tff_h5(path)


_NATURAL_LOADERS: dict[str, Callable[[Path], ClientData]] = {
    "folder": _folder_clients, "shakespeare": _shakespeare, "shakespeare_leaf": _shakespeare_leaf,
    "shakespeare_tff": _shakespeare_tff, "emnist_leaf": _emnist_leaf, "emnist_tff": _emnist_tff}


def parse_data(table: Table, base_dir: Path) -> DataSpec:
    """The `[data]` table, paths resolved against `base_dir`; errors go to the table's list."""
    sources = [key for key in SOURCES if table.has(key)]
    if len(sources) > 1:
        table.error(" and ".join(sources), "are alternatives: give one source of training examples")
    dataset = table.choice("dataset", None, DATASETS)
    npz, folder, path, test = (table.path(key, base_dir, kind) for key, kind in (
        ("npz", "file"), ("folder", "folder"), ("path", "any"), ("test", "file")))
    if dataset in NATURAL_DATASETS and not table.has("path"):
        table.error("path", f"is required with dataset = {dataset!r} (its text, LEAF or TFF file)")
    if path is not None and dataset not in NATURAL_DATASETS:
        table.error("path", "applies to dataset = " + " | ".join(NATURAL_DATASETS))
    natural = folder is not None or dataset in NATURAL_DATASETS
    for key in ("partition", "alpha"):
        if natural and table.has(key):
            table.error(key, "applies to a source that is split over the devices (npz or dataset = \"digits\"); "
                             "this one has its own clients")
    spec = DataSpec(dataset=dataset, npz=npz, folder=folder, path=path,
                    partition=table.choice("partition", "iid", PARTITIONERS),
                    alpha=table.number("alpha", 0.5, low=0.0, low_open=True),
                    test=test, test_fraction=table.number("test_fraction", None, low=0.0, high=0.99, low_open=True),
                    seed=table.integer("seed", None, minimum=0))
    if spec.test is not None and spec.test_fraction is not None:
        table.error("test_fraction", "and test are alternatives: hold out a share, or give a test file")
    table.done()
    return spec
