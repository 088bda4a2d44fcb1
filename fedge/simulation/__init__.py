"""Simulation utilities, in the shape of `tff.simulation`: federated datasets for in-process experiments."""

from fedge.simulation import datasets

__all__ = ["datasets"]
