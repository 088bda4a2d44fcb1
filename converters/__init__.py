"""Lower Keras models and custom fedge Models to one `.tflite` that trains with builtin ops only."""

from converters.convert import convert_keras_model
from converters.custom import convert_custom_model
from converters.errors import ConversionError, UnsupportedLayerError
from converters.layers import SUPPORTED_LAYERS

__all__ = ["ConversionError", "SUPPORTED_LAYERS", "UnsupportedLayerError", "convert_custom_model", "convert_keras_model"]
