"""Federated datasets for simulation, in the shape of `tff.simulation.datasets` (numpy; TensorFlow only on request).

`ClientData` / `ClientDataset` hold per-client numpy examples; `partition` splits a centralized
dataset into clients (IID, Dirichlet label skew, McMahan's shards, quantity skew); `digits` is a
real federated dataset with no download; `emnist` and `shakespeare` read LEAF JSON and TFF's h5 files.
"""

from fedge.simulation.datasets import digits, emnist, partition, shakespeare
from fedge.simulation.datasets.client_data import ClientData, ClientDataset, train_test_client_split

__all__ = [
    "ClientData",
    "ClientDataset",
    "digits",
    "emnist",
    "partition",
    "shakespeare",
    "train_test_client_split",
]
