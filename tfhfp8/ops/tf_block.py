"""Block-scaled rounding (`tfhfp8.BlockScaled`) with TensorFlow ops; runs under XLA.

The `tf` backend of `tfhfp8.quantize` for block-scaled formats; the `cpp` backend runs
the fused kernel `custom_ops/quantize/cc/kernels/block_rounding.h` (with
`block_pow2.h`), which mirrors this code step by step (tested to agree bit for bit).
Exactness, step by step:

- The block absolute maximum is taken on the magnitude bits (non-negative floats sort
  as integers; TensorFlow's CPU threads flush subnormals to zero in float arithmetic).
- Power-of-two scales (E8M0): the exponent comes from the bits of `amax`; division and
  multiplication by `2^k` are exponent shifts done in integer arithmetic, exact
  (a quotient below the container's smallest subnormal is truncated toward zero: it is
  then far below half the element format's smallest subnormal, so it rounds to 0 in
  every rounding mode; for stochastic rounding its round-up probability, below 2^-100,
  is taken as 0). The element rounding is `tf_backend.quantize_float`, one step from
  the bits, saturating.
- Float scales (NVFP4, any FloatFormat, P3109's signed and unsigned ones too): float32
  inputs are widened to float64 exactly (on the bits); `amax / (max_element * S)` and
  `x / (s_block * S)` are float64 divisions of a 24-bit by a <= 28-bit significand
  (NVFP4's E4M3 scale; a scale of p significant bits: p + 24). Such a quotient, if not
  exact, is at least 2^-31 (relative; 2^-(27 + p) with a p-bit scale) away from every
  value and midpoint of a format with at most 4 significant bits, and float64
  rounding moves it by at most 2^-53: rounding the float64 quotient to the
  scale / element format gives the same result as rounding the exact quotient, so each
  is rounded once (nearest_even and toward_zero exactly; stochastic rounding draws
  against the float64 quotient). `q * s_block * S` (<= 30 bits for NVFP4) is exact in
  float64 and rounded once to float32, on the bits (subnormal results included).
  float64 inputs (53-bit significands) are divided in float64 too: there the quotient
  may be rounded twice (once to float64), which only matters within 2^-53 of a rounding
  boundary. (Both backends and gfloat's `quantize_block` divide in float64 alike.)
"""

import numpy as np
import tensorflow as tf

from tfhfp8 import formats
from tfhfp8.ops import tf_backend as tb

_FLOAT32 = formats.FloatFormat(8, 23, name="float32")
_E8M0_MAX_EXPONENT = 127


def _ldexp(x, k, c):
    """`x * 2^k` on the bits (k an int32 tensor); exact when representable.

    Results below the container's smallest subnormal are truncated toward zero.
    Finite `x` only.
    """
    sign, a = tb.split_sign(x, c)
    exponent1, sig = tb.exponent_and_significand(a, c)
    qe = exponent1 - (c.exponent_bias + c.mantissa) + k
    shift = tf.clip_by_value(c.min_exponent - qe, 0, c.width - 1)
    code = tb.shift_right(sig, shift)
    bits = tb.scaled_bits(code, tf.maximum(qe, c.min_exponent), c)
    return tf.bitcast(sign | bits, c.dtype)


def _floor_log2(a, c):
    """(floor(log2(v)), significand bits of v normalized) for the magnitude bits `a`.

    `a` > 0 finite. The second value is the fraction field of `v` scaled into [1, 2).
    """
    exponent = tf.cast(tb.shift_right(a, c.mantissa), tf.int32)
    mantissa = a & tb.uint_constant((1 << c.mantissa) - 1, c)
    subnormal = exponent == 0
    # A subnormal's integer mantissa field converts exactly to a float with the same
    # significand; its exponent gives the position of the top bit.
    as_float = tf.bitcast(tf.cast(mantissa, c.dtype), c.uint)
    top = tf.cast(tb.shift_right(as_float, c.mantissa), tf.int32) - c.exponent_bias
    e = tf.where(subnormal, top + c.min_exponent, exponent - c.exponent_bias)
    fraction = tf.where(subnormal, as_float, a) & tb.uint_constant((1 << c.mantissa) - 1, c)
    return e, fraction


def block_axis_layout(x, axis):
    """(axis, perm) of the block axis `axis` of `x`: the axis made non-negative and the
    permutation that moves it last. Raises the ValueError both backends give for a
    tensor of unknown rank or an axis out of range."""
    rank = x.shape.rank
    if rank is None:
        raise ValueError("a block-scaled format needs a tensor of known rank")
    if not -max(rank, 1) <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} of the block-scaled format is out of range for a "
                         f"tensor of rank {rank}")
    axis = axis % max(rank, 1)
    perm = [i for i in range(rank) if i != axis] + [axis]
    return axis, perm


class Blocks:
    """The 1D blocks of `x` along `axis`: moves the block axis last, pads it to whole
    blocks (`reduce_max`) and back (`expand`). Shared with `tf_fp32_scales`."""

    def __init__(self, x, axis, block_size):
        self.axis, self.perm = block_axis_layout(x, axis)
        self.rank = x.shape.rank
        self.block_size = block_size
        self.moved = self.perm != list(range(self.rank))
        n = x.shape[self.axis]
        self.n = n if n is not None else tf.shape(x)[self.axis]

    def reduce_max(self, t):
        """Per-block maximum of an integer tensor shaped like x: [..., blocks]."""
        if self.moved:
            t = tf.transpose(t, self.perm)
        pad = (-self.n) % self.block_size
        if not isinstance(pad, int) or pad:
            paddings = [[0, 0]] * (self.rank - 1) + [[0, pad]]
            t = tf.pad(t, paddings)  # zeros: magnitudes, so they never win the max
        shape = tf.concat([tf.shape(t)[:-1], [-1, self.block_size]], 0)
        return tf.reduce_max(tf.reshape(t, shape), axis=-1)

    def expand(self, v):
        """A per-block tensor [..., blocks] back to one value per element of x."""
        v = tf.repeat(v, self.block_size, axis=-1)[..., :self.n]
        if self.moved:
            v = tf.transpose(v, [self.perm.index(i) for i in range(self.rank)])
        return v


class Tiles:
    """2D tiles of `rows` x `cols` over the last two axes of `x` (padded with zeros), with
    the interface of `Blocks` (`block_shape`). Shared with `tf_fp32_scales`."""

    def __init__(self, x, rows, cols):
        if x.shape.rank is None or x.shape.rank < 2:
            raise ValueError(f"block_shape ({rows}, {cols}) tiles the last two axes: it "
                             f"needs a tensor of rank >= 2, got shape {x.shape}")
        self.rows, self.cols = rows, cols
        shape = tf.shape(x)
        self.lead, self.r, self.c = shape[:-2], shape[-2], shape[-1]

    def reduce_max(self, t):
        """Per-tile maximum of an integer tensor shaped like x: [..., row tiles, col tiles]."""
        tiles_r = (self.r + self.rows - 1) // self.rows
        tiles_c = (self.c + self.cols - 1) // self.cols
        padding = [[0, 0]] * (t.shape.rank - 2) + [[0, tiles_r * self.rows - self.r],
                                                  [0, tiles_c * self.cols - self.c]]
        tiled = tf.reshape(tf.pad(t, padding),
                           tf.concat([self.lead, [tiles_r, self.rows, tiles_c, self.cols]], 0))
        return tf.reduce_max(tiled, axis=[-3, -1])

    def expand(self, v):
        """A per-tile tensor back to one value per element of x."""
        v = tf.repeat(tf.repeat(v, self.rows, axis=-2), self.cols, axis=-1)
        return v[..., :self.r, :self.c]


def quantize_block(x, fmt, rounding, saturate, seed, rand=None):
    """Rounds a float32/float64 tensor to the BlockScaled format `fmt`; `rand`: the
    elements' random bits (`tf_backend.quantize_float`), one per element of `x`."""
    shape = tf.shape(x)
    scalar = x.shape.rank == 0
    if scalar:
        x = tf.reshape(x, [1])
        rand = None if rand is None else tf.reshape(rand, [1])
    c = tb.CONTAINERS[x.dtype]
    signed = tf.int32 if c.width == 32 else tf.int64
    blocks = (Tiles(x, *fmt.block_shape) if fmt.tiles
              else Blocks(x, fmt.axis, fmt.block_size))

    sign, a = tb.split_sign(x, c)
    inf_bits = tb.uint_constant(c.inf_bits, c)
    is_inf = a == inf_bits
    if saturate:  # an infinity counts as the largest finite value
        a = tf.where(is_inf, inf_bits - tb.uint_constant(1, c), a)
        x = tf.bitcast(sign | a, c.dtype)
    amax = tf.bitcast(blocks.reduce_max(tf.bitcast(a, signed)), c.uint)
    # NaN (or, not saturating, inf) anywhere in a block: a NaN scale.
    bad = amax >= inf_bits
    amax = tf.where(bad, tb.uint_constant(0, c), amax)

    if fmt.power_of_two_scale:
        y, bad = _power_of_two(x, amax, bad, fmt, blocks, rounding, saturate, seed, rand, c)
    else:
        y = _float_scale(x, a, amax, fmt, blocks, rounding, seed, rand, c)
    nan = tf.bitcast(tb.uint_constant(c.inf_bits | 1 << (c.mantissa - 1), c), c.dtype)
    y = tf.where(blocks.expand(bad), nan, y)
    return tf.reshape(y, shape) if scalar else y


def _power_of_two(x, amax, bad, fmt, blocks, rounding, saturate, seed, rand, c):
    """OCP MX: scale 2^k, k from the block's amax (see tfhfp8.block_formats)."""
    if fmt.scale_rounding == "rceil":
        k = _rceil_exponent(tf.bitcast(amax, c.dtype), fmt)
    else:
        e, fraction = _floor_log2(tf.maximum(amax, tb.uint_constant(1, c)), c)
        k = e - fmt.emax_element
    if fmt.scale_rounding == "ceil":  # up when amax's significand exceeds max's
        uint = np.uint32 if c.width == 32 else np.uint64
        max_bits = int(np.array(fmt.element.max, c.dtype.as_numpy_dtype).view(uint))
        max_fraction = max_bits & ((1 << c.mantissa) - 1)
        k += tf.cast(fraction > tb.uint_constant(max_fraction, c), tf.int32)
    k = tf.where(amax == 0, -_E8M0_MAX_EXPONENT, k)
    # Only float64 inputs can need more than 2^127: NaN (E8M0 has no inf) or clamp.
    if not saturate:
        bad = bad | (k > _E8M0_MAX_EXPONENT)
    k = tf.clip_by_value(k, -_E8M0_MAX_EXPONENT, _E8M0_MAX_EXPONENT)
    k = tf.where(bad, 0, k)
    k = blocks.expand(k)
    scaled = _ldexp(tf.where(tf.math.is_nan(x), tf.zeros_like(x), x), -k, c)
    q = tb.quantize_float(scaled, fmt.element, rounding, True, seed, rand)
    return _ldexp(q, k, c), bad


def _rceil_exponent(amax, fmt):
    """Transformer Engine's MXFP8 scale exponent ("rceil"): the least k in [-127, 127]
    with 2^k >= fl32(fl32(amax) * fl32(1 / max_element)). The product is exact in
    float64; rounding it to float32 matters only within half a float32 ulp above a
    power of two 2^j (2^(max(j, -126) - 24)), where it rounds down onto 2^j. (A
    subnormal amax, which a cast may flush, gives k = -127 either way.)"""
    max_rcp = float(np.float32(1.0 / fmt.element.max))
    v = tf.cast(tf.cast(amax, tf.float32), tf.float64) * max_rcp
    safe = tf.where((v > 0) & tf.math.is_finite(v), v, tf.ones_like(v))
    bits = tf.bitcast(safe, tf.int64)
    j = tf.cast(tf.bitwise.right_shift(bits, 52), tf.int32) - 1023  # v is a normal double
    above = safe - tf.bitcast(tf.bitwise.left_shift(tf.cast(j + 1023, tf.int64), 52),
                              tf.float64)
    half_ulp = tf.bitcast(tf.bitwise.left_shift(
        tf.cast(tf.maximum(j, -126) - 24 + 1023, tf.int64), 52), tf.float64)
    k = tf.where(above <= half_ulp, j, j + 1)
    k = tf.where(v > 0, k, -_E8M0_MAX_EXPONENT)
    k = tf.where(tf.math.is_inf(v), _E8M0_MAX_EXPONENT, k)
    return tf.clip_by_value(k, -_E8M0_MAX_EXPONENT, _E8M0_MAX_EXPONENT)


def float32_to_float64_exact(x, a, c):
    """float32 (sign from x, magnitude bits a) to float64, exactly, subnormals included."""
    if c.width == 64:
        return x
    a64 = tf.cast(a, tf.uint64)
    exponent = tf.bitwise.right_shift(a64, tf.constant(23, tf.uint64))
    mantissa = a64 & tf.constant((1 << 23) - 1, tf.uint64)
    normal = tf.bitcast(tf.bitwise.left_shift(exponent + (1023 - 127), tf.constant(52, tf.uint64))
                        | tf.bitwise.left_shift(mantissa, tf.constant(29, tf.uint64)),
                        tf.float64)
    sub = tf.cast(mantissa, tf.float64) * 2.0**-149
    value = tf.where(exponent == 0, sub, normal)
    return tf.where(tf.bitcast(x, tf.uint32) >= 1 << 31, -value, value)


def float64_to_float32_exact(y):
    """A float64 tensor holding float32 values (subnormals too) as float32, on the bits."""
    c64 = tb.CONTAINERS[tf.float64]
    sign, a = tb.split_sign(y, c64)
    exponent = tf.cast(tf.bitwise.right_shift(a, tf.constant(52, tf.uint64)), tf.int32)
    fraction = a & tf.constant((1 << 52) - 1, tf.uint64)
    normal_bits = tf.bitwise.left_shift(tf.cast(tf.maximum(exponent - 896, 0), tf.uint64),
                                        tf.constant(23, tf.uint64)) | tf.bitwise.right_shift(
                                            fraction, tf.constant(29, tf.uint64))
    sig = fraction | tf.where(exponent > 0, tf.constant(1 << 52, tf.uint64),
                              tf.constant(0, tf.uint64))
    shift = tf.cast(tf.clip_by_value(926 - exponent, 0, 63), tf.uint64)
    sub_bits = tf.bitwise.right_shift(sig, shift)
    bits = tf.where(exponent >= 897, normal_bits, sub_bits)
    bits = bits | tf.bitwise.right_shift(sign, tf.constant(32, tf.uint64))
    return tf.bitcast(tf.cast(bits, tf.uint32), tf.float32)


def to_float64(x32):
    """float32 `x32` as float64, exactly: subnormals (which TF's CPU casts flush),
    infinities and NaN kept. Shared with `tf_fused` and `tf_fp32_scales`."""
    c = tb.CONTAINERS[tf.float32]
    exact = float32_to_float64_exact(x32, tb.split_sign(x32, c)[1], c)
    return tf.where(tf.math.is_finite(x32), exact, tf.cast(x32, tf.float64))


def to_float32(y64):
    """float64 `y64` holding float32 values (subnormals, infinities, NaN) as float32, on
    the bits. Shared with `tf_fused` and `tf_fp32_scales`."""
    finite = tf.math.is_finite(y64)
    exact = float64_to_float32_exact(tf.where(finite, y64, tf.zeros_like(y64)))
    return tf.where(finite, exact, tf.cast(y64, tf.float32))


def _float_scale(x, a, amax, fmt, blocks, rounding, seed, rand, c):
    """NVFP4-style: a float scale per block, optionally inside a float32 tensor scale."""
    zero_seed = tf.zeros([], tf.int64)
    element_max = fmt.element.max
    scale_rounding = {"nearest_even": "nearest_even", "floor": "toward_zero"}[
        fmt.scale_rounding]
    x64 = float32_to_float64_exact(x, a, c)
    amax64 = float32_to_float64_exact(tf.bitcast(amax, c.dtype), amax, c)
    if fmt.tensor_scale:
        finite = tf.where(a < tb.uint_constant(c.inf_bits, c), a, tb.uint_constant(0, c))
        tensor_amax = tf.reduce_max(tf.reshape(tf.bitcast(finite, tf.int32 if c.width == 32
                                                          else tf.int64), [-1]))
        tensor_amax = tf.bitcast(tf.maximum(tensor_amax, 0), c.uint)
        t64 = float32_to_float64_exact(tf.bitcast(tensor_amax, c.dtype), tensor_amax, c)
        s = tb.quantize_float(t64 / (fmt.scale.max * element_max), _FLOAT32, "nearest_even",
                              True, zero_seed)
        s = tf.where(t64 == 0, tf.constant(1.0, tf.float64), tf.maximum(s, 2.0**-149))
    else:
        s = tf.constant(1.0, tf.float64)
    block_scale = tb.quantize_float(amax64 / (element_max * s), fmt.scale, scale_rounding,
                                    True, zero_seed)
    d = blocks.expand(block_scale) * s  # exact: <= 24 + 24 significant bits
    zero = d == 0
    q = tb.quantize_float(x64 / tf.where(zero, tf.ones_like(d), d), fmt.element, rounding,
                          True, seed, rand)
    # A zero scale: zeros, keeping x's sign where the element has a -0.
    zeros = x64 * 0.0 if fmt.element.has_negative_zero else tf.zeros_like(x64)
    y = tf.where(zero, zeros, q * d)
    if c.width == 64:
        return y
    return float64_to_float32_exact(tb.quantize_float(y, _FLOAT32, "nearest_even", True, zero_seed))


def dfp_block_exponents(x, fmt, rounding):
    """Shared exponents of block floating point (`DynamicFixedPoint` with `block_size`).

    Returns `(exponent, inner)` for `quantize_fixed`: one exponent per element (flat,
    `inner` 1). Each block's exponent follows `tf_backend.shared_exponents`' rule,
    computed on the blocks laid out as rows (zero padding never changes a maximum).
    """
    import dataclasses

    if x.shape.rank == 0:
        x = tf.reshape(x, [1])
    blocks = Blocks(x, -1 if fmt.axis is None else fmt.axis, fmt.block_size)
    moved = tf.transpose(x, blocks.perm) if blocks.moved else x
    pad = (-blocks.n) % fmt.block_size
    if not isinstance(pad, int) or pad:
        moved = tf.pad(moved, [[0, 0]] * (blocks.rank - 1) + [[0, pad]])
    rows = tf.reshape(moved, [-1, fmt.block_size])
    exponent, _ = tb.shared_exponents(rows, dataclasses.replace(fmt, axis=0, block_size=None),
                                      rounding)
    per_block = tf.reshape(exponent, tf.concat([tf.shape(moved)[:-1], [-1]], 0))
    per_element = blocks.expand(per_block)
    return tf.reshape(per_element, [-1]), tf.constant(1, tf.int64)
