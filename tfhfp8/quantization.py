"""`quantize`: round a tensor to the values of a number format."""

import dataclasses
import numbers

import numpy as np
import tensorflow as tf

from tfhfp8 import _compat, block_formats, formats, ops
from tfhfp8.formats import roundings
from tfhfp8.ops import tf_block, tf_fp32_scales

GRADIENTS = ("straight_through", "zero_overflow")
_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def quantize(x, fmt, rounding="nearest_even", saturate=False, seed=None,
             gradient="straight_through", scale=None, random_bits=None, noise=None):
    """Returns `x` rounded to the nearest values of `fmt`, same shape and dtype.

    Args:
      x: a float16, bfloat16, float32 or float64 tensor (or anything
        `tf.convert_to_tensor` turns into one).
      fmt: a format name (`tfhfp8.formats.names()`), `FloatFormat`,
        `DynamicFixedPoint` or `BlockScaled` (blocks along the format's `axis`, each
        with its own scale; see `tfhfp8.block_formats`).
      rounding: a name of `tfhfp8.formats.roundings`: `"nearest_even"`,
        `"nearest_away"`, `"toward_zero"`, `"toward_positive"`, `"toward_negative"`,
        `"stochastic"`, or `"stochastic_r8"` and the like (r random bits); every
        format takes each.
      saturate: False (or `"ovf_inf"`) follows the format's own cast semantics exactly
        like `x.astype(ml_dtypes.<fmt>).astype(x.dtype)` (overflow to inf, to NaN, or
        saturation; fnuz turns -0 into +0). True (or `"sat_finite"`) clamps overflow,
        infinities included, to +-max and keeps NaN as NaN (what training uses).
        `"sat_propagate"` clamps finite overflow and keeps infinities (P3109's three
        behaviours). Block-scaled formats always saturate their elements (OCP MX);
        there False makes a block holding an infinity all NaN, True counts the
        infinity as the largest float.
      seed: for stochastic rounding, an integer (Python or NumPy) or an integer
        scalar tensor (another type is a TypeError, another shape a ValueError); the same
        seed gives the same bits on every backend and thread count. None draws a
        fresh seed from TF's random state at every call (works in `tf.function`).
      gradient: `"straight_through"` passes the gradient unchanged;
        `"zero_overflow"` zeroes it where `|x|` exceeds the format's max.
      scale: per-tensor scaled formats only (`BlockScaled(..., block_size=None)`):
        the float32 scale to use (delayed scaling: the one computed from an amax
        history), finite and at least 2^-126 (a normal float32: TF's CPU flushes
        smaller ones to 0); a known value outside that range is a ValueError, a traced
        one an InvalidArgumentError when it runs. None uses the scale of `x`'s own
        amax (current scaling).
      random_bits: 1..23 random bits per element for `rounding` `"stochastic"`,
        `"stochastic_odd"` or `"stochastic_fast"` (as `rounding="stochastic_r<r>"`).
      noise: the r random bits themselves (r-bit roundings, every format): an integer
        tensor of `x`'s shape with values in [0, 2^r), gfloat's `srbits`, one per
        element instead of the hash of `seed`; rounded by the TF-ops backend.

    Example:

    >>> import tensorflow as tf, tfhfp8
    >>> tfhfp8.quantize(tf.constant([1.0, 0.1, 1000.0]), "hfp8_fwd", saturate=True)
    <tf.Tensor: shape=(3,), dtype=float32, numpy=array([ 1.       ,  0.1015625, 30.       ], dtype=float32)>
    """
    fmt = formats.get(fmt)
    if random_bits is not None:
        rounding = roundings.with_random_bits(rounding, random_bits)
    saturate = check_rounding_and_saturate(rounding, saturate)
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    x = as_float_tensor(x)
    if scale is not None:
        if not (isinstance(fmt, block_formats.BlockScaled) and fmt.per_tensor):
            raise ValueError(f"scale is for per-tensor scaled formats (BlockScaled with "
                             f"block_size=None) only, not {fmt!r}")
        scale = _checked_scale(scale)
    noise = None if noise is None else _checked_noise(noise, x, rounding)
    seed = _seed_of_the_draws(seed, rounding, noise)

    def grad(dy):
        if gradient == "zero_overflow" and isinstance(fmt, formats.FloatFormat):
            return tf.where(tf.abs(x) <= tf.cast(fmt.max, x.dtype), dy, tf.zeros_like(dy))
        return dy

    @tf.custom_gradient
    def _quantize(x):
        # stop_gradient keeps forward-mode differentiation out of the rounding's ops (no
        # gradient for the C++ kernels, zero for the TF ops); the straight-through
        # tangent is recorded here, before tf.custom_gradient (in a traced function an
        # accumulator ignores the custom gradient and keeps the first tangent it gets).
        y = _round(tf.stop_gradient(x), fmt, rounding, saturate, seed, scale, noise)
        _compat.record_forward_gradient("Hfp8Quantize", [y], [x], lambda dy: [grad(dy)])
        return y, grad

    return _quantize(x)


def _seed_of_the_draws(seed, rounding, noise):
    """The int64 seed tensor of a stochastic rounding that draws its own bits; a zero
    otherwise, after checking `seed` all the same (a bad seed is a bug wherever it is
    passed)."""
    if roundings.is_stochastic(rounding) and noise is None:
        return seed_tensor(seed)
    if seed is not None:
        seed_tensor(seed)
    return tf.zeros([], tf.int64)


def quantize_gradient(x, fmt, rounding="nearest_even", saturate=True, seed=None):
    """Identity in the forward pass; rounds the gradient flowing back through it.

    `quantize(x)` rounds values and passes gradients through; `quantize_gradient(x)`
    does the opposite. Placed on a GEMM's output it quantizes the errors `dy`; placed
    on a weight it quantizes the weight gradient. Arguments as in `quantize`; with
    `seed=None` a fresh seed is drawn in every backward pass.

    >>> import tensorflow as tf, tfhfp8
    >>> w = tf.Variable([1.0])
    >>> with tf.GradientTape() as tape:
    ...     y = tfhfp8.quantize_gradient(w, "float8_e5m2") * 0.3
    >>> float(tape.gradient(y, w)[0])
    0.3125
    """
    fmt = formats.get(fmt)
    # Bad arguments are errors now, not in the backward pass.
    check_rounding_and_saturate(rounding, saturate)
    if seed is not None:
        seed_tensor(seed)

    @tf.custom_gradient
    def _identity(x):
        def grad(dy):
            return quantize(dy, fmt, rounding=rounding, saturate=saturate, seed=seed)
        return tf.identity(x), grad

    return _identity(as_float_tensor(x))


def check_rounding_and_saturate(rounding, saturate):
    """`saturate` as the backends take it (`roundings.overflow`), or a ValueError naming
    the argument unless `rounding` is a rounding name (`tfhfp8.formats.roundings`, every
    format takes each) and `saturate` an overflow behaviour: what every quantizer checks
    before it rounds anything."""
    roundings.parse(rounding)
    return roundings.overflow(saturate)


def _checked_noise(noise, x, rounding):
    """The user's random bits as a uint32 tensor of `x`'s shape: a ValueError or
    TypeError naming `noise` unless it fits `x` and `rounding`."""
    parsed = roundings.parse(rounding)
    if parsed.random_bits is None:
        raise ValueError(f"noise is for the stochastic roundings with random_bits (e.g. "
                         f"rounding='stochastic', random_bits=8), not rounding={rounding!r}")
    noise = tf.convert_to_tensor(noise)
    if not noise.dtype.is_integer:
        raise TypeError(f"noise must be an integer tensor, got {noise.dtype.name}")
    if not noise.shape.is_compatible_with(x.shape):
        raise ValueError(f"noise must have x's shape {x.shape}, got {noise.shape}")
    limit = 1 << parsed.random_bits
    value = tf.get_static_value(noise)
    if value is not None and value.size and not (0 <= value.min() and value.max() < limit):
        raise ValueError(f"noise values must be in [0, 2^{parsed.random_bits}) for "
                         f"random_bits={parsed.random_bits}, got [{value.min()}, {value.max()}]")
    noise = tf.cast(noise, tf.int64)
    check = tf.debugging.Assert(
        tf.reduce_all((noise >= 0) & (noise < limit)),
        [f"noise values must be in [0, 2^{parsed.random_bits})"])
    with tf.control_dependencies([check]):
        return tf.cast(noise, tf.uint32)


_SCALE_RANGE = "scale must be a finite float32 of at least 2^-126 (a normal float32)"


def _checked_scale(scale):
    """A delayed scale as a float32 scalar tensor: a ValueError now when its value is
    known and unusable (0, negative, subnormal, inf, NaN), else checked when it runs."""
    scale = tf.convert_to_tensor(scale, tf.float32)
    if scale.shape.rank is not None and scale.shape.rank != 0:
        raise ValueError(f"scale must be a scalar, got shape {scale.shape}")
    value = tf.get_static_value(scale)
    if value is not None:
        if not (np.isfinite(value) and value >= tf_fp32_scales.MIN_SCALE):
            raise ValueError(f"{_SCALE_RANGE}, got {float(value)!r}")
        return scale
    # On the bits: a subnormal reads as 0 in TF's CPU comparisons, NaN compares false.
    bits = tf.bitcast(scale, tf.int32)
    least = tf.bitcast(tf.constant(tf_fp32_scales.MIN_SCALE, tf.float32), tf.int32)
    usable = (bits >= least) & (bits < 0x7F800000)
    check = tf.debugging.Assert(usable, [_SCALE_RANGE + ", got", scale])
    with tf.control_dependencies([check]):
        return tf.identity(scale)


def as_float_tensor(x, what="quantize"):
    """`x` as a float16, bfloat16, float32 or float64 tensor (numpy data keeps its dtype,
    Python numbers become float32), or a TypeError naming `what` and the dtype."""
    # Variables (Keras' included, which pass tf.is_tensor) are read here, outside the
    # custom-gradient functions, so gradients flow to them through the read.
    if not isinstance(x, tf.Tensor):
        # numpy data keeps its own dtype; Python numbers default to float32.
        hint = None if isinstance(x, (np.ndarray, np.generic)) else tf.float32
        try:
            x = tf.convert_to_tensor(x, dtype_hint=hint)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{what} expects a floating-point tensor, got {x!r}") from error
    if x.dtype not in _DTYPES:
        raise TypeError(
            f"{what} expects a float16, bfloat16, float32 or float64 tensor, got {x.dtype.name}")
    return x


def seed_tensor(seed):
    """The seed as an int64 scalar tensor; a TypeError or ValueError when it is not one."""
    if seed is None:
        return tf.random.uniform([], minval=tf.int64.min, maxval=tf.int64.max, dtype=tf.int64)
    if isinstance(seed, np.ndarray) and seed.ndim == 0:
        seed = seed[()]  # a 0-d array: its scalar
    if tf.is_tensor(seed) or isinstance(seed, np.ndarray):
        dtype = tf.as_dtype(seed.dtype)
        if not dtype.is_integer:
            raise TypeError(f"seed must be an integer scalar, got a {dtype.name} tensor")
        rank = len(seed.shape) if seed.shape is not None and (
            isinstance(seed, np.ndarray) or seed.shape.rank is not None) else None
        if rank is not None and rank != 0:
            raise ValueError(f"seed must be a scalar (shape []), got shape "
                             f"{list(seed.shape)}")
        seed = tf.convert_to_tensor(seed)
        if rank is None:  # unknown rank while tracing: checked when the graph runs
            seed = tf.ensure_shape(seed, [])
        return tf.cast(seed, tf.int64)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be None, an integer or an integer scalar tensor, got "
                        f"{seed!r} ({type(seed).__name__})")
    seed = int(seed) & ((1 << 64) - 1)  # any integer, as the int64 with the same 64 bits
    return tf.constant(seed - (1 << 64) if seed >= 1 << 63 else seed, tf.int64)


# TensorFlow's element-wise select (and so the TF-ops backend) supports at most rank 8.
_MAX_RANK = 8


class _TfOpsWithNoise:
    """The TF-ops backend rounding with the user's random bits `noise` (shaped like the
    tensor it rounds) instead of the hash of the seed."""

    def __init__(self, noise):
        self.noise = noise

    def quantize_float(self, x, fmt, rounding, saturate, seed):
        return ops.tf_backend.quantize_float(x, fmt, rounding, saturate, seed, self.noise)

    def quantize_fixed(self, x, exponent, inner, bits, rounding, saturate, seed):
        return ops.tf_backend.quantize_fixed(x, exponent, inner, bits, rounding, saturate,
                                             seed, self.noise)

    def quantize_dfp(self, x, fmt, rounding, saturate, seed):
        return ops.tf_backend.quantize_dfp(x, fmt, rounding, saturate, seed, self.noise)

    def quantize_block(self, x, fmt, rounding, saturate, seed):
        return tf_block.quantize_block(x, fmt, rounding, saturate, seed, self.noise)


def _round(x, fmt, rounding, saturate, seed, scale=None, noise=None):
    rank = x.shape.rank
    if rank is not None and rank > _MAX_RANK:
        # Rounding is element-wise (a slice or a block shares one exponent): a rank-1
        # (or, per slice or block along an axis, rank-3) view of the same elements in
        # the same order rounds exactly alike, stochastic bits included (they hash the
        # flat index).
        shape = tf.shape(x)
        axis = getattr(fmt, "axis", None)
        if getattr(fmt, "block_size", None) is not None and axis is None:
            axis = -1  # block floating point: blocks along the last axis
        if getattr(fmt, "tiles", False):  # 2D tiles of the last two axes
            view = [tf.reduce_prod(shape[:-2]), shape[-2], shape[-1]]
        elif axis is not None:
            if not -rank <= axis < rank:
                raise ValueError(f"axis {axis} is out of range for a tensor of rank {rank}")
            axis = axis % rank
            view = [tf.reduce_prod(shape[:axis]), shape[axis], tf.reduce_prod(shape[axis + 1:])]
            fmt = dataclasses.replace(fmt, axis=1)
        else:
            view = [-1]
        view = tf.stack(view)
        y = _round(tf.reshape(x, view), fmt, rounding, saturate, seed, scale,
                   None if noise is None else tf.reshape(noise, view))
        return tf.reshape(y, shape)
    container = tf.float64 if x.dtype == tf.float64 else tf.float32
    xc = tf.cast(x, container)
    if saturate == "sat_propagate" and not isinstance(fmt, formats.FloatFormat):
        saturate = False  # infinities stay as they are (block formats: a NaN block)
    if isinstance(fmt, formats.FloatFormat) or (
            isinstance(fmt, block_formats.BlockScaled) and fmt.scale == block_formats.FLOAT32):
        operation = "float"  # FP32 scales: float32 operations and the element rounding
    elif isinstance(fmt, block_formats.BlockScaled):
        operation = "block"
    else:
        operation = "fixed" if fmt.block_size is not None else "dfp"
    if noise is None:
        backend = ops.active_backend(operation, rounding, xc.shape.num_elements())
    else:
        backend = _TfOpsWithNoise(noise)
    if isinstance(fmt, formats.FloatFormat):
        y = backend.quantize_float(xc, fmt, rounding, saturate, seed)
    elif isinstance(fmt, block_formats.BlockScaled) and fmt.per_tensor:
        # One FP32 scale (TE / Keras float8): plain float32 ops and the element rounding.
        y = tf_fp32_scales.quantize_tensor_scaled(xc, fmt, rounding, seed, scale,
                                                  backend.quantize_float)
    elif isinstance(fmt, block_formats.BlockScaled) and fmt.float32_blocks:
        # FP32 scales per block (TE's Float8BlockScaling): TE's float32 operations.
        y = tf_fp32_scales.quantize_float32_blocks(xc, fmt, rounding, seed,
                                                  backend.quantize_float)
    elif isinstance(fmt, block_formats.BlockScaled):
        y = backend.quantize_block(xc, fmt, rounding, saturate, seed)
    elif fmt.block_size is not None:
        # Block floating point: exponents per block here, the rounding on either backend.
        exponent, inner = tf_block.dfp_block_exponents(xc, fmt, rounding)
        y = backend.quantize_fixed(xc, exponent, inner, fmt.bits, rounding, saturate, seed)
    else:
        y = backend.quantize_dfp(xc, fmt, rounding, saturate, seed)
    return tf.cast(y, x.dtype)
