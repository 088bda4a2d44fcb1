"""Lower Keras models to one `.tflite` file that trains on a device with builtin ops only."""

from converters.convert import ConversionResult, convert_keras_model
from converters.errors import ConversionError, UnsupportedLayerError
from converters.layers import SUPPORTED_LAYERS

__all__ = ["ConversionError", "ConversionResult", "SUPPORTED_LAYERS", "UnsupportedLayerError",
           "convert_keras_model"]
