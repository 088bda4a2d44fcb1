"""From a TrainableModule to `.tflite` bytes: conversion, the builtin-only check, the manifest."""

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
        tf.saved_model.save(module, saved_model_dir, signatures=concrete)
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
