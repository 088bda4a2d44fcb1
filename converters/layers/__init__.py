"""Which Keras layers fedge can lower, and the lowering of each."""

from __future__ import annotations

from typing import Any, Callable

import keras

from converters.activations import activation_name
from converters.errors import UnsupportedLayerError
from converters.layers.base import ForwardContext, Lowering
from converters.layers.conv import Conv2DLowering, DepthwiseConv2DLowering
from converters.layers.core import (ActivationLowering, DenseLowering, DropoutLowering,
                                    EmbeddingLowering, ReshapeLowering)
from converters.layers.merge import AddLowering, ConcatenateLowering
from converters.layers.normalization import BatchNormalizationLowering
from converters.layers.pooling import (AveragePooling2DLowering, GlobalAveragePooling2DLowering,
                                       MaxPooling2DLowering)
from converters.layers.recurrent import GRULowering, LSTMLowering, SimpleRNNLowering

__all__ = ["ForwardContext", "Lowering", "SUPPORTED_LAYERS", "lower_layer"]

_WITH_ACTIVATION: dict[type, type[Lowering]] = {
    keras.layers.Dense: DenseLowering,
    keras.layers.Conv2D: Conv2DLowering,
    keras.layers.DepthwiseConv2D: DepthwiseConv2DLowering,
}
_PLAIN: dict[type, type[Lowering]] = {
    keras.layers.MaxPooling2D: MaxPooling2DLowering,
    keras.layers.AveragePooling2D: AveragePooling2DLowering,
    keras.layers.GlobalAveragePooling2D: GlobalAveragePooling2DLowering,
    keras.layers.Flatten: ReshapeLowering,
    keras.layers.Reshape: ReshapeLowering,
    keras.layers.Dropout: DropoutLowering,
    keras.layers.BatchNormalization: BatchNormalizationLowering,
    keras.layers.Embedding: EmbeddingLowering,
    keras.layers.Add: AddLowering,
    keras.layers.Concatenate: ConcatenateLowering,
    keras.layers.SimpleRNN: SimpleRNNLowering,
    keras.layers.GRU: GRULowering,
    keras.layers.LSTM: LSTMLowering,
}


def _activation_layer_name(layer: Any) -> str:
    if isinstance(layer, keras.layers.ReLU):
        if float(layer.negative_slope) != 0.0 or float(layer.threshold) != 0.0:
            raise UnsupportedLayerError(
                f"layer '{layer.name}' (ReLU): negative_slope/threshold are not supported")
        if layer.max_value is None:
            return "relu"
        if float(layer.max_value) == 6.0:
            return "relu6"
        raise UnsupportedLayerError(f"layer '{layer.name}' (ReLU): max_value={layer.max_value} is not supported")
    if isinstance(layer, keras.layers.Softmax):
        if layer.axis not in (-1,):
            raise UnsupportedLayerError(f"layer '{layer.name}' (Softmax): axis={layer.axis} is not supported")
        return "softmax"
    return activation_name(layer.activation)


_ACTIVATION_LAYERS: tuple[type, ...] = (keras.layers.Activation, keras.layers.ReLU, keras.layers.Softmax)

SUPPORTED_LAYERS: tuple[str, ...] = tuple(sorted(
    cls.__name__ for cls in (*_WITH_ACTIVATION, *_PLAIN, *_ACTIVATION_LAYERS, keras.layers.TimeDistributed)))


def lower_layer(layer: Any, weight_index: Callable[[Any], int]) -> list[Lowering]:
    """The lowerings for one Keras layer, in execution order (a layer with an `activation=`
    becomes its core followed by an activation)."""
    if type(layer) is keras.layers.TimeDistributed:  # Dense already maps the last axis of [B, T, F]
        if type(layer.layer) is not keras.layers.Dense:
            raise UnsupportedLayerError(f"layer '{layer.name}' (TimeDistributed): wrapping "
                                        f"{type(layer.layer).__name__} is not supported (only Dense)")
        lowerings = lower_layer(layer.layer, weight_index)
        for lowering in lowerings:  # Keras reshapes the wrapped output: a loss cannot find the logits
            lowering.hides_logits = True
        return lowerings
    indices = [weight_index(variable) for variable in layer.weights]
    for cls, lowering in _WITH_ACTIVATION.items():
        if type(layer) is cls:
            core = lowering(layer, indices)
            name = activation_name(layer.activation)
            return [core] if name == "linear" else [core, ActivationLowering(layer, [], name)]
    for cls, lowering in _PLAIN.items():
        if type(layer) is cls:
            return [lowering(layer, indices)]
    if type(layer) in _ACTIVATION_LAYERS:
        return [ActivationLowering(layer, [], _activation_layer_name(layer))]
    raise UnsupportedLayerError(
        f"layer '{layer.name}' of class {type(layer).__name__} is not supported; "
        f"supported layers: {', '.join(SUPPORTED_LAYERS)}")
