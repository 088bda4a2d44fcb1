"""Errors the converter raises before or after handing a model to TensorFlow Lite."""


class ConversionError(ValueError):
    """The model, loss or optimizer cannot be lowered to a builtin-only trainable artifact."""


class UnsupportedLayerError(ConversionError):
    """A layer (or a layer option) has no builtin-op lowering yet."""
