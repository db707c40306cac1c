"""tfhfp8: exact emulation of 8- and 16-bit number formats for TensorFlow and Keras 3."""

from tfhfp8 import formats, ops
from tfhfp8.formats import DynamicFixedPoint, FloatFormat
from tfhfp8.quantization import quantize

__version__ = "0.1.0"
