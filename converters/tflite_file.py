"""From an ArtifactModule to `.tflite` bytes: conversion, the builtin-only check, the manifest."""

from __future__ import annotations

import json
import re
import tempfile
from typing import Any

import flatbuffers
import numpy as np
import tensorflow as tf
from ai_edge_litert import schema_py_generated as schema

from converters.errors import ConversionError
from device_runtime.artifact import (MANIFEST_METADATA_NAME, TFLITE_FILE_IDENTIFIER, content_digest,
                                     list_operators)

_PLACEHOLDER_HASH = "sha256:" + "0" * 64


def convert_signatures(module: tf.Module, signatures: dict[str, Any]) -> bytes:
    """Save `module` with `signatures` and convert it with TFLite builtins only."""
    concrete = {name: function.get_concrete_function() for name, function in signatures.items()}
    with tempfile.TemporaryDirectory(prefix="fedge-savedmodel-") as saved_model_dir:
        try:
            tf.saved_model.save(module, saved_model_dir, signatures=concrete)
        except (AssertionError, ValueError) as error:  # e.g. a signature reads a variable the module does not hold
            raise ConversionError("the signatures could not be saved for conversion (does the model use a "
                                  f"variable it does not list among its variables?): {error}") from error
        converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, signature_keys=list(concrete))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        converter.experimental_enable_resource_variables = True
        try:
            model_bytes = converter.convert()
        except Exception as error:  # the converter's errors carry the offending TF ops in their text
            ops = sorted(set(re.findall(r"'tf\.(\w+)'", str(error))))
            detail = f" TF ops without a builtin: {', '.join(ops)}." if ops else ""
            raise ConversionError(f"TFLite conversion with builtin ops only failed.{detail} "
                                  f"Converter said: {str(error).strip().splitlines()[0][:500]}") from error
    model_bytes = _repack(model_bytes, _matmuls_for_the_default_delegate)
    check_builtin_only(model_bytes)
    return model_bytes


def check_builtin_only(model_bytes: bytes) -> None:
    """Raise ConversionError if any operator is a Flex (Select TF) or custom op."""
    foreign = [op.name for op in list_operators(model_bytes) if not op.builtin]
    if foreign:
        raise ConversionError(f"the converted model uses non-builtin operators: {', '.join(foreign)}")


def embed_manifest(model_bytes: bytes, manifest: dict[str, Any]) -> bytes:
    """Add `manifest` as the `fedge_manifest` metadata entry and fill in its content hash."""
    manifest = dict(manifest, content_hash=_PLACEHOLDER_HASH)
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(manifest, indent=1).encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name = MANIFEST_METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != MANIFEST_METADATA_NAME] + [entry]
    builder = flatbuffers.Builder(len(model_bytes) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_FILE_IDENTIFIER)
    packed = bytes(builder.Output())
    digest = content_digest(packed)
    return packed.replace(_PLACEHOLDER_HASH.encode(), digest.encode(), 1)


def _repack(model_bytes: bytes, transform) -> bytes:
    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    if not transform(model):
        return model_bytes
    builder = flatbuffers.Builder(len(model_bytes) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_FILE_IDENTIFIER)
    return bytes(builder.Output())


def _builtin_code(code: Any) -> int:
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _opcode_index(model: Any, builtin: int) -> int:
    """Index of `builtin` in the model's operator codes, added if missing."""
    for index, code in enumerate(model.operatorCodes):
        if _builtin_code(code) == builtin:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, schema.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _new_tensor(model: Any, subgraph: Any, name: str, shape: list[int], dtype: int,
                data: np.ndarray | None = None) -> int:
    tensor = schema.TensorT()
    tensor.name, tensor.shape, tensor.type, tensor.buffer = name, list(shape), dtype, 0
    if data is not None:
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(data.tobytes(), dtype=np.uint8)
        model.buffers.append(buffer)
        tensor.buffer = len(model.buffers) - 1
    subgraph.tensors.append(tensor)
    return len(subgraph.tensors) - 1


def _matmuls_for_the_default_delegate(model: Any) -> int:
    """Turn FULLY_CONNECTED ops whose weights are not constant into BATCH_MATMUL(adj_y).

    The converter lowers `x @ W^T` and some `x @ W` with a variable W (weights read from
    their resource variables: convolutions as matmuls, a Dense layer's input gradient) to
    FULLY_CONNECTED. The default XNNPACK delegate leaves a fully-connected op with
    non-constant weights to the builtin kernel (4-5x slower here), but it runs BATCH_MATMUL
    with two non-constant operands. For float operands with no bias and no fused activation
    both compute x @ W^T (FULLY_CONNECTED first flattens x to [-1, K] unless keep_num_dims,
    done here by a RESHAPE), so the rewrite is exact. Returns how many ops changed.
    """
    changed = 0
    fc = schema.BuiltinOperator.FULLY_CONNECTED
    for subgraph in model.subgraphs:
        tensors = subgraph.tensors
        operators = []
        for op in subgraph.operators:
            operators.append(op)
            if _builtin_code(model.operatorCodes[op.opcodeIndex]) != fc:
                continue
            options = op.builtinOptions
            x, w, out = op.inputs[0], op.inputs[1], op.outputs[0]
            bias = op.inputs[2] if len(op.inputs) > 2 else -1
            weights_buffer = model.buffers[tensors[w].buffer]
            x_shape, w_shape, out_shape = (list(tensors[t].shape) for t in (x, w, out))
            keep_dims = bool(options is not None and options.keepNumDims)
            if (bias != -1 or (options is not None and options.fusedActivationFunction != 0)
                    or weights_buffer.data is not None and len(weights_buffer.data)
                    or any(tensors[t].type != schema.TensorType.FLOAT32 for t in (x, w, out))
                    or len(w_shape) != 2 or len(x_shape) < 2 or min(x_shape + w_shape) < 1
                    or x_shape[-1] != w_shape[1]):
                continue
            if len(x_shape) > 2 and not keep_dims:
                rows = int(np.prod(x_shape[:-1]))
                if out_shape != [rows, w_shape[0]]:
                    continue
                name = tensors[x].name.decode() if isinstance(tensors[x].name, bytes) else str(tensors[x].name)
                flat = _new_tensor(model, subgraph, f"{name}_flat_for_matmul",
                                   [rows, x_shape[-1]], schema.TensorType.FLOAT32)
                new_shape = _new_tensor(model, subgraph, f"{name}_flat_shape", [2],
                                        schema.TensorType.INT32, np.array([rows, x_shape[-1]], np.int32))
                reshape = schema.OperatorT()
                reshape.opcodeIndex = _opcode_index(model, schema.BuiltinOperator.RESHAPE)
                reshape.inputs, reshape.outputs = [x, new_shape], [flat]
                reshape.builtinOptionsType = schema.BuiltinOptions.ReshapeOptions
                reshape.builtinOptions = schema.ReshapeOptionsT()
                reshape.builtinOptions.newShape = [rows, x_shape[-1]]
                operators.insert(len(operators) - 1, reshape)
                x = flat
            op.opcodeIndex = _opcode_index(model, schema.BuiltinOperator.BATCH_MATMUL)
            op.inputs = [x, w]
            op.builtinOptionsType = schema.BuiltinOptions.BatchMatMulOptions
            op.builtinOptions = schema.BatchMatMulOptionsT()
            op.builtinOptions.adjY = True
            changed += 1
        subgraph.operators = operators
    return changed
