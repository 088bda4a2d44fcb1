"""Lower a custom fedge Model (variables and forward_pass written in TensorFlow) to the trainable artifact.

The artifact is the one a Keras model gets (docs/artifact.md: same signatures, manifest and
content hash), built from the same pieces: ArtifactModule's shared signatures, the
optimizer state, `package_artifact`. Gradients come from tf.GradientTape over the model's
`forward_pass`, so the builtin-only check decides what converts: a forward pass whose
gradient needs a TF kernel without a TFLite builtin (tf.nn.relu -> ReluGrad,
tf.nn.sparse_softmax_cross_entropy_with_logits, ...) is refused with a ConversionError
naming the ops. `forward_pass` gets {"x", "y", "mask"}; a loss that ignores `mask`
trains on the zero padding rows of a partial batch.

The model is duck-typed (fedge.learning.Model's interface) because converters never import fedge.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from converters.convert import check_batch_size, package_artifact
from converters.errors import ConversionError
from converters.module import ArtifactModule
from converters.optimizers import optimizer_config
from device_runtime.artifact import Artifact

_FINALIZER_ARITY = {"divide": 2, "identity": 1}


class CustomModule(ArtifactModule):
    """A custom Model's own variables, trained by its forward_pass under a gradient tape."""

    autograph = True  # user code may branch on tensors

    def __init__(self, model: Any, optimizer: dict[str, Any], x_spec: tf.TensorSpec, y_spec: tf.TensorSpec,
                 proximal: bool, metric_names: list[str]):
        trainable, frozen = list(model.trainable_variables), list(model.non_trainable_variables)
        super().__init__(trainable + frozen, [True] * len(trainable) + [False] * len(frozen),
                         optimizer, x_spec, y_spec, proximal)
        self.local_metric_variables = list(model.local_variables)  # tracked, so the SavedModel holds them
        self._model = model
        self._metric_names = metric_names

    @property
    def metric_names(self) -> list[str]:
        return list(self._metric_names)

    def _train(self, x, y, mask):
        weights = [variable.read_value() for variable in self.model_weights]
        trainable = [self.model_weights[i] for i in self.trainable_indices]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(trainable)
            output = self._model.forward_pass({"x": x, "y": y, "mask": mask}, training=True)
        grads = tape.gradient(output.loss, trainable)
        self.apply_gradients(weights, {i: tf.convert_to_tensor(grad)
                                       for i, grad in zip(self.trainable_indices, grads) if grad is not None})
        return {"loss": tf.cast(output.loss, tf.float32)}

    def _evaluate(self, x, y, mask):
        output = self._model.forward_pass({"x": x, "y": y, "mask": mask}, training=False)
        return {"loss": tf.cast(output.loss, tf.float32)}

    def _predict(self, x):
        return {"output": self._model.predict_on_batch(x, training=False)}

    def metric_values(self) -> dict[str, tf.Tensor]:
        report = self._model.report_local_unfinalized_metrics()
        return {name: tf.cast(report[name], tf.float32) for name in self._metric_names}

    def zero_metrics(self) -> None:
        self._model.reset_metrics()


def _fixed_specs(model: Any, batch_size: int) -> tuple[tf.TensorSpec, tf.TensorSpec]:
    """The model's (x, y) input_spec with the batch dimension fixed to `batch_size`."""
    input_spec = model.input_spec
    if not (isinstance(input_spec, (tuple, list)) and len(input_spec) == 2
            and all(isinstance(spec, tf.TensorSpec) for spec in input_spec)):
        raise ConversionError(f"input_spec must be an (x, y) pair of tf.TensorSpec, got {input_spec!r}")
    fixed = []
    for spec, name in zip(input_spec, ("x", "y")):
        shape = spec.shape
        if shape.rank is None or shape.rank < 1 or not shape[1:].is_fully_defined():
            raise ConversionError(f"input_spec {name} {spec} needs a batch dimension and a fully known "
                                  "per-example shape")
        if shape[0] is not None and shape[0] != batch_size:
            raise ConversionError(f"input_spec {name} has batch dimension {shape[0]}, but the artifact's "
                                  f"batch_size is {batch_size}")
        fixed.append(tf.TensorSpec([batch_size, *shape[1:]], spec.dtype, name=name))
    return fixed[0], fixed[1]


def _check_variables(model: Any) -> None:
    """Every weight a float32 variable, listed once, at least one of them trainable."""
    trainable, frozen = list(model.trainable_variables), list(model.non_trainable_variables)
    if not trainable:
        raise ConversionError("the model has no trainable_variables")
    seen: set[int] = set()
    for variable in trainable + frozen:
        if not isinstance(variable, tf.Variable) or variable.dtype != tf.float32:
            raise ConversionError(f"model weights must be float32 tf.Variables, got {variable!r}")
        if id(variable) in seen:
            raise ConversionError(f"variable '{variable.name}' is listed twice among the model's weights")
        seen.add(id(variable))


def _metric_names(model: Any) -> list[str]:
    """Names of the model's unfinalized metrics, each of which must be a scalar."""
    report = model.report_local_unfinalized_metrics()
    for name, value in report.items():
        if not isinstance(name, str) or tf.convert_to_tensor(value).shape.rank != 0:
            raise ConversionError(f"report_local_unfinalized_metrics() must map names to scalars; "
                                  f"{name!r} is {value!r}")
    return list(report)


def _checked_finalizers(finalizers: Any, metric_names: list[str]) -> dict[str, list[str]]:
    """The model's metric_finalizers() as manifest entries: ["divide", a, b] or ["identity", a]."""
    if not isinstance(finalizers, dict):
        raise ConversionError(f"metric_finalizers() must return a dict, got {finalizers!r}")
    checked = {}
    for metric, spec in finalizers.items():
        op, *args = list(spec) if isinstance(spec, (list, tuple)) and spec else [None]
        if _FINALIZER_ARITY.get(op) != len(args) or any(arg not in metric_names for arg in args):
            raise ConversionError(f"metric {metric!r}: finalizer {spec!r} must be ['divide', numerator, "
                                  f"denominator] or ['identity', name] over the reported metrics {metric_names}")
        checked[str(metric)] = [op, *args]
    return checked


def _check_traced(module: CustomModule) -> None:
    """Trace the data signatures and check what the device runtime relies on: scalar losses, float32 outputs."""
    for name in ("train", "evaluate"):
        loss = module.signature_functions[name].get_concrete_function().structured_outputs["loss"]
        if loss.shape.rank != 0:
            raise ConversionError(f"forward_pass must return a scalar loss, got shape {loss.shape} ({name})")
    output = module.signature_functions["forward"].get_concrete_function().structured_outputs["output"]
    if output.dtype != tf.float32 or not output.shape.is_fully_defined() or output.shape[0] != module.x_spec.shape[0]:
        raise ConversionError(f"predict_on_batch must return float32 [batch, ...] predictions of a known "
                              f"shape, got {output.dtype.name} {output.shape}")


def convert_custom_model(model: Any, *, optimizer: Any, batch_size: int, proximal: bool = False,
                         model_name: str | None = None) -> Artifact:
    """Lower a custom fedge Model to the builtin-only trainable artifact of docs/artifact.md.

    The weights are the model's trainable_variables then non_trainable_variables; the
    metrics are its report_local_unfinalized_metrics() finalized by metric_finalizers().
    The model's variables keep their values: the artifact starts from the current weights
    and from zero metrics.
    """
    check_batch_size(batch_size)
    optimizer_entry = optimizer_config(optimizer)
    x_spec, y_spec = _fixed_specs(model, batch_size)
    _check_variables(model)
    metric_names = _metric_names(model)
    finalizers = _checked_finalizers(model.metric_finalizers(), metric_names)
    module = CustomModule(model, optimizer_entry, x_spec, y_spec, proximal, metric_names)
    _check_traced(module)
    metric_values = [variable.numpy() for variable in model.local_variables]
    model.reset_metrics()  # the SavedModel captures variable values: start the artifact's metrics at zero
    try:
        return package_artifact(module, model_name=model_name or type(model).__name__,
                                weight_names=[variable.name.split(":")[0] for variable in module.model_weights],
                                loss={"name": "custom"}, finalizers=finalizers)
    finally:
        for variable, value in zip(model.local_variables, metric_values):
            variable.assign(value)
