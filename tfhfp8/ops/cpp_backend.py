"""The C++ CPU kernels, behind the same functions as `tf_backend`."""

import tensorflow as tf

from tfhfp8.ops import build, tf_backend

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


def quantize_dfp(x, fmt, rounding, saturate, seed):
    """Dynamic fixed point; per tensor, the shared exponent is found in the same kernel."""
    if fmt.axis is None:
        y, _ = load().hfp8_quantize_dfp(x, seed, bits=fmt.bits, rounding=rounding,
                                        saturate=saturate)
        return y
    exponent, inner = tf_backend.shared_exponents(x, fmt, rounding)
    return quantize_fixed(x, exponent, inner, fmt.bits, rounding, saturate, seed)


def cpu_variant():
    """(the CPU variant of the loops that runs now, those this CPU supports)."""
    with tf.init_scope():  # eagerly, also when asked inside a tf.function
        active, supported = load().hfp8_cpu_variant()
    return active.numpy().decode(), supported.numpy().decode().split()
