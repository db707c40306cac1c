"""The C++ CPU kernels, behind the same two functions as `tf_backend`."""

import tensorflow as tf

from tfhfp8.ops import build

_library = None


def load():
    """Loads the kernel library once (building it if needed); raises BuildError."""
    global _library
    if _library is None:
        _library = tf.load_op_library(str(build.library_path()))
    return _library


def quantize_float(x, fmt, rounding, saturate, seed):
    return load().hfp8_quantize_float(
        x, seed, exponent_bits=fmt.exponent_bits, mantissa_bits=fmt.mantissa_bits,
        bias=fmt.bias, specials=fmt.specials, subnormals=bool(fmt.subnormals),
        rounding=rounding, saturate=saturate)


def quantize_fixed(x, exponent, inner, bits, rounding, saturate, seed):
    return load().hfp8_quantize_fixed(
        x, exponent, inner, seed, bits=bits, rounding=rounding, saturate=saturate)
