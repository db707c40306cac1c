"""The C++ CPU kernels, behind the same functions as `tf_backend`."""

import tensorflow as tf

from tfhfp8 import formats
from tfhfp8.formats import roundings
from tfhfp8.ops import build, tf_backend, tf_block

_library = None


def load():
    """Loads the kernel library once (building it if needed); raises BuildError."""
    global _library
    if _library is None:
        _library = tf.load_op_library(str(build.library_path()))
    return _library


def quantize_float(x, fmt, rounding, saturate, seed):
    """`rounding` any name of `tfhfp8.formats.roundings`, `saturate` False, True or
    "sat_propagate" (the arguments of `tf_backend.quantize_float`)."""
    return load().hfp8_quantize_float(
        x, seed, exponent_bits=fmt.exponent_bits, mantissa_bits=fmt.mantissa_bits,
        bias=fmt.bias, specials=fmt.specials, subnormals=bool(fmt.subnormals),
        signed=bool(fmt.signed), **_rounding_attrs(rounding), saturate=bool(saturate),
        propagate_inf=saturate == "sat_propagate")


def _rounding_attrs(rounding):
    """The ops' `rounding` and `random_bits` attributes for a rounding name: the r-bit
    roundings are `<variant>_bits` with `random_bits` r."""
    parsed = roundings.parse(rounding)
    if parsed.random_bits is None:
        return {"rounding": parsed.mode, "random_bits": 0}
    return {"rounding": parsed.mode + "_bits", "random_bits": parsed.random_bits}


def quantize_fixed(x, exponent, inner, bits, rounding, saturate, seed):
    return load().hfp8_quantize_fixed(
        x, exponent, inner, seed, bits=bits, **_rounding_attrs(rounding), saturate=saturate)


def quantize_dfp(x, fmt, rounding, saturate, seed):
    """Dynamic fixed point; per tensor, the shared exponent is found in the same kernel."""
    if fmt.axis is None:
        y, _ = load().hfp8_quantize_dfp(x, seed, bits=fmt.bits, **_rounding_attrs(rounding),
                                        saturate=saturate)
        return y
    exponent, inner = tf_backend.shared_exponents(x, fmt, rounding)
    return quantize_fixed(x, exponent, inner, fmt.bits, rounding, saturate, seed)


def quantize_block(x, fmt, rounding, saturate, seed):
    """Block-scaled rounding (`fmt` a BlockScaled): per block the amax, the scale and the
    element rounding in one kernel; the same bits as `tf_block.quantize_block`. 2D tiles
    (`block_shape`) have no kernel: they run as `tf_block.quantize_block`."""
    if fmt.tiles:
        return tf_block.quantize_block(x, fmt, rounding, saturate, seed)
    # The same errors as the TF-ops path, before the kernel.
    tf_block.block_axis_layout(x, fmt.axis)
    element = fmt.element
    attrs = dict(
        axis=fmt.axis, block_size=fmt.block_size,
        element_exponent_bits=element.exponent_bits,
        element_mantissa_bits=element.mantissa_bits, element_bias=element.bias,
        element_specials=element.specials, element_subnormals=bool(element.subnormals),
        element_signed=bool(element.signed),
        scale="e8m0" if fmt.power_of_two_scale else "float",
        scale_rounding=fmt.scale_rounding, tensor_scale=fmt.tensor_scale,
        **_rounding_attrs(rounding), saturate=saturate)
    if not fmt.power_of_two_scale:
        attrs.update(scale_exponent_bits=fmt.scale.exponent_bits,
                     scale_mantissa_bits=fmt.scale.mantissa_bits, scale_bias=fmt.scale.bias,
                     scale_specials=fmt.scale.specials,
                     scale_subnormals=bool(fmt.scale.subnormals),
                     scale_signed=bool(fmt.scale.signed))
    return load().hfp8_quantize_block(x, seed, **attrs)


def cpu_variant():
    """(the CPU variant of the loops that runs now, those this CPU supports)."""
    with tf.init_scope():  # eagerly, also when asked inside a tf.function
        active, supported = load().hfp8_cpu_variant()
    return active.numpy().decode(), supported.numpy().decode().split()


def _format_attrs(fmt, prefix=""):
    return {prefix + "exponent_bits": fmt.exponent_bits,
            prefix + "mantissa_bits": fmt.mantissa_bits, prefix + "bias": fmt.bias,
            prefix + "specials": fmt.specials, prefix + "subnormals": bool(fmt.subnormals)}


def accumulating_matmul(a, b, fmt, outer_format, products, rounding, saturate, chunk_size,
                        seed):
    """`a @ b` for float32 `a` [batch, M, K] and `b` [batch, K, N], summed in the float
    format `fmt` (the definition is `tfhfp8.Accumulator`'s docstring): chunks of
    `chunk_size` products (None: one chunk) added up in `outer_format` (None: `fmt`),
    the products rounded to `products` first (None: exact), with `rounding` (one of
    `tfhfp8.formats.roundings.BASIC_ROUNDINGS`), `saturate`, and the stochastic
    roundings' `seed` (int64 scalar).

    Returns (c [batch, M, N] float32, swamped: the int64 number of additions of a
    nonzero term that left the running sum unchanged).
    """
    outer_format = fmt if outer_format is None else outer_format
    for name, value in (("fmt", fmt), ("outer_format", outer_format),
                        ("products", products)):
        if not isinstance(value, formats.FloatFormat) and (value is not None or name == "fmt"):
            raise ValueError(f"{name} must be a FloatFormat (a float accumulator's format), "
                             f"got {value!r}")
    attrs = {**_format_attrs(fmt), **_format_attrs(outer_format, "outer_"),
             **_format_attrs(products or fmt, "products_")}
    return load().hfp8_accumulating_matmul(
        a, b, tf.cast(seed, tf.int64), has_products=products is not None,
        rounding=rounding, saturate=saturate, chunk_size=chunk_size or 0, **attrs)


def fused_matmul(a, b, a_min_exponent, b_min_exponent, group_size, fraction_bits,
                 output_bits, output_min_exponent, output_rounding, chunk_size,
                 a_block_emax=None, b_block_emax=None, block_size=None,
                 partial_sum_size=None):
    """A matrix unit's fused dot-adds of float32 `a` [batch, M, K] and `b` [batch, K, N]:
    the arguments and results of `tfhfp8.ops.tf_fused.fused_matmul`, bit for bit."""
    return load().hfp8_fused_matmul(
        a, b, a_min_exponent=a_min_exponent, b_min_exponent=b_min_exponent,
        group_size=group_size, fraction_bits=fraction_bits, output_bits=output_bits,
        output_min_exponent=output_min_exponent, output_rounding=output_rounding,
        chunk_size=chunk_size, a_blocked=a_block_emax is not None,
        a_block_emax=a_block_emax or 0, b_blocked=b_block_emax is not None,
        b_block_emax=b_block_emax or 0, block_size=block_size or 0,
        partial_sum_size=partial_sum_size or 0)


def int32_matmul(a_mantissas, b_mantissas, chunk_size, overflow):
    """INT32 accumulation of integer mantissas, int32 `a_mantissas` [batch, M, K] and
    `b_mantissas` [batch, K, N] (see `tfhfp8.Accumulator("int32")`): `chunk_size` None
    or n (the partial sum goes into a float32 total every n products), `overflow`
    "wrap" or "saturate".

    Returns (c [batch, M, N] float32, overflows: int64 count).
    """
    return load().hfp8_int32_matmul(a_mantissas, b_mantissas, chunk_size=chunk_size or 0,
                                    overflow=overflow)
