"""FP32 scales in TF ops: per tensor (`BlockScaled(..., block_size=None)`, Keras' and
Transformer Engine's float8 recipes) and per block or 2D tile (`BlockScaled(...,
scale="float32")` with blocks: TE's Float8BlockScaling, DeepSeek-V3's recipe).

Per block, the arithmetic is the float32 operation sequence of TE's reference quantizer
(`tests/pytorch/references/quantize_scale_calc.py`, `blockwise_quantizer_reference.py`):
`scale = max_element / amax` (FLT_MAX where it overflows; optionally rounded down to a
power of two; 1 where `amax` is 0), `q = round(clamp(x * scale))`, value
`q * (1 / scale)`, each float32 operation rounded once as IEEE arithmetic rounds it,
subnormals included: in float32 operations where TF's CPU flushing of subnormals cannot
change a result (every block's amax above about `max_element * 2^-116`), else in
float64 from exact operands, rounded once to float32 on the bits (a product or quotient
of two float32 values rounded to float64 and then to float32 equals the exact one
rounded to float32: 53 >= 2 * 24 + 2).
"""

import tensorflow as tf

from tfhfp8 import formats
from tfhfp8.ops import tf_backend as tb
from tfhfp8.ops.tf_block import Blocks, Tiles, to_float32, to_float64

_FLOAT32 = formats.FloatFormat(8, 23, name="float32")
_FLT_MAX = float(tf.float32.max)  # TE: an infinite scale becomes FLT_MAX


def _fl32(y64):
    """float64 `y64` rounded once to a float32 value (nearest even; beyond FLT_MAX: inf),
    kept in float64."""
    rounded = tb.quantize_float(y64, _FLOAT32, "nearest_even", False, tf.zeros([], tf.int64))
    return tf.where(tf.math.is_nan(y64), y64, rounded)


def _power_of_two_below(scale):
    """2^floor(log2(scale)) of positive normal float32 `scale`, from its exponent bits;
    0.5 elsewhere (TE: frexp gives exponent 0 for 0 and NaN)."""
    usable = tf.math.is_finite(scale) & (scale > 0)
    bits = tf.bitcast(tf.where(usable, scale, tf.ones_like(scale)), tf.int32)
    return tf.where(usable, tf.bitcast(tf.bitwise.bitwise_and(bits, 0x7F800000), tf.float32),
                    0.5)


def _scales(amax_bits, fmt):
    """The float32 scale of each block (`amax_bits`: its amax's magnitude bits) as TE's
    `scale_from_amax_tensor` (eps 0) computes it. A float32 division rounds as the exact
    quotient does: `max_element / amax` is normal for every finite amax, and a
    subnormal amax, read as 0 here, gives inf, FLT_MAX, as it would exactly."""
    amax = tf.bitcast(amax_bits, tf.float32)
    scale = fmt.element.max / amax
    scale = tf.where(tf.math.is_inf(scale), _FLT_MAX, scale)
    if fmt.scale_rounding == "power_of_two":
        scale = tf.where(tf.math.is_inf(amax), 0.0, _power_of_two_below(scale))
    return tf.where(amax_bits == 0, 1.0, scale)  # zero on the bits: not a subnormal


def quantize_float32_blocks(x, fmt, rounding, seed, quantize_float):
    """`x` (float32, or float64 first rounded to float32) rounded to the FP32-block-scaled
    `fmt`; `quantize_float(y, element, rounding, saturate, seed)`: the backend's element
    rounding of float32 `y`. Returns float32 values in `x`'s dtype.

    While every scale is below `min_subnormal(element) * 2^125`, float32 operations give
    TE's results (a subnormal input, read as 0, would scale to below half the element's
    smallest subnormal; `1 / scale` and every nonzero `q / scale` are normal); a tensor
    with a smaller amax in some block is computed exactly in float64 instead."""
    x32 = x if x.dtype == tf.float32 else to_float32(_fl32(x))
    c = tb.CONTAINERS[tf.float32]
    _, magnitude = tb.split_sign(x32, c)
    blocks = (Tiles(x32, *fmt.block_shape) if fmt.tiles
              else Blocks(x32, fmt.axis, fmt.block_size))
    scale = _scales(blocks.reduce_max(tf.bitcast(magnitude, tf.int32)), fmt)  # NaN on top
    top = fmt.element.max

    def rounded(scaled):
        clamped = tf.where(tf.math.is_nan(scaled), scaled, tf.clip_by_value(scaled, -top, top))
        return quantize_float(clamped, fmt.element, rounding, True, seed)

    def in_float32():
        return rounded(x32 * blocks.expand(scale)) * blocks.expand(1.0 / scale)

    def on_the_bits():
        scale64 = to_float64(scale)
        q = rounded(to_float32(_fl32(to_float64(x32) * blocks.expand(scale64))))
        return to_float32(_fl32(to_float64(q) * blocks.expand(_fl32(1.0 / scale64))))

    fast = tf.reduce_all(~(scale >= fmt.element.min_subnormal * 2.0**125))  # NaN: fast
    return tf.cast(tf.cond(fast, in_float32, on_the_bits), x.dtype)


# -- per-tensor FP32 scales (Transformer Engine / Keras float8) ------------------------
# The factor max_element / amax / 2^margin is clamped to [2^-126, 2^126], so that it
# and its reciprocal, the scale, are normal float32 numbers: TF's CPU flushes a
# subnormal to zero (Transformer Engine clamps the factor at FLT_MAX, whose reciprocal
# is subnormal), and a factor flushed to 0 (a huge amax with a large margin) would
# make the scale infinite.
MAX_FACTOR = 2.0**126
MIN_SCALE = 2.0**-126


def tensor_amax(x):
    """The largest magnitude of `x`, as a float32 scalar (Keras: `max(abs(x))`; NaN if
    `x` holds one), taken on the magnitude bits for float32 and float64 `x` so that
    subnormals count (TF's CPU reads them as zero in float arithmetic)."""
    x = tf.convert_to_tensor(x)  # a Keras variable's dtype is a string
    if x.dtype not in (tf.float32, tf.float64):
        return tf.cast(tf.reduce_max(tf.abs(x)), tf.float32)
    c = tb.CONTAINERS[x.dtype]
    _, a = tb.split_sign(x, c)
    signed = tf.int32 if c.width == 32 else tf.int64
    top = tf.maximum(tf.reduce_max(tf.reshape(tf.bitcast(a, signed), [-1])), 0)  # empty: 0
    return tf.cast(tf.bitcast(top, x.dtype), tf.float32)


def tensor_scale(amax, fmt, previous=None):
    """The per-tensor scale `s` of `fmt` for `amax` (float32 scalars), as Keras'
    `compute_float8_scale` computes it, operation by operation: the reciprocal
    `max_element / amax / 2^margin` (clamped to [2^-126, 2^126]), whose own
    reciprocal is `s`; where `amax` is 0 or not finite, the previous scale (through the
    same two reciprocals), 1 if none.
    """
    previous = tf.constant(1.0) if previous is None else tf.cast(previous, tf.float32)
    amax = tf.cast(amax, tf.float32)
    factor = tf.constant(float(fmt.element.max), tf.float32) / amax / (2.0 ** fmt.margin)
    # (A subnormal amax reads as 0: the factor is inf, clamped like a tiny normal one.)
    factor = tf.clip_by_value(factor, MIN_SCALE, MAX_FACTOR)
    kept = tf.math.reciprocal(previous)
    positive = tf.bitcast(amax, tf.int32) > 0  # on the bits: subnormals are positive
    factor = tf.where(positive, factor, kept)
    factor = tf.where(tf.math.is_finite(amax), factor, kept)
    return tf.math.reciprocal(factor)


def current_scale(x, fmt):
    """The per-tensor scale of `fmt` for `x`'s own amax (current scaling): what
    `quantize_tensor_scaled` takes without a scale."""
    return tensor_scale(tensor_amax(x), fmt)


def next_amax_history(history, amax):
    """Keras' `compute_float8_amax_history`: rolled by one, `amax` written first (the
    window holds the last `len(history)` amaxes; only their maximum is used)."""
    return tf.tensor_scatter_nd_update(tf.roll(history, shift=-1, axis=0), [[0]],
                                       tf.reshape(tf.cast(amax, history.dtype), [1]))


def quantize_tensor_scaled(x, fmt, rounding, seed, scale, quantize_float):
    """Per-tensor FP32 scale: `fl(q * s)`, `q` = `fl(x / s)` rounded to the element
    (saturating). `scale` None: the current amax's scale. `quantize_float(y, element,
    rounding, saturate, seed)` is the backend's element rounding.

    With float32 `x` and a scale so small that a subnormal input could round to a
    nonzero element or `q * s` be subnormal, the quotient and the product are computed
    on the bits (TF's CPU flushes subnormals to zero in float arithmetic); otherwise the
    float32 operations give the same IEEE results."""
    if scale is None:
        scale = current_scale(x, fmt)
    s = tf.cast(scale, x.dtype)

    def in_float_ops():
        return quantize_float(x / s, fmt.element, rounding, True, seed) * s

    if x.dtype != tf.float32:
        return in_float_ops()
    # Above this scale, |x| < 2^-126 gives |x / s| below half the element's smallest
    # value and every nonzero q * s is normal.
    safe = MIN_SCALE * 2.0 / fmt.element.min_subnormal
    return tf.cond(s >= safe, in_float_ops,
                   lambda: _scaled_on_the_bits(x, s, fmt, rounding, seed, quantize_float))


def _scaled_on_the_bits(x, s, fmt, rounding, seed, quantize_float):
    """`quantize_tensor_scaled` of float32 `x`, IEEE subnormals included: `x / s` and
    `q * s` in float64 (exact operands from the bits; a float64 quotient of 24-bit
    significands rounds to float32 as the exact one would, the product is exact) and
    rounded once to float32 on the bits."""
    c = tb.CONTAINERS[tf.float32]
    q = quantize_float(_quotient_on_the_bits(x, s), fmt.element, rounding, True, seed)
    _, qa = tb.split_sign(q, c)
    q_finite = qa < tb.uint_constant(c.inf_bits, c)
    safe_q = tf.where(q_finite, q, tf.zeros_like(q))
    s64 = tf.cast(s, tf.float64)  # s >= 2^-126: normal
    product = to_float32(_fl32(to_float64(safe_q) * s64))
    return tf.where(q_finite, product, q)


def _quotient_on_the_bits(x, s):
    """float32 `x / s` rounded once, subnormal `x` included (exact operands from the
    bits; a float64 quotient of 24-bit significands rounds to float32 as the exact one
    would). `s`: a normal float32."""
    c = tb.CONTAINERS[tf.float32]
    _, a = tb.split_sign(x, c)
    finite = a < tb.uint_constant(c.inf_bits, c)
    safe_x = tf.where(finite, x, tf.zeros_like(x))
    quotient = to_float32(_fl32(to_float64(safe_x) / tf.cast(s, tf.float64)))
    return tf.where(finite, quotient, x / s)


def tensor_scaled_elements(x, fmt, scale):
    """The elements `q` of float32 values `x = fl(q * scale)` of the per-tensor scaled
    `fmt` (what `quantize_tensor_scaled` gives): what an FP8 GEMM multiplies, its FP32
    scales applied to the sum. Where `q * scale` is a normal float32 (everywhere unless
    the scale is below 2^-126 over the element's smallest subnormal), `x / scale` lies
    within two float32 ulps of `q`, far closer than half the spacing of the element, so
    rounding it to the element (nearest even, saturating) gives `q` exactly; a
    subnormal `x` kept fewer bits of `q` than its element has, and gives `q` only
    where those sufficed (the quotient is then taken on the bits)."""
    s = tf.cast(scale, tf.float32)
    safe = MIN_SCALE * 2.0 / fmt.element.min_subnormal
    quotient = tf.cond(s >= safe, lambda: x / s, lambda: _quotient_on_the_bits(x, s))
    return tb.quantize_float(quotient, fmt.element, "nearest_even", True,
                             tf.zeros([], tf.int64))
