"""Manifests for tests that need only the weights and metric variables (the codec, the aggregator), no artifact."""

from __future__ import annotations

import math
from collections.abc import Sequence

from device_runtime.manifest import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, Manifest

TEST_HASH = "sha256:" + "ab" * 32


def manifest_for(shapes: Sequence[Sequence[int]], variables: Sequence[str] = ("loss_sum", "num_examples"),
                 content_hash: str = TEST_HASH) -> Manifest:
    """A manifest with float32 trainable weights of `shapes` (keys w_000, ...) and the given metric variables."""
    weights = [{"key": f"w_{i:03d}", "name": f"layer_{i}/w", "shape": list(shape), "dtype": "float32",
                "trainable": True} for i, shape in enumerate(shapes)]
    finalizers = {"num_examples": ["identity", "num_examples"]}
    if "loss_sum" in variables:
        finalizers["loss"] = ["divide", "loss_sum", "num_examples"]
    return Manifest.from_json({
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_FORMAT_VERSION, "model_name": "test", "batch_size": 4,
        "input": {"shape": [1], "dtype": "float32"}, "label": {"shape": [], "dtype": "int32"},
        "output": {"shape": [1], "dtype": "float32"}, "weights": weights,
        "num_parameters": sum(math.prod(s) for s in shapes),
        "loss": {"name": "custom"}, "optimizer": {"name": "sgd", "learning_rate": 0.1},
        "metrics": {"variables": list(variables), "finalizers": finalizers},
        "signatures": [], "producer": "tests", "content_hash": content_hash})
