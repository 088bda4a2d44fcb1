"""fedge: federated learning for edge devices, in the shape of TensorFlow Federated's API."""

__version__ = "0.1.0"
