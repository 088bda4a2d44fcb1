"""The tf.data adapter; the only place fedge.simulation.datasets imports TensorFlow (on first use)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def to_tf_dataset(x: np.ndarray, y: np.ndarray) -> Any:
    """An unbatched `tf.data.Dataset` of `(x, y)` tuples over the arrays."""
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y))


def _split_element(element: Any) -> tuple[Any, Any]:
    """The `(x, y)` of one dataset element: a 2-tuple or a mapping with keys "x" and "y" (TFF's OrderedDict)."""
    if isinstance(element, Mapping):
        if "x" not in element or "y" not in element:
            raise ValueError(f"dataset elements that are dicts need keys 'x' and 'y', got keys {sorted(element)}")
        return element["x"], element["y"]
    if isinstance(element, (tuple, list)) and len(element) == 2:
        return element[0], element[1]
    raise ValueError(
        f"dataset elements must be (x, y) pairs or dicts with keys 'x' and 'y', got {type(element).__name__}"
    )


def _leading_dim_unknown(spec: Any) -> bool:
    """Whether a TensorSpec has rank >= 1 and an unknown first dimension (what `.batch()` produces)."""
    return spec.shape.rank is not None and spec.shape.rank >= 1 and spec.shape[0] is None


def from_tf_dataset(dataset: Any, batched: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Numpy `(x, y)` of every example; `batched=None` means batched when x's and y's leading dims are unknown."""
    import tensorflow as tf

    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"expected a tf.data.Dataset, got {type(dataset).__name__}")
    x_spec, y_spec = _split_element(dataset.element_spec)
    if batched is None:
        batched = _leading_dim_unknown(x_spec) and _leading_dim_unknown(y_spec)
    xs, ys = [], []
    for element in dataset.as_numpy_iterator():
        x, y = _split_element(element)
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
    if not xs:
        return _empty(x_spec, batched), _empty(y_spec, batched)
    if batched:
        return np.concatenate(xs), np.concatenate(ys)
    return np.stack(xs), np.stack(ys)


def _empty(spec: Any, batched: bool) -> np.ndarray:
    """A zero-example array shaped like the elements of an empty dataset (unknown dims become 0)."""
    dims = [d or 0 for d in spec.shape.as_list()]
    return np.zeros([0, *(dims[1:] if batched else dims)], dtype=spec.dtype.as_numpy_dtype)
