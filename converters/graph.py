"""A Keras model (Sequential or functional) as a list of lowered nodes in execution order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras

from converters.errors import ConversionError, UnsupportedLayerError
from converters.layers import Lowering, lower_layer


@dataclass
class Node:
    """One lowered operation: reads value ids `inputs`, writes value id `output`."""

    lowering: Lowering
    inputs: list[int]
    output: int


@dataclass
class ModelGraph:
    """The lowered model: value 0 is the model input, `output` the model output."""

    nodes: list[Node]
    output: int
    weights: list[Any]          # keras variables, in model.weights order
    trainable: list[bool]       # per weight: does the optimizer update it


def build_graph(model: keras.Model) -> ModelGraph:
    """Lower every layer of `model`; raises UnsupportedLayerError naming the first bad layer."""
    if not model.built or not getattr(model, "inputs", None):
        raise ConversionError("the model must be built with a known input shape "
                              "(give it a keras.Input or call it on a batch first)")
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise ConversionError(f"only single-input, single-output models are supported "
                              f"(model has {len(model.inputs)} inputs, {len(model.outputs)} outputs)")
    weights = list(model.weights)
    positions = {id(variable): i for i, variable in enumerate(weights)}
    trainable_ids = {id(variable) for variable in model.trainable_weights}

    def weight_index(variable: Any) -> int:
        return positions[id(variable)]

    nodes: list[Node] = []
    values: dict[int, int] = {id(model.inputs[0]): 0}

    def add(layer: Any, inputs: list[int]) -> int:
        if isinstance(layer, keras.Model):
            raise UnsupportedLayerError(
                f"layer '{layer.name}' is a nested model ({type(layer).__name__}); "
                "build the outer model from its layers instead")
        current = inputs
        for lowering in lower_layer(layer, weight_index):
            nodes.append(Node(lowering, current, len(nodes) + 1))
            current = [len(nodes)]
        return current[0]

    if isinstance(model, keras.Sequential):
        value = 0
        for layer in model.layers:
            value = add(layer, [value])
        output = value
    else:
        for depth in sorted(model._nodes_by_depth, reverse=True):  # keras' own topological order
            for keras_node in model._nodes_by_depth[depth]:
                if keras_node.is_input or keras_node.operation is None:
                    continue
                if len(keras_node.outputs) != 1:
                    raise UnsupportedLayerError(
                        f"layer '{keras_node.operation.name}' has {len(keras_node.outputs)} outputs")
                inputs = [values[id(tensor)] for tensor in keras_node.input_tensors]
                values[id(keras_node.outputs[0])] = add(keras_node.operation, inputs)
        output = values[id(model.outputs[0])]
    return ModelGraph(nodes, output, weights, [id(v) in trainable_ids for v in weights])
