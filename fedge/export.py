"""`fedge export CHECKPOINT_DIR -o model.keras|model.tflite`: the trained model out of a checkpoint folder.

`fedge serve` and `fedge simulate` keep beside their `state.npz` the model it trains (`model.tflite`, the
trainable artifact, and `model.keras`, the untrained Keras model, when the job has one:
fedge.server.checkpoint), so the folder alone gives the trained model: a `.keras` model with the trained
weights, or a plain inference `.tflite` (builtin ops). Without a Keras model the `.tflite` is the trainable
artifact with the trained weights as its initial ones, written without TensorFlow. Every export is checked
against the trainable artifact's predictions before it is written. `save_keras_model` and
`save_inference_tflite` also write a simulation report's final model (fedge.report).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_runtime.artifact import Artifact, ArtifactError, content_digest, read_manifest
from device_runtime.atomic_file import replace_atomically
from device_runtime.cli import print_errors
from device_runtime.manifest import Manifest
from fedge.server.checkpoint import CHECKPOINT_FILE, KERAS_MODEL_FILE, MODEL_FILE, read_state

OUTPUT_SUFFIXES = (".keras", ".tflite")
# Exported predictions may differ from the trainable artifact's by float rounding (other kernels), never more.
_RTOL, _ATOL = 1e-4, 1e-5


class ExportError(Exception):
    """The checkpoint cannot be exported as asked; one line naming what and where."""


@dataclass(frozen=True)
class SavedCheckpoint:
    """What a checkpoint folder holds: the trained weights (artifact order), the trainable artifact they belong to,
    and the Keras model file when the job's model was a Keras model."""

    folder: Path
    round_num: int
    weights: list[np.ndarray]
    artifact: Artifact
    keras_path: Path | None


@dataclass(frozen=True)
class Exported:
    """A written export: where, what kind of model, after how many rounds, how many bytes."""

    path: Path
    kind: str
    round_num: int
    size: int


def read_checkpoint(folder: Path) -> SavedCheckpoint:
    """The state and model files of a `fedge serve` or `fedge simulate` checkpoint folder, the weights checked
    against the artifact; ExportError naming the file otherwise."""
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such folder (give the checkpoint folder: output.checkpoints or "
                          f"--checkpoint-dir of fedge serve, <report>/checkpoints of fedge simulate)")
    state_path, model_path = folder / CHECKPOINT_FILE, folder / MODEL_FILE
    if not state_path.is_file():
        raise ExportError(f"{folder}: no {CHECKPOINT_FILE}: not a checkpoint folder, or its job has not finished "
                          f"a round yet")
    try:
        state = read_state(state_path)
    except ValueError as error:
        raise ExportError(str(error)) from None
    if not model_path.is_file():
        raise ExportError(f"{folder}: no {MODEL_FILE} beside {CHECKPOINT_FILE} (fedge serve and fedge simulate write "
                          f"it when they start): run the job again with this fedge (it resumes), or copy the job's "
                          f"trainable .tflite there as {MODEL_FILE}")
    try:
        artifact = Artifact.from_file(model_path)
    except (OSError, ArtifactError) as error:
        raise ExportError(f"{model_path}: {error}") from None
    try:
        weights = state.global_model_weights.for_manifest(artifact.manifest).to_list()
    except ValueError as error:
        raise ExportError(f"{state_path} does not hold the weights of {model_path}: {error}") from None
    keras_path = folder / KERAS_MODEL_FILE
    return SavedCheckpoint(folder, state.round_num, weights, artifact, keras_path if keras_path.is_file() else None)


def export_checkpoint(folder: Path, output: Path) -> Exported:
    """Write the trained model of the checkpoint in `folder` to `output` (.keras or .tflite, by its suffix);
    TensorFlow is imported only for a Keras model."""
    if output.suffix not in OUTPUT_SUFFIXES:
        raise ExportError(f"{output}: unknown output suffix {output.suffix or '(none)'!r}: expected "
                          f"{' or '.join(OUTPUT_SUFFIXES)}")
    checkpoint = read_checkpoint(folder)
    if output.exists() and any(output.samefile(path) for path in (folder / CHECKPOINT_FILE, folder / MODEL_FILE,
                                                                     folder / KERAS_MODEL_FILE) if path.exists()):
        raise ExportError(f"{output} is one of the checkpoint's own files: export to another path")
    if checkpoint.keras_path is not None:
        keras_model = _trained_keras_model(checkpoint)
        if output.suffix == ".keras":
            path, kind = _written(save_keras_model, keras_model, output), "Keras model"
        else:
            model_bytes = _inference_tflite_of(keras_model, checkpoint.keras_path)
            _check_predictions(checkpoint, _tflite_predictions(model_bytes, _probe(checkpoint.artifact.manifest)),
                               "the inference .tflite")
            path, kind = _written(_write_bytes, model_bytes, output), "inference .tflite, builtin ops"
    elif output.suffix == ".keras":
        raise ExportError(f"{folder}: no {KERAS_MODEL_FILE}: the job's model was not a Keras model, so only a "
                          f".tflite can be exported (-o {output.with_suffix('.tflite')})")
    else:
        try:
            model_bytes = trained_artifact(checkpoint.artifact, checkpoint.weights)
        except ValueError as error:
            raise ExportError(f"{folder / MODEL_FILE}: cannot give it the trained weights ({error}); load it in "
                              f"Python and set them instead (fedge.learning.load_state, TrainableModel.set_weights)"
                              ) from None
        path = _written(_write_bytes, model_bytes, output)
        kind = "trainable .tflite with the trained weights; its forward signature predicts"
    return Exported(path, kind, checkpoint.round_num, path.stat().st_size)


def save_keras_model(keras_model: Any, path: Path) -> Path:
    """Save a Keras model (with whatever weights it holds) to a `.keras` file, replaced atomically (Keras saves
    only to a path named .keras: a temporary one, then the bytes are moved in whole)."""
    with tempfile.TemporaryDirectory(prefix="fedge-keras-") as folder:
        saved = Path(folder) / "model.keras"
        keras_model.save(saved)
        return _write_bytes(saved.read_bytes(), path)


def inference_tflite(keras_model: Any) -> bytes:
    """A plain inference `.tflite` of a Keras model (builtin ops only, no training signatures); imports TensorFlow."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its SavedModel's endpoints
        return converter.convert()


def save_inference_tflite(keras_model: Any, path: Path) -> Path:
    """Write inference_tflite(keras_model) to `path`, replaced atomically."""
    return _write_bytes(inference_tflite(keras_model), path)


def _write_bytes(model_bytes: bytes, path: Path) -> Path:
    """Replace `path` atomically with `model_bytes`."""
    return replace_atomically(path, lambda file: file.write(model_bytes))


def _written(save: Callable[[Any, Path], Path], model: Any, output: Path) -> Path:
    """`save(model, output)`, an unwritable output reported as an ExportError."""
    try:
        return save(model, output)
    except OSError as error:
        raise ExportError(f"cannot write {output}: {error.strerror or error}") from None


def _trained_keras_model(checkpoint: SavedCheckpoint) -> Any:
    """The checkpoint's Keras model with the trained weights, checked to predict as the trainable artifact does."""
    path = checkpoint.keras_path
    try:
        import keras
    except ImportError:
        raise ExportError(f"{path}: exporting a Keras model's checkpoint needs TensorFlow and Keras (pip install "
                          f"'fedge[desktop]')") from None
    try:
        keras_model = keras.models.load_model(path, compile=False)
    except Exception as error:  # Keras raises ValueError, OSError, zipfile errors... for a file that is no model
        raise ExportError(f"{path}: not a loadable Keras model ({type(error).__name__}: {error})") from None
    try:
        keras_model.set_weights(checkpoint.weights)
    except ValueError as error:
        raise ExportError(f"{checkpoint.folder / CHECKPOINT_FILE}: its weights do not fit {path}: {error}") from None
    probe = _probe(checkpoint.artifact.manifest)
    _check_predictions(checkpoint, np.asarray(keras_model.predict_on_batch(probe)), str(path))
    return keras_model


def _inference_tflite_of(keras_model: Any, path: Path) -> bytes:
    """inference_tflite(keras_model), a converter's refusal reported as an ExportError naming the model file."""
    try:
        return inference_tflite(keras_model)
    except Exception as error:  # the TFLite converter raises its own errors, whose first line says why
        raise ExportError(f"{path}: the TFLite converter refused its inference model ({type(error).__name__}: "
                          f"{str(error).strip().splitlines()[0][:300]})") from None


def _probe(manifest: Manifest) -> np.ndarray:
    """One batch of inputs the model takes (random floats; zeros for integer inputs such as token ids)."""
    shape, dtype = (manifest.batch_size, *manifest.input.shape), np.dtype(manifest.input.dtype)
    if np.issubdtype(dtype, np.floating):
        return np.random.default_rng(0).normal(size=shape).astype(dtype)
    return np.zeros(shape, dtype)


def _check_predictions(checkpoint: SavedCheckpoint, predictions: np.ndarray, what: str) -> None:
    """ExportError unless `predictions` of the probe batch are the trained trainable artifact's."""
    from device_runtime.model import TrainableModel

    model = TrainableModel(checkpoint.artifact.tflite_bytes, num_threads=1)
    model.set_weights(checkpoint.weights)
    expected = model.predict(_probe(checkpoint.artifact.manifest))
    if predictions.shape != expected.shape or not np.allclose(predictions, expected, rtol=_RTOL, atol=_ATOL):
        worst = np.max(np.abs(predictions - expected)) if predictions.shape == expected.shape else predictions.shape
        raise ExportError(f"{what} does not predict as {checkpoint.folder / MODEL_FILE} with the trained weights "
                          f"(largest difference {worst}): it is not the model this checkpoint trained")


def _tflite_predictions(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """The outputs of an inference `.tflite` (one input, one output) for the rows of `x`."""
    from device_runtime.interpreter import load_interpreter

    runner = load_interpreter(model_bytes, num_threads=1).get_signature_runner()
    (name,) = runner.get_input_details()
    return next(iter(runner(**{name: x}).values()))


def trained_artifact(artifact: Artifact, weights: Sequence[np.ndarray]) -> bytes:
    """The trainable artifact with `weights` as its initial weights (and FedProx anchors), its content hash
    recomputed; checked by loading it: get_weights() must give `weights` (ValueError otherwise). Needs no TensorFlow.

    The initial values are the constants the artifact's init subgraph assigns to its variables. The converter
    shares equal constants (a zero bias with a zero optimizer slot), so each weight gets a constant of its own
    rather than being written over one in place."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    from device_runtime.model import TrainableModel

    model = schema.ModelT.InitFromPackedBuf(bytearray(artifact.tflite_bytes), 0)
    opnames = _operator_names(model, schema)
    try:
        init = model.subgraphs[_init_subgraph(model, opnames)]
        assignments = _initial_assignments(init, opnames)
        for names, value in zip(_weight_variables(model, artifact.manifest, opnames), weights, strict=True):
            _set_initial_value(model, init, [assignments[name] for name in names], value)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as error:  # not the graph fedge converts
        raise ValueError(f"its weights' initial values are not where fedge's converter puts them: "
                         f"{type(error).__name__}: {error}") from None
    _drop_unused_buffers(model)
    builder = flatbuffers.Builder(len(artifact.tflite_bytes) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    packed = bytes(builder.Output())
    trained = packed.replace(read_manifest(packed).content_hash.encode(), content_digest(packed).encode(), 1)
    loaded = TrainableModel(trained, num_threads=1).get_weights()
    if not all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(loaded, weights, strict=True)):
        raise ValueError("with the trained weights written in, its get_weights does not return them")
    return trained


def _operator_names(model: Any, schema: Any) -> list[str]:
    """The builtin operator name of each operator code of `model`."""
    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    return [names[max(code.builtinCode, code.deprecatedBuiltinCode)] for code in model.operatorCodes]


def _init_subgraph(model: Any, opnames: list[str]) -> int:
    """The index of the subgraph that initializes the variables (the one every signature's CALL_ONCE runs)."""
    (index,) = {op.builtinOptions.initSubgraphIndex for subgraph in model.subgraphs for op in subgraph.operators
                if opnames[op.opcodeIndex] == "CALL_ONCE"}
    return index


def _initial_assignments(init: Any, opnames: list[str]) -> dict[str, Any]:
    """Variable name -> the ASSIGN_VARIABLE operator of the init subgraph that gives it its initial value."""
    handles = {op.outputs[0]: op.builtinOptions.sharedName.decode() for op in init.operators
               if opnames[op.opcodeIndex] == "VAR_HANDLE"}
    return {handles[op.inputs[0]]: op for op in init.operators if opnames[op.opcodeIndex] == "ASSIGN_VARIABLE"}


def _weight_variables(model: Any, manifest: Manifest, opnames: list[str]) -> list[tuple[str, ...]]:
    """For each weight (manifest order), the resource variables that start with its value: the one get_weights
    reads and, with FedProx, its anchor (the converter's `anchor_<index>`)."""
    (signature,) = [s for s in model.signatureDefs if s.signatureKey == b"get_weights"]
    subgraph = model.subgraphs[signature.subgraphIndex]
    producers = {output: op for op in subgraph.operators for output in op.outputs}
    outputs = {tensor.name.decode(): tensor.tensorIndex for tensor in signature.outputs}
    variables = []
    for index, spec in enumerate(manifest.weights):
        read = producers[outputs[spec.key]]
        handle = producers[read.inputs[0]]
        if (opnames[read.opcodeIndex], opnames[handle.opcodeIndex]) != ("READ_VARIABLE", "VAR_HANDLE"):
            raise ValueError(f"get_weights output {spec.key} is not read from a variable")
        anchor = (f"anchor_{index:03d}",) if manifest.proximal and spec.trainable else ()
        variables.append((handle.builtinOptions.sharedName.decode(), *anchor))
    return variables


def _set_initial_value(model: Any, init: Any, assignments: list[Any], value: np.ndarray) -> None:
    """Make the value each of `assignments` assigns a constant holding `value`, in a new buffer: a tensor only
    they read points to it, a tensor others read too is left to them and the assignments get a copy."""
    from ai_edge_litert import schema_py_generated as schema

    buffer = schema.BufferT()
    buffer.data = np.frombuffer(np.ascontiguousarray(value).tobytes(), dtype=np.uint8)
    model.buffers.append(buffer)
    readers = Counter(int(index) for op in init.operators for index in op.inputs)
    readers.update(int(index) for index in (init.outputs if init.outputs is not None else ()))
    for tensor_index in {int(op.inputs[1]) for op in assignments}:
        ours = [op for op in assignments if op.inputs[1] == tensor_index]
        tensor = init.tensors[tensor_index]
        if tuple(() if tensor.shape is None else tensor.shape) != value.shape:
            raise ValueError(f"initial value {tensor.name!r} has shape {tensor.shape}, the weight {value.shape}")
        if readers[tensor_index] > len(ours):
            tensor = copy.copy(tensor)
            init.tensors.append(tensor)
            for op in ours:
                op.inputs[1] = len(init.tensors) - 1
        tensor.buffer = len(model.buffers) - 1


def _drop_unused_buffers(model: Any) -> None:
    """Empty the buffers no tensor or metadata entry refers to any more (the replaced initial values)."""
    used = {tensor.buffer for subgraph in model.subgraphs for tensor in subgraph.tensors}
    used |= {entry.buffer for entry in model.metadata or []}
    used |= set(() if model.metadataBuffer is None else model.metadataBuffer)
    for index, buffer in enumerate(model.buffers):
        if index not in used:
            buffer.data = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`fedge export`'s arguments."""
    parser.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR",
                        help="a checkpoint folder of fedge serve (output.checkpoints, --checkpoint-dir) or fedge "
                             "simulate (<report>/checkpoints)")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="model.keras (the Keras model with the trained weights) or model.tflite (a plain "
                             "inference .tflite; the trainable artifact with the trained weights when the job's "
                             "model was not a Keras model)")


def export_command(args: argparse.Namespace) -> int:
    """Export the checkpoint's trained model; 0 with one line saying what was written, 2 with one error line."""
    try:
        exported = export_checkpoint(Path(args.checkpoint_dir), Path(args.output))
    except ExportError as error:
        print_errors("fedge export", error)
        return 2
    print(f"wrote {exported.path} ({exported.kind}): the trained model after {exported.round_num} rounds of "
          f"{args.checkpoint_dir}, {exported.size:,} bytes")
    return 0
