"""Templates of federated computations, in TensorFlow Federated's shape (tff.templates)."""

from fedge.templates.iterative_process import IterativeProcess

__all__ = ["IterativeProcess"]
