"""Local training on a device (device_runtime.data, device_runtime.training) with real converted artifacts.

Imports no TensorFlow: the artifacts come from tests/device_artifacts.py (prebuilt in
FEDGE_TEST_ARTIFACTS, or converted on the spot where TensorFlow is installed).
"""

from __future__ import annotations

import gc
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_runtime.data import load_local_data
from device_runtime.interpreter import PresetShapeRunner, load_interpreter, load_interpreter_from_file, signature_runner
from device_runtime.mapped_file import release_mapped_pages
from device_runtime.model import TrainableModel, iterate_batches
from device_runtime.training import evaluate_locally, train_locally

try:  # tests/ may or may not be a package
    from .device_artifacts import artifact_path  # type: ignore[no-redef]
except ImportError:
    from device_artifacts import artifact_path  # type: ignore[no-redef]

pytestmark = pytest.mark.device


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of the 'mlp', 'cnn' and 'scalar' artifacts, converted at most once per module."""
    directory = tmp_path_factory.mktemp("device_artifacts")
    return {name: artifact_path(name, directory) for name in ("mlp", "cnn", "scalar")}


@pytest.fixture
def mlp(artifacts: dict[str, Path]) -> TrainableModel:
    return TrainableModel.from_file(artifacts["mlp"], num_threads=1)


@pytest.fixture
def cnn(artifacts: dict[str, Path]) -> TrainableModel:
    return TrainableModel.from_file(artifacts["cnn"], num_threads=1)


def learnable(count: int, seed: int = 0, shape: tuple[int, ...] = (8,)) -> tuple[np.ndarray, np.ndarray]:
    """Examples whose class is the argmax of their first three features."""
    x = np.random.default_rng(seed).standard_normal((count, *shape)).astype(np.float32)
    return x, np.argmax(x.reshape(count, -1)[:, :3], axis=1).astype(np.int32)


def assert_same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for left, right in zip(a, b):
        np.testing.assert_array_equal(left, right)


def assert_zero(delta: list[np.ndarray]) -> None:
    assert all(not np.any(d) for d in delta)


def test_every_source_kind_gives_the_same_result(mlp: TrainableModel, tmp_path: Path) -> None:
    x, y = learnable(10)
    np.savez(tmp_path / "all.npz", x=x, y=y)
    folder = tmp_path / "parts"
    folder.mkdir()
    # written out of order: the folder is read in sorted file-name order
    for name, part in [("p2.npz", slice(7, 10)), ("p0.npz", slice(0, 3)), ("p1.npz", slice(3, 7))]:
        np.savez(folder / name, x=x[part], y=y[part])

    class Reiterable:
        def __iter__(self):
            return iter([(x[:6], y[:6]), (x[6:], y[6:])])

    sources = {
        "arrays": (x, y),
        "list of arrays": [x, y],
        "npz": tmp_path / "all.npz",
        "npz as str": str(tmp_path / "all.npz"),
        "folder": folder,
        "list of batches": [(x[:3], y[:3]), (x[3:8], y[3:8]), (x[8:], y[8:])],
        "generator": ((x[i : i + 1], y[i : i + 1]) for i in range(10)),
        "reiterable": Reiterable(),
        "LocalData": load_local_data((x, y)),
    }
    initial = mlp.get_weights()
    results = {name: train_locally(mlp, source, initial_weights=initial) for name, source in sources.items()}
    reference = results["arrays"]
    assert reference.steps == 3 and reference.num_examples == 10 and not reference.stopped_early
    for name, result in results.items():
        assert_same_weights(result.delta, reference.delta)
        assert result.metrics == reference.metrics, name
        assert (result.num_examples, result.steps) == (10, 3), name
    # several epochs over re-iterable sources
    two = {name: train_locally(mlp, sources[name], epochs=2, initial_weights=initial)
           for name in ("arrays", "folder", "list of batches", "reiterable")}
    for result in two.values():
        assert_same_weights(result.delta, two["arrays"].delta)
        assert result.num_examples == 20


@pytest.mark.parametrize("labels", [[0, 1, 2, 3, 0, 1], [0, -1, 2, 1, 0, 1], [42] * 6])
def test_labels_the_loss_cannot_learn_from_are_refused_before_any_step(mlp: TrainableModel, labels: list) -> None:
    """3 classes: a label of 3, -1 or 42 would train on garbage (a device with bad data): refused, weights kept."""
    before = mlp.get_weights()
    x = np.zeros((6, 8), np.float32)
    with pytest.raises(ValueError, match=r"data: y: labels must be class ids in \[0, 2\] for this model's loss"):
        train_locally(mlp, (x, np.array(labels)))
    assert_same_weights(mlp.get_weights(), before)
    with pytest.raises(ValueError, match=r"batch 0: y: labels must be class ids in \[0, 2\]"):
        train_locally(mlp, [(x, np.array(labels))])  # a stream's batches too


def test_delta_is_weights_after_minus_before(mlp: TrainableModel) -> None:
    before = mlp.get_weights()
    result = train_locally(mlp, learnable(10), epochs=2)
    after = mlp.get_weights()
    assert [d.dtype for d in result.delta] == [np.float32] * len(before)
    assert [d.shape for d in result.delta] == [s.shape for s in mlp.weight_specs]
    assert_same_weights(result.delta, [a - b for a, b in zip(after, before)])
    assert any(np.any(d) for d in result.delta)


def test_matches_manual_steps_with_shuffle_seed_plus_epoch(mlp: TrainableModel) -> None:
    x, y = learnable(10)
    initial = mlp.get_weights()
    result = train_locally(mlp, (x, y), epochs=2, shuffle_seed=5)
    mlp.set_weights(initial)
    for seed in (5, 6):
        for batch in iterate_batches(x, y, mlp.batch_size, shuffle_seed=seed):
            mlp.train_step(*batch)
    assert_same_weights(result.delta, [a - b for a, b in zip(mlp.get_weights(), initial)])


def test_num_examples_and_metrics_count_each_epoch_once(mlp: TrainableModel) -> None:
    train_locally(mlp, learnable(7))  # metrics of an earlier run are not carried over
    result = train_locally(mlp, learnable(10), epochs=2)
    assert result.num_examples == 20 and result.steps == 6
    assert result.metrics["num_examples"] == 20 and result.metrics["num_batches"] == 6
    assert set(result.metrics) == {"loss_sum", "num_examples", "num_batches", "correct"}
    assert 0 <= result.metrics["correct"] <= 20 and result.metrics["loss_sum"] > 0
    assert result.seconds >= 0


def test_shuffle_is_deterministic(mlp: TrainableModel) -> None:
    data = learnable(16)
    initial = mlp.get_weights()

    def delta(seed):
        return train_locally(mlp, data, epochs=2, shuffle_seed=seed, initial_weights=initial).delta

    assert_same_weights(delta(1), delta(1))
    assert not np.array_equal(delta(1)[0], delta(2)[0])
    assert not np.array_equal(delta(1)[0], delta(None)[0])


def test_max_steps_stops_exactly(mlp: TrainableModel) -> None:
    data = learnable(10)  # 3 steps per epoch
    initial = mlp.get_weights()
    cut = train_locally(mlp, data, epochs=2, max_steps=4, initial_weights=initial)
    assert (cut.steps, cut.num_examples, cut.stopped_early) == (4, 14, True)  # 4 + 4 + 2, then 4
    assert cut.metrics["num_batches"] == 4
    exact = train_locally(mlp, data, epochs=2, max_steps=6, initial_weights=initial)
    assert (exact.steps, exact.num_examples, exact.stopped_early) == (6, 20, False)
    none = train_locally(mlp, data, max_steps=0, initial_weights=initial)
    assert (none.steps, none.num_examples, none.stopped_early) == (0, 0, True)
    assert_zero(none.delta)


def test_max_seconds_stops_early(mlp: TrainableModel) -> None:
    result = train_locally(mlp, learnable(40), epochs=3, max_seconds=0.0)
    assert result.stopped_early and result.steps <= 1
    assert result.num_examples == 4 * result.steps
    generous = train_locally(mlp, learnable(40), max_seconds=60.0)
    assert not generous.stopped_early and generous.steps == 10


def test_learning_rate_override(mlp: TrainableModel) -> None:
    initial = mlp.get_weights()
    frozen = train_locally(mlp, learnable(10), epochs=2, learning_rate=0.0)
    assert_zero(frozen.delta)
    assert_same_weights(mlp.get_weights(), initial)
    assert frozen.metrics["num_examples"] == 20
    assert any(np.any(d) for d in train_locally(mlp, learnable(10), learning_rate=0.1).delta)


def test_scalar_inputs_set_and_train(artifacts: dict[str, Path]) -> None:
    """Every rank-0 input of the format: set_learning_rate's, set_proximal_mu's, a scalar weight's.
    ai-edge-litert's aarch64 SignatureRunner segfaults resizing them (CI runs this on arm64)."""
    model = TrainableModel.from_file(artifacts["scalar"], num_threads=1)
    assert [spec.shape for spec in model.weight_specs] == [(8, 3), ()]
    assert model.set_learning_rate(0.05) == pytest.approx(0.05)
    assert model.set_proximal_mu(0.5) == 0.5
    weights = model.get_weights()
    weights[1] = np.float32(2.0)
    model.set_weights(weights)
    assert model.get_weights()[1].shape == () and model.get_weights()[1] == 2.0
    result = train_locally(model, learnable(12), learning_rate=0.1, proximal_mu=0.5, initial_weights=weights)
    assert result.steps == 3 and result.delta[1].shape == () and result.delta[1] != 0.0
    assert model.get_weights()[1] == pytest.approx(2.0 + float(result.delta[1]))


def test_signatures_run_without_resizing_and_as_litert_runs_them(artifacts: dict[str, Path]) -> None:
    """The installed backend's runners are the no-resize kind; they train as its SignatureRunner does
    and refuse an input of the wrong shape or a missing one."""
    x, y = learnable(4)
    inputs = {"x": x, "y": y, "mask": np.ones(4, np.float32)}
    ours, theirs = (load_interpreter_from_file(artifacts["mlp"], num_threads=1) for _ in range(2))
    train = signature_runner(ours, "train")
    assert isinstance(train, PresetShapeRunner)
    for _ in range(3):  # the same losses step after step: the same variables, updated the same way
        assert train(**inputs)["loss"] == theirs.get_signature_runner("train")(**inputs)["loss"]
    for name, weight in signature_runner(ours, "get_weights")().items():
        np.testing.assert_array_equal(weight, theirs.get_signature_runner("get_weights")()[name])
    with pytest.raises(ValueError, match="[Dd]imension mismatch"):
        train(x=x[:2], y=y[:2], mask=np.ones(2, np.float32))
    with pytest.raises(ValueError, match="takes the inputs"):
        train(x=x, y=y)


def test_a_runner_keeps_its_interpreter_and_model_alive(artifacts: dict[str, Path]) -> None:
    """The interpreter of `model_content` owns the model's memory; a runner outlives every other reference."""
    model_bytes = artifacts["mlp"].read_bytes()
    train = signature_runner(load_interpreter(model_bytes, num_threads=1), "train")
    size = len(model_bytes)
    del model_bytes
    gc.collect()
    overwrite = [b"\xff" * size for _ in range(16)]  # what would reuse freed model memory
    x, y = learnable(8)
    losses = [float(train(x=x[:4], y=y[:4], mask=np.ones(4, np.float32))["loss"]) for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] and len(overwrite) == 16


def test_reset_optimizer(cnn: TrainableModel) -> None:
    data = learnable(12, shape=(6, 6, 1))
    initial = cnn.get_weights()
    first = train_locally(cnn, data, initial_weights=initial)
    fresh = train_locally(cnn, data, initial_weights=initial)  # momentum zeroed again
    assert_same_weights(fresh.delta, first.delta)
    carried = train_locally(cnn, data, initial_weights=initial, reset_optimizer=False)
    assert not np.array_equal(carried.delta[0], first.delta[0])


def test_labels_shaped_n_by_1_are_squeezed(mlp: TrainableModel) -> None:
    x, y = learnable(10)
    initial = mlp.get_weights()
    flat = train_locally(mlp, (x, y), initial_weights=initial)
    column = train_locally(mlp, (x, y[:, None]), initial_weights=initial)
    streamed = train_locally(mlp, [(x, y[:, None].astype(np.int64))], initial_weights=initial)
    assert_same_weights(column.delta, flat.delta)
    assert_same_weights(streamed.delta, flat.delta)


def test_evaluate_locally(mlp: TrainableModel) -> None:
    x, y = learnable(10)
    before = mlp.get_weights()
    metrics = evaluate_locally(mlp, (x, y))
    assert_same_weights(mlp.get_weights(), before)
    assert metrics["num_examples"] == 10 and metrics["num_batches"] == 3
    mlp.reset_metrics()
    for xb, yb in [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]:
        mlp.evaluate_batch(xb, yb)
    assert metrics == pytest.approx(mlp.report_metrics(), rel=1e-6)
    assert evaluate_locally(mlp, [(x[:5], y[:5]), (x[5:], y[5:])]) == pytest.approx(metrics, rel=1e-6)


def _bad_sources(tmp_path: Path) -> dict[str, tuple[object, str]]:
    """Bad data and a fragment of the expected error message."""
    x, y = learnable(10)
    np.savez(tmp_path / "no_y.npz", x=x)
    (tmp_path / "empty_folder").mkdir()
    return {
        "x shape": ((x[:, :7], y), r"expected shape \(N, 8\).*got \(10, 7\)"),
        "y shape": ((x, np.zeros((10, 3), np.int32)), r"expected shape \(N\).*got \(10, 3\)"),
        "x dtype": ((x.astype(np.complex64), y), "expected dtype float32, got complex64"),
        "y dtype": ((x, y + 0.5), "expected dtype int32, got float64"),
        "lengths": ((x, y[:9]), "same number of examples, got 10 and 9"),
        "empty": ((x[:0], y[:0]), "no examples"),
        "missing file": (tmp_path / "nothing.npz", "no such data file"),
        "npz without y": (tmp_path / "no_y.npz", r"needs arrays 'x' and 'y'; missing \['y'\]"),
        "empty folder": (tmp_path / "empty_folder", "no .npz files"),
        "empty stream": ([], "no examples"),
        "bad first batch": ([(x[:, :7], y)], r"batch 0: x: expected shape"),
        "not pairs": ([x], "must be an \\(x, y\\) pair"),
    }


@pytest.mark.parametrize("case", ["x shape", "y shape", "x dtype", "y dtype", "lengths", "empty", "missing file",
                                  "npz without y", "empty folder", "empty stream", "bad first batch", "not pairs"])
def test_bad_data_raises_before_training(mlp: TrainableModel, tmp_path: Path, case: str) -> None:
    source, message = _bad_sources(tmp_path)[case]
    before = mlp.get_weights()
    with pytest.raises(ValueError, match=message):
        train_locally(mlp, source)
    assert_same_weights(mlp.get_weights(), before)
    assert mlp.report_metrics()["num_batches"] == 0


def test_bad_later_batch_of_a_stream_restores_the_weights(mlp: TrainableModel) -> None:
    x, y = learnable(10)
    before = mlp.get_weights()
    with pytest.raises(ValueError, match=r"batch 2: y: expected shape"):
        train_locally(mlp, [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:, None, None])])
    assert_same_weights(mlp.get_weights(), before)


def test_usage_errors(mlp: TrainableModel) -> None:
    x, y = learnable(8)
    with pytest.raises(ValueError, match="one-shot iterator"):
        train_locally(mlp, ((x[i : i + 2], y[i : i + 2]) for i in range(0, 8, 2)), epochs=2)
    before = mlp.get_weights()
    with pytest.raises(ValueError, match="shuffle_seed needs in-memory data"):
        train_locally(mlp, [(x, y)], shuffle_seed=1, initial_weights=[w + 1 for w in before])
    assert_same_weights(mlp.get_weights(), before)
    for bad in [{"epochs": 0}, {"max_steps": -1}, {"max_seconds": float("nan")}, {"epochs": 1.5}]:
        with pytest.raises(ValueError):
            train_locally(mlp, (x, y), **bad)
    with pytest.raises(TypeError, match="unsupported data source"):
        train_locally(mlp, 42)


@pytest.mark.parametrize("name, shape", [("mlp", (8,)), ("cnn", (6, 6, 1))])
def test_loss_decreases_over_five_epochs(artifacts: dict[str, Path], name: str, shape: tuple[int, ...]) -> None:
    model = TrainableModel.from_file(artifacts[name], num_threads=1)
    train, held_out = learnable(128, seed=1, shape=shape), learnable(32, seed=2, shape=shape)
    start = model.finalized_metrics(evaluate_locally(model, held_out))
    results = [train_locally(model, train, shuffle_seed=epoch) for epoch in range(5)]
    end = model.finalized_metrics(evaluate_locally(model, held_out))
    losses = [model.finalized_metrics(r.metrics)["loss"] for r in results]
    assert losses[-1] < 0.8 * losses[0]
    assert end["loss"] < 0.8 * start["loss"] and end["accuracy"] > start["accuracy"]


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of the file at `path` (/proc/self/smaps)."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split(maxsplit=5)
            if "-" in fields[0] and len(fields) >= 5:          # a mapping's header line
                inside = len(fields) == 6 and fields[5].strip() == target
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.parametrize("name, shape", [("mlp", (8,)), ("cnn", (6, 6, 1))])
def test_from_file_trains_exactly_as_from_bytes(artifacts: dict[str, Path], name: str, shape: tuple[int, ...]) -> None:
    mapped = TrainableModel.from_file(artifacts[name], num_threads=1)
    in_memory = TrainableModel(artifacts[name].read_bytes(), num_threads=1)
    assert_same_weights(mapped.get_weights(), in_memory.get_weights())
    data = learnable(40, seed=3, shape=shape)
    results = [train_locally(model, data, shuffle_seed=5) for model in (mapped, in_memory)]
    assert_same_weights(results[0].delta, results[1].delta)
    assert results[0].metrics == results[1].metrics


def test_release_mapped_pages_drops_resident_pages_and_keeps_contents(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert mapped[:] == data                              # every page touched
        before = _mapped_rss_kib(path)
        assert release_mapped_pages(path) >= len(data)
        after = _mapped_rss_kib(path)
        assert before >= 4000 and after < 100, (before, after)
        assert mapped[:] == data                              # read back from the page cache
    assert release_mapped_pages(tmp_path / "not_mapped.bin") == 0


def test_imports_without_tensorflow() -> None:
    code = ("import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None; "
            "import device_runtime.training, device_runtime.data")
    subprocess.run([sys.executable, "-c", code], check=True)
