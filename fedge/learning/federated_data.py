"""`federated_data`, the list of client datasets a round takes, turned into checked numpy arrays up front.

Each client may be a numpy `(x, y)` pair (or a dict with keys "x" and "y"), a `tf.data.Dataset`
(batched or not, elements `(x, y)` or dicts), or a `ClientDataset` (anything with `.x` and `.y`).
Every client is checked against the artifact's manifest before any client trains, so a bad
client fails the round at once with its index, the expected and the actual shape or dtype.
A client's id is its `client_id` attribute when it has one (a ClientDataset from ClientData),
else its position in the list as a string ("0", "1", ...); shuffle seeds derive from it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_runtime import load_local_data
from device_runtime.manifest import Manifest
from fedge.simulation.datasets import ClientDataset

ClientArrays = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True, eq=False)
class LocalClient:
    """One in-process client of a round: its id (what its shuffle seed derives from) and its checked arrays."""

    client_id: str
    x: np.ndarray
    y: np.ndarray


def local_clients(federated_data: Iterable[Any], manifest: Manifest) -> list[LocalClient]:
    """Every client's id and (x, y), checked against and cast to the manifest's input and label specs; errors name the client."""
    if isinstance(federated_data, (str, bytes, Mapping, np.ndarray, tuple)) or not isinstance(federated_data, Iterable):
        raise TypeError(f"federated_data must be a list of client datasets, got {type(federated_data).__name__}")
    return [_checked(index, client, manifest) for index, client in enumerate(federated_data)]


def _checked(index: int, client: Any, manifest: Manifest) -> LocalClient:
    """One client after the manifest's checks, errors prefixed with the client's index."""
    try:
        x, y = _arrays(client)
        if x.ndim >= 1 and y.ndim >= 1 and x.shape[0] == 0 and y.shape[0] == 0:
            x, y = _empty(x, y, manifest)
        else:
            data = load_local_data((x, y), manifest)
            x, y = data.x, data.y
    except (TypeError, ValueError) as error:
        raise type(error)(f"federated_data[{index}] (client {index}): {str(error).removeprefix('data: ')}") from None
    client_id = getattr(client, "client_id", None)
    return LocalClient(str(index) if client_id is None else str(client_id), x, y)


def _arrays(client: Any) -> ClientArrays:
    """The (x, y) numpy arrays of one client, whatever form it came in."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(client, tf.data.Dataset):
        client = ClientDataset.from_tf_dataset(client)
    if isinstance(client, Mapping) and "x" in client and "y" in client:
        return np.asarray(client["x"]), np.asarray(client["y"])
    if isinstance(client, (tuple, list)) and len(client) == 2:
        return np.asarray(client[0]), np.asarray(client[1])
    if hasattr(client, "x") and hasattr(client, "y"):
        return np.asarray(client.x), np.asarray(client.y)
    raise TypeError(f"a client dataset must be an (x, y) pair of arrays, a dict with 'x' and 'y', a tf.data.Dataset "
                    f"or a ClientDataset, got {type(client).__name__}")


def _empty(x: np.ndarray, y: np.ndarray, manifest: Manifest) -> ClientArrays:
    """A client with no examples: its per-example shapes and dtypes are checked with one zero row."""
    try:
        probe = load_local_data((np.zeros((1, *x.shape[1:]), x.dtype), np.zeros((1, *y.shape[1:]), y.dtype)), manifest)
    except ValueError as error:
        raise ValueError(f"{error} (the client has no examples, x {x.shape} and y {y.shape}: checked with one "
                         f"zero row)") from None
    return probe.x[:0], probe.y[:0]
