"""Rounding written with TensorFlow ops: runs under XLA and on any device.

The algorithm (mirrored line by line in `custom_ops/quantize/cc/kernels`):

- Work on the magnitude's bits `a` of the float32 (or float64) input, in one step, so
  there is no double rounding.
- *Normal path* (input exponent >= the format's minimum normal exponent): re-bias the
  exponent field so that `a` becomes the target format's code followed by `d` extra
  mantissa bits, then drop those `d` bits with the chosen rounding; a carry out of the
  mantissa moves to the next binade by itself.
- *Fixed-quantum path* (below the format's normal range, and every element of dynamic
  fixed point): with the significand `sig` (implicit bit included), round
  `sig / 2^s` to an integer code `c`; the value is `c * quantum`.
- Stochastic rounding adds nothing to `x`: it compares the dropped bits with a
  counter-based random number, a hash of (seed, element index), so it is
  reproducible whatever the thread count and no random tensor is stored.
"""

import tensorflow as tf

from tfhfp8.formats import roundings
from tfhfp8.ops.tf_bits import (  # noqa: F401 (CONTAINERS, index_bits: read here by others)
    CONTAINERS, index_bits, random_bits, shift_right, shl, uint_constant)


def _rn(v, shift, ties_odd, c):
    """`v / 2^shift` rounded to the nearest integer (`shift >= 1`, a Python int or a
    uint tensor), ties to odd or to even."""
    shift = tf.cast(shift, c.uint)
    one = uint_constant(1, c)
    low = shift_right(v, shift) & one
    tie_up = one - low if ties_odd else low
    return shift_right(v + (shl(one, shift - one) - one) + tie_up, shift)


def _fraction_bits(v, kept, dropped, d, bits, ties, c):
    """The dropped fraction `dropped / 2^d` as a `bits`-bit integer: rounded to nearest
    (`ties` "even" or "odd") or truncated (`ties` None). `v = kept * 2^d + dropped`;
    `d` an int32 tensor or a Python int, `bits` a Python int."""
    d = tf.convert_to_tensor(d, tf.int32)
    # Beyond mantissa + 2 bits, v (< 2^(mantissa + 1) there) narrows to 0 either way.
    if ties is None:
        narrowed = shift_right(v, tf.clip_by_value(d - bits, 0, c.mantissa + 2))
    else:
        narrowed = _rn(v, tf.clip_by_value(d - bits, 1, c.mantissa + 2), ties == "odd", c)
    wide = shl(dropped, tf.clip_by_value(bits - d, 0, c.width - 1))
    return tf.where(d > bits, narrowed - shl(kept, bits), wide)


def _round_up(kept, dropped, v, d, rounding, sign, rand, c):
    """Whether to add one to `kept` (`v = kept * 2^d + dropped`; `d` the number of
    dropped bits, a Python int or int32 tensor, beyond mantissa + 2 when `v` is a
    significand shifted out entirely) for the roundings other than `nearest_even`,
    `toward_zero` and the full-precision `stochastic`, as a uint 0 / 1 tensor. `rand`:
    the `r` random bits of the r-bit roundings."""
    mode, r = rounding.mode, rounding.random_bits
    one = uint_constant(1, c)
    if mode == "nearest_away":
        half = shift_right(shl(one, tf.minimum(d, c.mantissa + 2)), 1)
        up = (dropped >= half) & (half > 0)
    elif mode in ("toward_positive", "toward_negative"):
        positive = sign == 0
        up = (dropped > 0) & (positive if mode == "toward_positive" else ~positive)
    elif mode == "stochastic_fast":
        # up iff delta + (0.5 + bits) 2^-r >= 1, i.e. floor(delta 2^(r+1)) + 2 bits + 1
        # reaches 2^(r+1).
        t = _fraction_bits(v, kept, dropped, d, r + 1, None, c)
        up = t + shl(rand, 1) + one >= uint_constant(1 << (r + 1), c)
    else:
        ties = "odd" if mode == "stochastic_odd" else "even"
        up = _fraction_bits(v, kept, dropped, d, r, ties, c) + rand >= uint_constant(1 << r, c)
    return tf.cast(up, c.uint)


def _round_static(v, d, rounding, rand, c, sign=None):
    """Drops the `d` low bits of the unsigned integers `v` (d a Python int)."""
    if d == 0:
        return v
    kept = shift_right(v, d)
    if rounding.mode == "toward_zero":
        return kept
    if rounding.mode == "nearest_even":
        half_minus_one = uint_constant((1 << (d - 1)) - 1, c)
        return shift_right(v + half_minus_one + (kept & uint_constant(1, c)), d)
    dropped = v & uint_constant((1 << d) - 1, c)
    if rounding.stochastic and rounding.random_bits is None:
        threshold = shift_right(rand, c.width - d)  # d uniform random bits
        return kept + tf.cast(threshold < dropped, c.uint)
    return kept + _round_up(kept, dropped, v, d, rounding, sign, rand, c)


def _round_variable(sig, s, rounding, rand, c, sign=None):
    """Rounds `sig / 2^s` to an integer, `s >= 0` per element (int32 tensor).

    `sig < 2^(mantissa + 1)`. Full-precision stochastic rounding compares the dropped
    bits, aligned as a `width`-bit fraction, with `width` random bits: exact whenever
    at most `width` bits are dropped; beyond that the round-up probability (below
    2^-(width - mantissa - 1)) is truncated to `width` bits.
    """
    w = c.width
    shift = tf.minimum(s, c.mantissa + 2)  # sig >> shift == 0 beyond
    kept = shift_right(sig, shift)
    if rounding.mode == "toward_zero":
        return kept
    if rounding.mode == "nearest_even":
        lsb = tf.cast(shift > 0, c.uint)  # s == 0: nothing dropped
        half_minus_one = shift_right(shl(uint_constant(1, c), shift), 1) - lsb
        return shift_right(sig + half_minus_one + (kept & lsb), shift)
    dropped = sig & (shl(uint_constant(1, c), shift) - uint_constant(1, c))
    if rounding.stochastic and rounding.random_bits is None:
        up_shift = tf.cast(tf.clip_by_value(w - s, 0, w - 1), c.uint)
        down_shift = tf.cast(tf.clip_by_value(s - w, 0, w - 1), c.uint)
        fraction = tf.where(s <= w, shl(dropped, up_shift), shift_right(sig, down_shift))
        return kept + tf.cast(rand < fraction, c.uint)
    return kept + _round_up(kept, dropped, sig, s, rounding, sign, rand, c)


def split_sign(x, c):
    """(sign bit, magnitude bits) of `x`'s bits in the container `c`."""
    bits = tf.bitcast(x, c.uint)
    sign_mask = uint_constant(1 << (c.width - 1), c)
    return bits & sign_mask, bits & ~sign_mask


def exponent_and_significand(a, c):
    """(biased exponent clamped to >= 1, significand with its implicit bit)."""
    exponent = tf.cast(shift_right(a, c.mantissa), tf.int32)
    implicit = tf.where(exponent > 0, uint_constant(1 << c.mantissa, c), uint_constant(0, c))
    sig = (a & uint_constant((1 << c.mantissa) - 1, c)) | implicit
    return tf.maximum(exponent, 1), sig


def rounding_bits(shape, seed, rounding, c, size=None):
    """The random bits of each element for the stochastic `rounding` (a parsed
    `Rounding`): `c.width` of them for the full-precision draw, else the top `r` bits
    of the first 32-bit hash word, in a `c.uint` tensor."""
    rand = random_bits(shape, seed, c, size)
    if rounding.random_bits is None:
        return rand
    return shift_right(rand, c.width - rounding.random_bits)


def quantize_float(x, fmt, rounding, saturate, seed, rand=None):
    """Rounds a float32/float64 tensor to the values of the FloatFormat `fmt`.

    `rounding`: a name of `tfhfp8.formats.roundings`; `saturate`: False, True or
    `"sat_propagate"` (`roundings.overflow`). `rand`: for the stochastic roundings, the
    random bits of each element (as `rounding_bits` draws them) when the caller takes
    them from elsewhere than the hash of the flat index of `x` (accumulation, a user's
    `noise`).
    """
    rounding = roundings.parse(rounding)
    c = CONTAINERS[x.dtype]
    m = fmt.mantissa_bits
    sub_mantissa = m if fmt.subnormals else 0
    emin = 1 - fmt.bias + c.exponent_bias  # biased (container) min normal exponent
    rebias = (emin - 1) << c.mantissa
    if rounding.stochastic and rand is None:
        rand = rounding_bits(tf.shape(x), seed, rounding, c, x.shape.num_elements())
    elif rand is not None:
        rand = tf.cast(rand, c.uint)

    sign, a = split_sign(x, c)
    exponent = tf.cast(shift_right(a, c.mantissa), tf.int32)
    normal = exponent >= emin

    # Normal path: the code of the target format and its bits in the container.
    d = c.mantissa - m
    code = _round_static(a - uint_constant(rebias, c), d, rounding, rand, c, sign)
    normal_bits = shl(code, d) + uint_constant(rebias, c)
    overflow = normal & (code > uint_constant(fmt.max_code, c))

    # Fixed-quantum path: subnormals of the format, and zero.
    exponent1, sig = exponent_and_significand(a, c)
    # s == 0 only for the container's own subnormals (e.g. FloatFormat(8, 23)): exact.
    s = tf.maximum(c.mantissa - sub_mantissa + emin - exponent1, 0)
    sub_code = _round_variable(sig, s, rounding, rand, c, sign)
    sub_bits = scaled_bits(sub_code, 1 - fmt.bias - sub_mantissa, c)

    magnitude = tf.where(normal, normal_bits, sub_bits)
    magnitude = tf.where(overflow, _overflow_bits(a, sign, fmt, rounding, saturate, c),
                         magnitude)
    if not fmt.has_negative_zero:
        sign = tf.where(magnitude == 0, uint_constant(0, c), sign)

    is_nan = a > uint_constant(c.inf_bits, c)
    quiet_nan = uint_constant(c.inf_bits | 1 << (c.mantissa - 1), c)
    if fmt.has_nan or saturate:
        nan_bits = sign | quiet_nan
    else:
        # ml_dtypes casts NaN to a zero of the opposite sign in formats without NaN.
        nan_bits = sign ^ uint_constant(1 << (c.width - 1), c)
    out = sign | magnitude
    if not fmt.signed:
        # Below an unsigned format's range: 0 when saturating (a -inf that propagates
        # has nowhere to go), else NaN.
        below = (sign != 0) & (magnitude != 0)
        if saturate is True:
            below_bits = tf.zeros_like(a)
        elif saturate == "sat_propagate":
            below_bits = tf.where(a == uint_constant(c.inf_bits, c), quiet_nan,
                                  tf.zeros_like(a))
        else:
            below_bits = quiet_nan
        out = tf.where(below, below_bits, out)
    out = tf.where(is_nan, nan_bits, out)
    return tf.bitcast(out, x.dtype)


def _overflow_bits(a, sign, fmt, rounding, saturate, c):
    """The magnitude of an element whose rounding overflows `fmt` (`a` its magnitude
    bits): the largest finite value where `saturate` or the rounding's direction says
    so, else an infinity, a NaN or max as the format has them."""
    max_bits = tf.bitcast(tf.constant(fmt.max, c.dtype), c.uint)
    if saturate is True or fmt.specials == "finite":
        overflow_bits = max_bits
    elif fmt.has_inf:
        overflow_bits = uint_constant(c.inf_bits, c)
    else:
        overflow_bits = uint_constant(c.inf_bits | 1 << (c.mantissa - 1), c)  # quiet NaN
    # A finite overflow gives max under sat_propagate, and where the rounding goes toward
    # zero (IEEE 754 §7.4).
    if saturate == "sat_propagate" or rounding.mode == "toward_zero":
        to_max = True
    elif rounding.mode in ("toward_positive", "toward_negative"):
        to_max = (sign != 0) if rounding.mode == "toward_positive" else (sign == 0)
    else:
        return overflow_bits
    return tf.where((a != uint_constant(c.inf_bits, c)) & to_max, max_bits, overflow_bits)


def quantize_fixed(x, exponent, inner, bits, rounding, saturate, seed, rand=None):
    """Rounds `x` to multiples of `2^exponent[j]`, j = (flat index // inner) % len.

    `exponent` (int32, shape [n]) is the shared exponent of each slice; it is chosen
    by the caller so that no finite element overflows `bits`-bit mantissas. `rand` as in
    `quantize_float`.
    """
    c = CONTAINERS[x.dtype]
    shape = tf.shape(x)
    if exponent.shape.num_elements() == 1:
        k = tf.reshape(exponent, [])  # per tensor: one exponent, broadcast
    else:
        index = tf.range(tf.reduce_prod(tf.cast(shape, tf.int64)), dtype=tf.int64)
        slot = (index // tf.cast(inner, tf.int64)) % tf.cast(tf.size(exponent), tf.int64)
        k = tf.reshape(tf.gather(exponent, slot), shape)
    rounding = roundings.parse(rounding)
    if rounding.stochastic and rand is None:
        rand = rounding_bits(shape, seed, rounding, c, x.shape.num_elements())
    elif rand is not None:
        rand = tf.cast(rand, c.uint)

    sign, a = split_sign(x, c)
    exponent1, sig = exponent_and_significand(a, c)
    s = k + c.exponent_bias + c.mantissa - exponent1
    code = _round_variable(sig, tf.maximum(s, 1), rounding, rand, c, sign)
    # s <= 0: x is already a multiple of 2^k (k at the container's smallest exponent).
    magnitude = tf.where(s > 0, scaled_bits(code, k, c), a)

    is_inf = a == uint_constant(c.inf_bits, c)
    if saturate is True:  # sat_propagate keeps the infinities
        largest = scaled_bits(uint_constant((1 << (bits - 1)) - 1, c), k, c)  # broadcasts
        magnitude = tf.where(is_inf, largest, magnitude)
    else:
        magnitude = tf.where(is_inf, uint_constant(c.inf_bits, c), magnitude)
    is_nan = a > uint_constant(c.inf_bits, c)
    out = tf.where(is_nan, a, magnitude) | sign
    return tf.bitcast(out, x.dtype)


def scaled_bits(code, qe, c):
    """Bits of `code * 2^qe`, exactly, for `qe >= c.min_exponent` (int or int32 tensor).

    Integer arithmetic only: TensorFlow's threads flush subnormal products to zero.
    Below 2^(2 - bias) (subnormals and the first binade) the bits are linear in the
    value; above, the exponent of `float(code)` is offset by `qe`.
    """
    qe = tf.convert_to_tensor(qe, tf.int32)
    limit = tf.maximum(2 - c.exponent_bias - qe, 0)
    linear = code < shl(uint_constant(1, c), limit)
    linear_bits = shl(code, tf.minimum(qe - c.min_exponent, c.width - 1))
    offset = shl(tf.bitcast(tf.cast(qe, tf.int64 if c.width == 64 else tf.int32), c.uint),
                  c.mantissa)
    normal_bits = tf.bitcast(tf.cast(code, c.dtype), c.uint) + offset
    return tf.where(linear, linear_bits, normal_bits)


def shared_exponents(x, fmt, rounding):
    """The shared exponent `E_s` of each slice of `x` for dynamic fixed point.

    Returns `(exponent, inner)`: an int32 vector with one exponent per slice along
    `fmt.axis` (one element when `axis` is None) and the number of consecutive flat
    elements that share a slice index. `E_s = E_max - (bits - 2)`, one more when the
    largest magnitude would round up to `2^(bits-1)`; never below the container's
    smallest subnormal exponent (all values are then exact).
    """
    c = CONTAINERS[x.dtype]
    # max|x| over the finite elements, on the bits: the bits of non-negative floats sort
    # as signed integers, and TF's float reductions flush subnormals to zero.
    signed = tf.int32 if c.width == 32 else tf.int64
    a = tf.bitcast(x, c.uint) & tf.constant((1 << (c.width - 1)) - 1, c.uint)
    finite = tf.bitcast(tf.where(a < c.inf_bits, a, tf.zeros_like(a)), signed)
    if fmt.axis is None:
        largest, inner = tf.reshape(tf.reduce_max(finite), [1]), tf.constant(1, tf.int64)
    else:
        rank = x.shape.rank
        if rank is None:
            raise ValueError("DynamicFixedPoint with an axis needs a tensor of known rank")
        if not -rank <= fmt.axis < rank:
            raise ValueError(f"axis {fmt.axis} is out of range for a tensor of rank {rank}")
        axis = fmt.axis % rank
        others = [i for i in range(rank) if i != axis]
        largest = tf.reduce_max(finite, axis=others) if others else finite
        inner = tf.reduce_prod(tf.shape(x, out_type=tf.int64)[axis + 1:])
    # An empty slice reduces to the smallest integer: treat it as all zeros.
    bits = tf.bitcast(tf.maximum(largest, 0), c.uint)
    subnormal = tf.bitwise.right_shift(bits, tf.constant(c.mantissa, c.uint)) == 0
    # A subnormal max|x| is m * 2^(1 - bias - mantissa) with its integer mantissa field m;
    # m converted to a float (exact) has the same significand. (Scaling max|x| up by
    # 2^mantissa instead would read 0: TF flushes subnormals to zero in arithmetic.)
    normalized = tf.where(subnormal, tf.cast(bits, c.dtype), tf.bitcast(bits, c.dtype))
    nbits = tf.bitcast(normalized, c.uint)
    e_max = (tf.cast(tf.bitwise.right_shift(nbits, tf.constant(c.mantissa, c.uint)), tf.int32)
             - c.exponent_bias - tf.where(subnormal, c.exponent_bias - 1 + c.mantissa, 0))
    # The significand of max|x| in [1, 2), times 2^(bits-2): the mantissa it needs.
    one_bits = tf.constant(c.exponent_bias << c.mantissa, c.uint)
    fraction = tf.bitcast(nbits & ((1 << c.mantissa) - 1) | one_bits, c.dtype)
    needed = fraction * 2.0 ** (fmt.bits - 2)
    limit = 2.0 ** (fmt.bits - 1) - 1
    mode = roundings.parse(rounding).mode
    if mode in ("nearest_even", "nearest_away"):
        bump = needed >= limit + 0.5
    elif mode == "toward_zero":
        bump = tf.zeros_like(needed, tf.bool)
    else:  # stochastic and directed: whenever max|x| may round up (whatever its sign)
        bump = needed > limit
    exponent = e_max - (fmt.bits - 2) + tf.cast(bump, tf.int32)
    return tf.maximum(exponent, c.min_exponent), inner


def quantize_dfp(x, fmt, rounding, saturate, seed, rand=None):
    """Dynamic fixed point (`fmt` a DynamicFixedPoint): shared exponents, then rounding."""
    exponent, inner = shared_exponents(x, fmt, rounding)
    return quantize_fixed(x, exponent, inner, fmt.bits, rounding, saturate, seed, rand)
