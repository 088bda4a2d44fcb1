"""fedge.simulation.datasets: ClientData, partitioners, the digits dataset and the LEAF / TFF file loaders."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from fedge.simulation import datasets
from fedge.simulation.datasets import (
    ClientData,
    ClientDataset,
    digits,
    emnist,
    partition,
    shakespeare,
    train_test_client_split,
)


def _arrays(count: int, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """x holds each example's own index (so assignments can be traced), y random labels."""
    return np.arange(count), np.random.default_rng(seed).integers(0, classes, count).astype(np.int32)


def _small_client_data() -> ClientData:
    """Three clients whose x values reveal where each example came from."""
    return ClientData.from_arrays(
        {
            "b": (np.arange(3, dtype=np.float32), np.array([1, 2, 3])),
            "a": (np.arange(10, 12, dtype=np.float32), np.array([4, 5])),
            "c": (np.arange(20, 24, dtype=np.float32), np.array([6, 7, 8, 9])),
        }
    )


# ---- ClientDataset ----------------------------------------------------------------------------


def test_client_dataset_basics_and_read_only_views() -> None:
    x, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10)
    ds = ClientDataset(x, y)
    assert len(ds) == ds.num_examples == 10
    assert ds.as_tuple()[0] is ds.x and repr(ds) == "ClientDataset(x=float32[10, 2], y=int64[10])"
    with pytest.raises(ValueError, match="read-only"):
        ds.x[0, 0] = 5.0
    x[0, 0] = 7.0  # the caller's own array stays writable; the dataset is a view of it
    assert ds.x[0, 0] == 7.0
    with pytest.raises(ValueError, match="same number of examples"):
        ClientDataset(x, y[:9])
    with pytest.raises(ValueError, match="leading example axis"):
        ClientDataset(np.float32(1.0), np.int32(1))


def test_client_dataset_shuffled_take_and_batches() -> None:
    ds = ClientDataset(np.arange(10) * 10, np.arange(10))
    shuffled = ds.shuffled(seed=3)
    assert np.array_equal(shuffled.x, shuffled.y * 10), "pairs stay aligned"
    assert sorted(shuffled.y.tolist()) == list(range(10)) and not np.array_equal(shuffled.y, ds.y)
    assert np.array_equal(ds.shuffled(seed=3).y, shuffled.y) and not np.array_equal(ds.shuffled(seed=4).y, shuffled.y)
    assert ds.take(3).y.tolist() == [0, 1, 2] and len(ds.take(50)) == 10
    batches = list(ds.batches(4))
    assert [len(bx) for bx, _ in batches] == [4, 4, 2], "the last partial batch is kept"
    assert np.array_equal(np.concatenate([by for _, by in batches]), ds.y)
    with pytest.raises(ValueError, match="batch_size"):
        ds.batches(0)
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        ds.take(-1)


def test_tf_data_adapter_round_trips() -> None:
    import tensorflow as tf

    x = np.arange(30, dtype=np.float32).reshape(10, 3)
    y = np.arange(10, dtype=np.int32)
    ds = ClientDataset(x, y).to_tf_dataset()
    assert ds.element_spec[0].shape == (3,) and ds.cardinality().numpy() == 10
    same = ClientDataset.from_tf_dataset(ds)
    assert np.array_equal(same.x, x) and np.array_equal(same.y, y) and same.y.dtype == np.int32

    batched = ClientDataset.from_tf_dataset(ds.batch(4))  # leading dim unknown -> inferred batched
    assert batched.x.shape == (10, 3) and np.array_equal(batched.y, y)

    as_dict = tf.data.Dataset.from_tensor_slices(OrderedDict(x=x, y=y)).batch(3, drop_remainder=True)
    materialized = ClientDataset.from_tf_dataset(as_dict, batched=True)
    assert materialized.x.shape == (9, 3) and np.array_equal(materialized.y, y[:9])

    empty = ClientDataset.from_tf_dataset(ds.take(0).batch(4))
    assert empty.x.shape == (0, 3) and empty.y.dtype == np.int32
    with pytest.raises(ValueError, match="keys 'x' and 'y'"):
        ClientDataset.from_tf_dataset(tf.data.Dataset.from_tensor_slices({"pixels": x, "label": y}))
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        ClientDataset.from_tf_dataset([(x, y)])


def test_importing_datasets_loads_neither_tensorflow_nor_h5py_nor_sklearn() -> None:
    code = (
        "import sys, fedge.simulation.datasets; "
        "print(sorted(m for m in ('tensorflow', 'h5py', 'sklearn', 'keras') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- ClientData -------------------------------------------------------------------------------


def test_from_arrays_ids_lookup_and_concatenation() -> None:
    data = _small_client_data()
    assert data.client_ids == ["a", "b", "c"] and len(data) == 3
    assert data.create_dataset_for_client("b").y.tolist() == [1, 2, 3]
    assert data.create_dataset_from_all_clients().y.tolist() == [4, 5, 1, 2, 3, 6, 7, 8, 9]
    assert [len(d) for d in data.datasets()] == [2, 3, 4]
    assert len(list(data.datasets(limit_count=2))) == 2
    assert sorted(len(d) for d in data.datasets(seed=1)) == [2, 3, 4]
    with pytest.raises(ValueError, match="limit_count"):
        data.datasets(limit_count=-1)
    with pytest.raises(KeyError, match="unknown client id 'z'"):
        data.create_dataset_for_client("z")
    with pytest.raises(ValueError, match="same number of examples"):
        ClientData.from_arrays({"a": (np.zeros(3), np.zeros(2))})
    with pytest.raises(TypeError, match="client 'a'"):
        ClientData.from_arrays({"a": np.zeros(3)})
    data.client_ids.append("mutated")
    assert len(data) == 3, "client_ids returns a copy"


def test_from_function_is_lazy_and_optionally_cached() -> None:
    calls: list[str] = []

    def make(client_id: str) -> tuple[np.ndarray, np.ndarray]:
        calls.append(client_id)
        return np.full(int(client_id), 1.0), np.arange(int(client_id))

    data = ClientData.from_function(["3", "1", "2"], make)
    assert calls == [] and data.client_ids == ["1", "2", "3"]
    assert len(data.create_dataset_for_client("3")) == 3 and len(data.create_dataset_for_client("3")) == 3
    assert calls == ["3", "3"]
    cached = ClientData.from_function(["3"], make, cache=True)
    cached.create_dataset_for_client("3")
    cached.create_dataset_for_client("3")
    assert calls == ["3", "3", "3"]
    bad = ClientData.from_function(["x"], lambda cid: "not a dataset")
    with pytest.raises(TypeError, match=r"fn\('x'\)"):
        bad.create_dataset_for_client("x")
    with pytest.raises(ValueError, match="unique"):
        ClientData.from_function(["a", "a"], make)


def test_preprocess_is_lazy_and_composes_in_order() -> None:
    calls: list[str] = []

    def double(ds: ClientDataset) -> tuple[np.ndarray, np.ndarray]:
        calls.append("double")
        return ds.x * 2, ds.y

    data = _small_client_data()
    processed = data.preprocess(double).preprocess(lambda ds: ds.take(1))
    assert calls == [] and processed.client_ids == data.client_ids
    first = processed.create_dataset_for_client("c")
    assert first.x.tolist() == [40.0] and first.y.tolist() == [6] and calls == ["double"]
    assert data.create_dataset_for_client("c").x.tolist() == [20.0, 21.0, 22.0, 23.0], "the original is unchanged"
    with pytest.raises(TypeError, match="preprocess fn result for client 'a'"):
        data.preprocess(lambda ds: None).create_dataset_for_client("a")


def test_train_test_client_split() -> None:
    data = ClientData.from_arrays({f"c{i:02d}": (np.zeros(i + 1), np.zeros(i + 1)) for i in range(20)})
    train, test = train_test_client_split(data, 5, seed=1)
    assert len(train) == 15 and len(test) == 5
    assert set(train.client_ids).isdisjoint(test.client_ids)
    assert sorted(train.client_ids + test.client_ids) == data.client_ids
    assert train.client_ids == sorted(train.client_ids)
    again_train, again_test = ClientData.train_test_client_split(data, 5, seed=1)
    assert again_test.client_ids == test.client_ids and again_train.client_ids == train.client_ids
    assert train_test_client_split(data, 5, seed=2)[1].client_ids != test.client_ids
    client = test.client_ids[0]
    assert len(test.create_dataset_for_client(client)) == int(client[1:]) + 1
    with pytest.raises(KeyError):
        test.create_dataset_for_client(train.client_ids[0])
    for bad in (0, 20, 2.5):
        with pytest.raises(ValueError, match="num_test_clients"):
            train_test_client_split(data, bad, seed=0)


# ---- partitioners -----------------------------------------------------------------------------

Split = Callable[[np.ndarray, np.ndarray, int, int], ClientData]
PARTITIONERS: list[Split] = [
    lambda x, y, n, seed: partition.iid(x, y, n, seed=seed),
    lambda x, y, n, seed: partition.dirichlet(x, y, n, seed=seed, alpha=0.3, min_size=5),
    lambda x, y, n, seed: partition.shards(x, y, n, seed=seed, shards_per_client=3),
    lambda x, y, n, seed: partition.quantity_skew(x, y, n, seed=seed, sigma=1.5),
    lambda x, y, n, seed: partition.quantity_skew(x, y, n, seed=seed, alpha=0.5, min_size=2),
]
PARTITIONER_NAMES = ["iid", "dirichlet", "shards", "quantity_lognormal", "quantity_dirichlet"]


def _client_arrays(data: ClientData) -> list[ClientDataset]:
    """Every client's dataset in client_ids order."""
    return [data.create_dataset_for_client(cid) for cid in data.client_ids]


@pytest.mark.parametrize("split", PARTITIONERS, ids=PARTITIONER_NAMES)
def test_partitioners_assign_every_example_once_deterministically(split: Split) -> None:
    x, y = _arrays(997)
    data = split(x, y, 12, 7)
    assert data.client_ids == [f"client_{i:03d}" for i in range(12)]
    clients = _client_arrays(data)
    assigned = np.concatenate([c.x for c in clients])
    assert np.array_equal(np.sort(assigned), x), "every example exactly once"
    for c in clients:
        assert np.array_equal(c.y, y[c.x]), "labels travel with their examples"
        assert len(c) >= 1
    again = _client_arrays(split(x, y, 12, 7))
    assert all(np.array_equal(a.x, b.x) for a, b in zip(clients, again)), "same seed, same split"
    other = _client_arrays(split(x, y, 12, 8))
    assert not all(np.array_equal(a.x, b.x) for a, b in zip(clients, other))


def test_iid_sizes_are_balanced_and_ids_widen_past_999_clients() -> None:
    x, y = _arrays(1003)
    sizes = [len(c) for c in _client_arrays(partition.iid(x, y, 10, seed=0))]
    assert max(sizes) - min(sizes) <= 1
    many = partition.iid(x, y, 1001, seed=0)
    assert many.client_ids[0] == "client_0000" and many.client_ids[-1] == "client_1000"
    with pytest.raises(ValueError, match="cannot give 1004 clients"):
        partition.iid(x, y, 1004, seed=0)
    with pytest.raises(ValueError, match="same leading length"):
        partition.iid(x, y[:5], 2, seed=0)
    with pytest.raises(ValueError, match="num_clients must be an integer >= 1"):
        partition.iid(x, y, 0, seed=0)
    with pytest.raises(ValueError, match="shards_per_client must be an integer >= 1"):
        partition.shards(x, y, 10, seed=0, shards_per_client=0)
    with pytest.raises(ValueError, match="min_size must be an integer >= 0"):
        partition.quantity_skew(x, y, 10, seed=0, min_size=-1)


def test_shards_give_each_client_at_most_shards_per_client_labels() -> None:
    y = np.repeat(np.arange(10, dtype=np.int32), 40)  # 40 shards of 10: one label per shard
    x = np.arange(len(y))
    clients = _client_arrays(partition.shards(x, y, 20, seed=0, shards_per_client=2))
    assert all(len(np.unique(c.y)) <= 2 for c in clients)
    assert all(len(c) == 20 for c in clients)
    assert np.mean([len(np.unique(c.y)) for c in clients]) > 1.5, "shards are assigned at random, not paired"
    with pytest.raises(ValueError, match="integer labels"):
        partition.shards(x, y.astype(np.float32), 20, seed=0)


def _label_concentration(data: ClientData) -> float:
    """Mean over clients of the share of the client's examples in its most common label."""
    return float(np.mean([np.bincount(c.y).max() / len(c) for c in _client_arrays(data)]))


def test_dirichlet_alpha_controls_label_skew_and_min_size_holds() -> None:
    x, y = _arrays(2000)
    skewed = partition.dirichlet(x, y, 20, seed=0, alpha=0.05, min_size=10)
    near_iid = partition.dirichlet(x, y, 20, seed=0, alpha=100.0, min_size=10)
    assert _label_concentration(skewed) > 0.6, "small alpha: most of a client's examples share one label"
    assert _label_concentration(near_iid) < 0.2, "large alpha: close to the 10-class IID share"
    assert min(len(c) for c in _client_arrays(skewed)) >= 10
    with pytest.raises(ValueError, match="lower min_size"):
        partition.dirichlet(x, y, 20, seed=0, alpha=0.01, min_size=100)
    with pytest.raises(ValueError, match="alpha must be positive"):
        partition.dirichlet(x, y, 20, seed=0, alpha=0.0)


def test_quantity_skew_spreads_client_sizes() -> None:
    x, y = _arrays(3000)

    def size_cv(data: ClientData) -> float:
        sizes = np.array([len(c) for c in _client_arrays(data)])
        return float(sizes.std() / sizes.mean())

    assert size_cv(partition.quantity_skew(x, y, 30, seed=0, sigma=2.0)) > 1.0
    assert size_cv(partition.quantity_skew(x, y, 30, seed=0, sigma=0.05)) < 0.1
    assert size_cv(partition.quantity_skew(x, y, 30, seed=0, alpha=0.2)) > 1.0
    assert size_cv(partition.iid(x, y, 30, seed=0)) < 0.01
    floor = partition.quantity_skew(x, y, 30, seed=0, alpha=0.05, min_size=40)
    assert min(len(c) for c in _client_arrays(floor)) >= 40
    with pytest.raises(ValueError, match="not both"):
        partition.quantity_skew(x, y, 30, seed=0, sigma=1.0, alpha=1.0)


# ---- digits -----------------------------------------------------------------------------------


def test_digits_load_data_shapes_split_and_determinism() -> None:
    train, test = digits.load_data()
    assert len(train) == 20 and len(test) == 360
    everything = train.create_dataset_from_all_clients()
    assert len(everything) == 1437
    assert everything.x.shape[1:] == (8, 8, 1) and everything.x.dtype == np.float32 and everything.y.dtype == np.int32
    assert 0.0 <= everything.x.min() and everything.x.max() == 1.0
    all_x, all_y = digits.load_arrays()
    assert np.array_equal(np.bincount(np.concatenate([everything.y, test.y])), np.bincount(all_y))
    assert np.isclose(everything.x.sum() + test.x.sum(), all_x.sum())
    train_again, test_again = digits.load_data()
    assert np.array_equal(test_again.x, test.x)
    again = train_again.create_dataset_for_client("client_004")
    assert np.array_equal(again.y, train.create_dataset_for_client("client_004").y)
    assert not np.array_equal(digits.load_data(seed=1)[1].y, test.y)
    assert _label_concentration(train) > _label_concentration(digits.load_data(partition="iid")[0])


@pytest.mark.parametrize("name", digits.PARTITIONS)
def test_digits_every_partition(name: str) -> None:
    train, test = digits.load_data(num_clients=10, partition=name, test_fraction=0.5, seed=3)
    assert len(train) == 10 and len(test) == 1797 - int(0.5 * 1797)
    assert sum(len(d) for d in train.datasets()) == int(0.5 * 1797)


def test_digits_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="partition must be one of"):
        digits.load_data(partition="pathological")
    with pytest.raises(ValueError, match="test_fraction"):
        digits.load_data(test_fraction=1.0)


# ---- LEAF / TFF FEMNIST -----------------------------------------------------------------------


def _leaf_json(path: Path, users: dict[str, tuple[list, list]]) -> Path:
    """Write a LEAF-format JSON file of `{user: (x, y)}`."""
    path.write_text(
        json.dumps(
            {
                "users": list(users),
                "num_samples": [len(x) for x, _ in users.values()],
                "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()},
            }
        )
    )
    return path


def _femnist_rows(count: int, start: float) -> list[list[float]]:
    """Distinct rows of 784 pixel values in [0, 1)."""
    return [[(start + i + k / 784) % 1.0 for k in range(784)] for i in range(count)]


def test_femnist_leaf_folder_of_json_files(tmp_path: Path) -> None:
    _leaf_json(tmp_path / "all_data_0.json", {"f0002_09": (_femnist_rows(3, 0.1), [4, 61, 0])})
    _leaf_json(tmp_path / "all_data_1.json", {"f0001_41": (_femnist_rows(2, 0.5), [7, 7]), "f0000_03": ([], [])})
    data = emnist.load_leaf(tmp_path)
    assert data.client_ids == ["f0000_03", "f0001_41", "f0002_09"]
    ds = data.create_dataset_for_client("f0002_09")
    assert ds.x.shape == (3, 28, 28, 1) and ds.x.dtype == np.float32
    assert ds.y.tolist() == [4, 61, 0] and ds.y.dtype == np.int32
    row = _femnist_rows(3, 0.1)[1]
    assert np.isclose(ds.x[1, 2, 5, 0], row[2 * 28 + 5]), "rows are 28x28 images in row-major order"
    assert data.create_dataset_for_client("f0000_03").x.shape == (0, 28, 28, 1)
    single = emnist.load_leaf(tmp_path / "all_data_1.json")
    assert single.client_ids == ["f0000_03", "f0001_41"]


@pytest.mark.parametrize(
    "content, message",
    [
        ({"users": ["u"], "num_samples": [1]}, r"missing key\(s\) \['user_data'\]"),
        ({"users": ["u"], "num_samples": [1], "user_data": {}}, "user 'u' has no 'x' and 'y'"),
        ({"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[0.0] * 784], "y": [1, 2]}}}, "same length"),
        ({"users": ["u"], "num_samples": [2], "user_data": {"u": {"x": [[0.0] * 784], "y": [1]}}}, "says 2"),
        ({"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[0.0] * 783], "y": [1]}}}, "784 numbers"),
        ({"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[0.0] * 784], "y": [1.5]}}}, "whole numbers"),
        ({"users": ["u", "v"], "num_samples": [1], "user_data": {}}, "same length"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_femnist_leaf_malformed_files(tmp_path: Path, content: object, message: str) -> None:
    (tmp_path / "bad.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        emnist.load_leaf(tmp_path / "bad.json")


def test_leaf_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no .json files"):
        emnist.load_leaf(tmp_path)
    with pytest.raises(ValueError, match="no such file"):
        emnist.load_leaf(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        emnist.load_leaf(tmp_path)
    (tmp_path / "broken.json").unlink()
    _leaf_json(tmp_path / "a.json", {"u": (_femnist_rows(1, 0), [1])})
    _leaf_json(tmp_path / "b.json", {"u": (_femnist_rows(1, 0), [1])})
    with pytest.raises(ValueError, match="also appears in an earlier file"):
        emnist.load_leaf(tmp_path)


def _emnist_h5(path: Path, clients: dict[str, int]) -> Path:
    """Write a file in TFF's fed_emnist layout with `count` random images per client."""
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as file:
        for client, count in clients.items():
            group = file.create_group(f"examples/{client}")
            group["pixels"] = rng.random((count, 28, 28), dtype=np.float32)
            group["label"] = np.arange(count, dtype=np.int32) % 10
    return path


def test_emnist_tff_h5(tmp_path: Path) -> None:
    path = _emnist_h5(tmp_path / "fed_emnist_digitsonly_train.h5", {"f1234_56": 5, "f0001_02": 3})
    data = emnist.load_tff_h5(path)
    assert data.client_ids == ["f0001_02", "f1234_56"]
    ds = data.create_dataset_for_client("f1234_56")
    with h5py.File(path, "r") as file:
        pixels = file["examples/f1234_56/pixels"][()]
    assert ds.x.shape == (5, 28, 28, 1) and ds.x.dtype == np.float32 and np.array_equal(ds.x[..., 0], pixels)
    assert ds.y.tolist() == [0, 1, 2, 3, 4] and ds.y.dtype == np.int32
    assert len(data.create_dataset_from_all_clients()) == 8


def test_emnist_tff_h5_malformed(tmp_path: Path) -> None:
    with h5py.File(tmp_path / "no_examples.h5", "w") as file:
        file["pixels"] = np.zeros((1, 28, 28))
    with pytest.raises(ValueError, match="no 'examples' group"):
        emnist.load_tff_h5(tmp_path / "no_examples.h5")
    with h5py.File(tmp_path / "no_label.h5", "w") as file:
        file["examples/c/pixels"] = np.zeros((2, 28, 28))
    with pytest.raises(ValueError, match=r"client 'c' lacks dataset\(s\) \['pixels', 'label'\]"):
        emnist.load_tff_h5(tmp_path / "no_label.h5")
    with h5py.File(tmp_path / "lengths.h5", "w") as file:
        file["examples/c/pixels"] = np.zeros((2, 28, 28))
        file["examples/c/label"] = np.zeros(3, np.int32)
    with pytest.raises(ValueError, match="different lengths"):
        emnist.load_tff_h5(tmp_path / "lengths.h5")
    with h5py.File(tmp_path / "shape.h5", "w") as file:
        file["examples/c/pixels"] = np.zeros((2, 32, 32))
        file["examples/c/label"] = np.zeros(2, np.int32)
    with pytest.raises(ValueError, match=r"expected pixels \[N, 28, 28\]"):
        emnist.load_tff_h5(tmp_path / "shape.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        emnist.load_tff_h5(tmp_path / "text.h5")


# ---- Shakespeare ------------------------------------------------------------------------------


def test_char_vocab_matches_tff_ids_and_round_trips() -> None:
    assert len(shakespeare.CHAR_VOCAB) == 86 and shakespeare.VOCAB_SIZE == 90
    assert shakespeare.encode("d").tolist() == [1] and shakespeare.encode("\r").tolist() == [86]
    assert shakespeare.encode("~é").tolist() == [shakespeare.OOV_ID] * 2 == [87, 87]
    text = "To be, or not to be: that is the question.\n"
    ids = shakespeare.encode(text)
    assert ids.dtype == np.int32 and shakespeare.decode(ids) == text
    assert shakespeare.decode(np.array([0, 0, 1, 87])) == "d\ufffd"


def test_snippet_examples_pad_the_start_and_honour_stride() -> None:
    x, y = shakespeare.snippet_examples("abc", seq_length=2)
    a, b, c = shakespeare.encode("abc").tolist()
    assert x.tolist() == [[0, 0], [0, a], [a, b]] and y.tolist() == [a, b, c]
    x, y = shakespeare.snippet_examples("abcde", seq_length=3, stride=2)
    assert shakespeare.decode(y) == "ace" and shakespeare.decode(x[2]) == "bcd"
    assert shakespeare.snippet_examples("", seq_length=4)[0].shape == (0, 4)
    with pytest.raises(ValueError, match="stride"):
        shakespeare.snippet_examples("abc", stride=0)


def _lines(count: int, seed: int) -> tuple[list[str], list[str]]:
    """LEAF Shakespeare pairs: 80-character strings and the character after each."""
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("abcdefghij ,.ABC"))
    texts = ["".join(rng.choice(alphabet, 81)) for _ in range(count)]
    return [t[:80] for t in texts], [t[80] for t in texts]


def test_shakespeare_leaf(tmp_path: Path) -> None:
    users = {"THE_TEMPEST_MIRANDA": _lines(4, 0), "HAMLET_HAMLET": _lines(2, 1)}
    _leaf_json(tmp_path / "train.json", users)
    text = shakespeare.load_leaf_text(tmp_path / "train.json")
    assert text["HAMLET_HAMLET"] == users["HAMLET_HAMLET"]
    data = shakespeare.load_leaf(tmp_path)
    assert data.client_ids == ["HAMLET_HAMLET", "THE_TEMPEST_MIRANDA"]
    ds = data.create_dataset_for_client("THE_TEMPEST_MIRANDA")
    assert ds.x.shape == (4, 80) and ds.x.dtype == np.int32 and ds.y.shape == (4,) and ds.y.dtype == np.int32
    assert shakespeare.decode(ds.x[2]) == users["THE_TEMPEST_MIRANDA"][0][2]
    assert shakespeare.decode(ds.y) == "".join(users["THE_TEMPEST_MIRANDA"][1])


@pytest.mark.parametrize(
    "x, y, message",
    [
        (["a" * 79], ["b"], "80 characters"),
        (["a" * 80], ["bc"], "single characters"),
        ([[1, 2]], ["b"], "'x' must be strings"),
    ],
)
def test_shakespeare_leaf_malformed(tmp_path: Path, x: list, y: list, message: str) -> None:
    _leaf_json(tmp_path / "bad.json", {"u": (x, y)})
    with pytest.raises(ValueError, match=message):
        shakespeare.load_leaf(tmp_path)


def test_shakespeare_tff_h5(tmp_path: Path) -> None:
    snippets = {
        "KING_LEAR_FOOL": ["Have more than thou showest,", "Speak less than thou knowest"],
        "HAMLET_OPHELIA": ["O!"],
    }
    path = tmp_path / "shakespeare_train.h5"
    with h5py.File(path, "w") as file:
        for client, lines in snippets.items():
            file.create_dataset(f"examples/{client}/snippets", data=lines, dtype=h5py.string_dtype())
    assert shakespeare.load_tff_h5_text(path) == snippets
    data = shakespeare.load_tff_h5(path)
    assert data.client_ids == ["HAMLET_OPHELIA", "KING_LEAR_FOOL"]
    fool = data.create_dataset_for_client("KING_LEAR_FOOL")
    assert len(fool) == sum(len(s) for s in snippets["KING_LEAR_FOOL"]) and fool.x.shape[1] == 80
    assert shakespeare.decode(fool.x[-1]) == snippets["KING_LEAR_FOOL"][1][:-1], "context stays inside its snippet"
    assert shakespeare.decode(fool.y[-1:]) == "t"
    strided = shakespeare.load_tff_h5(path, seq_length=10, stride=5).create_dataset_for_client("KING_LEAR_FOOL")
    assert strided.x.shape == (6 + 6, 10)
    with h5py.File(tmp_path / "bad.h5", "w") as file:
        file["examples/c/text"] = np.zeros(2)
    with pytest.raises(ValueError, match=r"lacks dataset\(s\) \['snippets'\]"):
        shakespeare.load_tff_h5(tmp_path / "bad.h5")


PLAY = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?
Resolved: resolved.
"""


def test_read_play_splits_speeches_by_speaker(tmp_path: Path) -> None:
    (tmp_path / "play.txt").write_text(PLAY)
    speeches = shakespeare.read_play(tmp_path / "play.txt")
    assert list(speeches) == ["First Citizen", "All"]
    assert speeches["First Citizen"] == ["Before we proceed any further, hear me speak.",
                                         "You are all resolved rather to die than to famish?\nResolved: resolved."]
    assert speeches["All"] == ["Speak, speak."]
    (tmp_path / "bad.txt").write_text("First Citizen:\nSpeak.\n\nno heading here\nat all\n")
    with pytest.raises(ValueError, match=r"bad.txt:4: .*'Name:'"):
        shakespeare.read_play(tmp_path / "bad.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no speech"):
        shakespeare.read_play(tmp_path / "empty.txt")


def test_snippet_sequences_shift_by_one_and_pad_the_last_chunk() -> None:
    x, y = shakespeare.snippet_sequences(["abcd", "ef"], seq_length=3)
    bos, eos = shakespeare.BOS_ID, shakespeare.EOS_ID
    ids = [bos, *shakespeare.encode("abcd"), eos, bos, *shakespeare.encode("ef"), eos]  # 10 ids, chunks of 4
    assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (3, 3)
    assert x.tolist() == [ids[0:3], ids[4:7], [ids[8], ids[9], 0]]
    assert y.tolist() == [ids[1:4], ids[5:8], [ids[9], 0, 0]]
    x, y = shakespeare.snippet_sequences(["abc"], seq_length=4)  # exactly one chunk of 5 ids
    assert x.shape == (1, 4) and shakespeare.PAD_ID not in y
    with pytest.raises(ValueError, match="seq_length"):
        shakespeare.snippet_sequences(["abc"], seq_length=0)


def test_load_play_text_gives_a_client_per_role(tmp_path: Path) -> None:
    (tmp_path / "play.txt").write_text(PLAY)
    data = shakespeare.load_play_text(tmp_path / "play.txt", seq_length=8)
    assert sorted(data.client_ids) == ["All", "First Citizen"]
    bos, eos = shakespeare.BOS_ID, shakespeare.EOS_ID
    for role, speeches in shakespeare.read_play(tmp_path / "play.txt").items():
        ds = data.create_dataset_for_client(role)
        assert ds.x.shape[1] == ds.y.shape[1] == 8
        stream = np.concatenate([np.concatenate([x[:1], y]) for x, y in zip(ds.x, ds.y)])
        expected = np.concatenate([[bos, *shakespeare.encode(speech), eos] for speech in speeches])
        assert stream[stream != shakespeare.PAD_ID].tolist() == expected.tolist()
        assert len(stream) - len(expected) < 9, "only the last chunk is padded"


def test_package_exports() -> None:
    assert datasets.ClientData is ClientData and datasets.train_test_client_split is ClientData.train_test_client_split
    assert set(datasets.__all__) >= {"ClientData", "ClientDataset", "partition", "digits", "emnist", "shakespeare"}
