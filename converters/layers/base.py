"""The contract every layer lowering fulfils: a forward pass and a hand-written backward pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import tensorflow as tf

from converters.errors import UnsupportedLayerError


@dataclass
class ForwardContext:
    """What a forward pass may depend on besides weights and inputs."""

    training: bool
    mask: tf.Tensor  # float32 [B]: 1 for a real example, 0 for padding
    updates: list[tuple[int, tf.Tensor]] = field(default_factory=list)  # (weight index, new value)

    def row_mask(self, rank: int) -> tf.Tensor:
        """The example mask shaped [B, 1, ..., 1] to broadcast against a rank-`rank` tensor."""
        return tf.reshape(self.mask, [-1] + [1] * (rank - 1))


class Lowering:
    """Lowers one Keras layer; `weight_indices` point into the artifact's weight list."""

    def __init__(self, layer: Any, weight_indices: list[int]):
        self.layer = layer
        self.weight_indices = weight_indices

    def forward(self, ctx: ForwardContext, weights: list[tf.Tensor],
                inputs: list[tf.Tensor]) -> tuple[tf.Tensor, Any]:
        """Output of the layer and whatever the backward pass needs (the cache)."""
        raise NotImplementedError

    def backward(self, cache: Any, weights: list[tf.Tensor], dy: tf.Tensor,
                 need_input_grads: bool) -> tuple[list[tf.Tensor | None], list[tf.Tensor | None]]:
        """Gradients for each input (None when not needed) and for each weight (None if frozen)."""
        raise NotImplementedError

    def unsupported(self, option: str) -> UnsupportedLayerError:
        """An error naming this layer, its class and the option that cannot be lowered."""
        return UnsupportedLayerError(
            f"layer '{self.layer.name}' ({type(self.layer).__name__}): {option} is not supported")


def require(lowering: Lowering, condition: bool, option: str) -> None:
    """Raise UnsupportedLayerError for `option` unless `condition` holds."""
    if not condition:
        raise lowering.unsupported(option)


_PENALTY_ATTRIBUTES = ("kernel_regularizer", "bias_regularizer", "activity_regularizer",
                       "depthwise_regularizer", "beta_regularizer", "gamma_regularizer",
                       "embeddings_regularizer", "kernel_constraint", "bias_constraint",
                       "depthwise_constraint", "beta_constraint", "gamma_constraint",
                       "embeddings_constraint")


def check_common_options(lowering: Lowering) -> None:
    """Reject what changes training behind a layer's back: penalties, constraints, non-float32."""
    layer = lowering.layer
    for attribute in _PENALTY_ATTRIBUTES:
        require(lowering, getattr(layer, attribute, None) is None, f"{attribute}")
    require(lowering, getattr(layer, "lora_rank", None) in (None, 0), "LoRA")
    require(lowering, layer.compute_dtype == "float32",
            f"dtype policy '{layer.dtype_policy.name}' (only float32)")
    data_format = getattr(layer, "data_format", "channels_last")
    require(lowering, data_format == "channels_last", f"data_format='{data_format}'")
