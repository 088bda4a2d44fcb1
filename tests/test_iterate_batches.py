"""iterate_batches: every example exactly once, padding masked out, deterministic shuffling."""

import numpy as np
import pytest

from device_runtime.model import iterate_batches

pytestmark = pytest.mark.device


def _data(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Examples whose features encode their index (rows start at 1 so padding zeros stand out)."""
    x = np.arange(1, count + 1, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
    y = np.arange(1, count + 1, dtype=np.int32)
    return x, y


def _seen(batches) -> list[int]:
    """Labels of the real (mask 1) rows, checking each batch's shapes and padding on the way."""
    seen = []
    for xb, yb, mask in batches:
        assert xb.shape == (4, 2, 3) and yb.shape == (4,) and mask.shape == (4,)
        assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
        real = mask == 1.0
        # real rows come first, padding rows are all zero
        assert not np.any(np.diff(mask) > 0)
        assert np.all(xb[~real] == 0) and np.all(yb[~real] == 0)
        np.testing.assert_array_equal(xb[real][:, 0, 0], yb[real].astype(np.float32))
        seen.extend(int(v) for v in yb[real])
    return seen


@pytest.mark.parametrize("count", [1, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("seed", [None, 0, 7])
def test_every_example_exactly_once(count: int, seed) -> None:
    x, y = _data(count)
    batches = list(iterate_batches(x, y, 4, shuffle_seed=seed))
    assert len(batches) == -(-count // 4)
    seen = _seen(batches)
    assert sorted(seen) == list(range(1, count + 1))
    if seed is None:
        assert seen == list(range(1, count + 1))
    last_mask = batches[-1][2]
    assert last_mask.sum() == count - 4 * (len(batches) - 1)
    for _, _, mask in batches[:-1]:
        assert mask.sum() == 4


def test_dtypes_are_kept() -> None:
    x, y = _data(5)
    for xb, yb, _ in iterate_batches(x.astype(np.float64), y.astype(np.int64), 4):
        assert xb.dtype == np.float64 and yb.dtype == np.int64


def test_shuffle_is_deterministic_per_seed() -> None:
    x, y = _data(50)
    first = _seen(iterate_batches(x, y, 4, shuffle_seed=3))
    again = _seen(iterate_batches(x, y, 4, shuffle_seed=3))
    other = _seen(iterate_batches(x, y, 4, shuffle_seed=4))
    assert first == again
    assert first != other
    assert first != list(range(1, 51))


def test_empty_dataset_yields_nothing() -> None:
    assert list(iterate_batches(np.zeros((0, 2, 3)), np.zeros((0,)), 4)) == []


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True])
def test_bad_batch_size_is_rejected(batch_size) -> None:
    x, y = _data(3)
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(x, y, batch_size)


def test_mismatched_lengths_are_rejected() -> None:
    x, _ = _data(3)
    with pytest.raises(ValueError, match="same number of examples"):
        iterate_batches(x, np.zeros(2), 4)
