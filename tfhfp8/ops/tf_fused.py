"""Fused (block-FMA) dot products in TF ops: `tfhfp8.fused_accumulation`'s arithmetic.

All of it is exact in float64: a product of two operands with at most 12 significand
bits has at most 24; a term truncated to `fraction_bits` (<= 40) bits after the binary
point of the group's largest exponent is an integer below 2^(fraction_bits + 2) in
units of `2^(E - fraction_bits)`, and a group's sum of at most 1,025 such integers stays
below 2^53. Powers of two are built from their bits (no `pow`), and every rounding is a
truncation or a half-even rounding of an exactly scaled float64. float32 subnormals
(bfloat16 operands and results share float32's range) convert on their bits: TF's CPU
kernels flush them to zero in a cast.
"""

import tensorflow as tf

from tfhfp8.ops import tf_block

_ZERO_EXPONENT = -126  # MMA-Sim's exponent of a zero operand or accumulator


def _pow2(n):
    """2.0**n in float64, exact, for int32 `n` in [-1022, 1023]."""
    return tf.bitcast(tf.bitwise.left_shift(tf.cast(n + 1023, tf.int64), 52), tf.float64)


def _floor_log2(x):
    """floor(log2|x|) of finite nonzero float64 `x` (normal in float64), int32."""
    bits = tf.bitcast(x, tf.int64)
    biased = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 52), 0x7FF)
    return tf.cast(biased, tf.int32) - 1023


def _exponents(x, min_exponent):
    """MMA-Sim's exponent of each operand or accumulator value (float64 `x`)."""
    safe = tf.where(x == 0, tf.ones_like(x), x)
    return tf.where(x == 0, _ZERO_EXPONENT, tf.maximum(_floor_log2(safe), min_exponent))


def _block_scales(x, block_emax, axis, keepdims=True):
    """The scale exponent s of each OCP MX block (the whole of `axis`) of float64
    values `x`, elements whose largest exponent is `block_emax`: the one the quantizer
    chose, floor(log2(amax)) - `block_emax` (elements round saturating, so the largest
    lies in the element's top binade), -127 (E8M0's least) for an all-zero block or
    below it."""
    amax = tf.reduce_max(tf.abs(x), axis=axis, keepdims=keepdims)
    nonzero = tf.where(amax == 0, tf.ones_like(amax), amax)
    return tf.where(amax == 0, -127, tf.maximum(_floor_log2(nonzero) - block_emax, -127))


def _operand_exponents(x, min_exponent, block_emax, axis):
    """MMA-Sim's exponents of operand values `x` (float64) grouped along `axis`. With
    `block_emax`, each group is one OCP MX block scaled by 2^s (`_block_scales`): an
    element's exponent is its own as an element value plus s."""
    if block_emax is None:
        return _exponents(x, min_exponent)
    s = _block_scales(x, block_emax, axis)
    return _exponents(x * _pow2(-s), min_exponent) + s


def _partial_scales(x, block_emax, block_size, partial_sum_size, axis):
    """The block scale of each partial sum's elements: `x` (float64, groups along
    `axis`) in blocks of `block_size`, each block's scale repeated once per partial sum
    of `partial_sum_size` in it; `axis` then counts partial sums."""
    shape = tf.shape(x)
    blocks = tf.concat([shape[:axis], [-1, block_size], shape[axis + 1:]], 0)
    scales = _block_scales(tf.reshape(x, blocks), block_emax, axis + 1, keepdims=False)
    return tf.repeat(scales, block_size // partial_sum_size, axis=axis)


def round_to_bits(x, mantissa_bits, min_exponent, rounding):
    """Finite float64 `x` rounded to an IEEE-like format of `mantissa_bits` bits whose
    smallest normal exponent is `min_exponent` (largest: `1 - min_exponent`), toward zero
    or to nearest even (half-way to even: `tf.math.round`); beyond the largest finite
    value, inf."""
    safe = tf.where(x == 0, tf.ones_like(x), x)
    quantum = tf.maximum(_floor_log2(safe), min_exponent) - mantissa_bits
    units = x * _pow2(-quantum)
    if rounding == "nearest_even":
        units = tf.math.round(units)
    else:
        units = tf.math.sign(units) * tf.floor(tf.abs(units))
    y = units * _pow2(quantum)
    limit = 2.0 ** (2 - min_exponent)
    return tf.where(tf.abs(y) >= limit, tf.math.sign(y) * float("inf"), y)


def _fuse(c, values, exponents, fraction_bits, output):
    """The fused addition of `c` [B, M, N] and terms `values` [B, M, t, N] of MMA-Sim's
    exponents `exponents`: each truncated at the largest exponent, summed exactly,
    rounded once. Returns (new c, the truncated terms, whether the group is finite)."""
    top = tf.maximum(tf.reduce_max(exponents, axis=2), _exponents(c, -126))  # [B, M, N]
    scale = _pow2(fraction_bits - top)

    def truncated(v, s):
        return tf.math.sign(v) * tf.floor(tf.abs(v) * s)

    terms = truncated(values, scale[:, :, None, :])
    total = tf.reduce_sum(terms, axis=2) + truncated(c, scale)
    exact = round_to_bits(total * _pow2(top - fraction_bits), *output)
    finite = tf.reduce_all(tf.math.is_finite(values), axis=2) & tf.math.is_finite(c)
    special = tf.reduce_sum(values, axis=2) + c                     # NaN or +-inf
    return tf.where(finite, exact, special), terms, finite


def _fused_group(c, a, b, ea, eb, fraction_bits, output):
    """One fused dot-add: `c` [B, M, N] plus the products of `a` [B, M, g] and `b`
    [B, g, N]; (new c, swamped count)."""
    products = a[:, :, :, None] * b[:, None, :, :]                  # [B, M, g, N]
    c, terms, finite = _fuse(c, products, ea[:, :, :, None] + eb[:, None, :, :],
                             fraction_bits, output)
    # Counted where the group is finite (elsewhere the exponents are not those of values).
    lost = (terms == 0) & (products != 0) & finite[:, :, None, :]
    return c, tf.math.count_nonzero(lost, dtype=tf.int64)


def _fused_partial_group(c, a, b, sa, sb, partial_sum_size, fraction_bits, output):
    """One fused dot-add of partial sums (`kind::mxf4nvf4`): `c` [B, M, N] plus, per
    `partial_sum_size` products of MX values `a` [B, M, g] and `b` [B, g, N], their
    exact sum, a term whose exponent is its block scales' `sa` [B, M, p] + `sb` [B, p,
    N] (p = g / partial_sum_size); (new c, nonzero products in partial sums truncated
    to zero)."""
    batch, m, n = tf.shape(a)[0], tf.shape(a)[1], tf.shape(b)[2]
    a4 = tf.reshape(a, [batch, m, -1, partial_sum_size])
    b4 = tf.reshape(b, [batch, -1, partial_sum_size, n])
    # Exact in any order: a partial sum's products share one power of two (its blocks'
    # scales) and are multiples of its 2^-2 of at most 6 x 6.
    sums = tf.einsum("bmpk,bpkn->bmpn", a4, b4)                    # [B, M, p, N]
    c, terms, finite = _fuse(c, sums, sa[:, :, :, None] + sb[:, None, :, :],
                             fraction_bits, output)
    nonzero = tf.einsum("bmpk,bpkn->bmpn", tf.cast(a4 != 0, tf.float64),
                        tf.cast(b4 != 0, tf.float64))
    lost = tf.where((terms == 0) & (sums != 0) & finite[:, :, None, :], nonzero, 0.0)
    return c, tf.cast(tf.reduce_sum(lost), tf.int64)


def fused_matmul(a, b, a_min_exponent, b_min_exponent, group_size, fraction_bits,
                 output_bits, output_min_exponent, output_rounding, chunk_size,
                 a_block_emax=None, b_block_emax=None, block_size=None,
                 partial_sum_size=None):
    """`[B, M, K] @ [B, K, N]` float32 operands (values of the instruction's input types,
    whose minimum normal exponents are `a_min_exponent`, `b_min_exponent`) summed by
    fused dot-adds of `group_size` products; `chunk_size` > 0: promoted into an FP32
    total (nearest even) every `chunk_size` products; `a_block_emax`, `b_block_emax`:
    the operand is OCP MX, one block per group (see `_operand_exponents`), or, with
    `partial_sum_size`, blocks of `block_size` whose products are summed exactly
    `partial_sum_size` at a time first (`_fused_partial_group`). Returns (float32 [B,
    M, N], int64 number of nonzero products truncated to zero)."""
    output = (output_bits, output_min_exponent, output_rounding)
    a, b = tf_block.to_float64(a), tf_block.to_float64(b)
    k = tf.shape(a)[2]
    groups = (k + group_size - 1) // group_size
    pad = groups * group_size - k
    a = tf.pad(a, [[0, 0], [0, 0], [0, pad]])
    b = tf.pad(b, [[0, 0], [0, pad], [0, 0]])
    batch, m, n = tf.shape(a)[0], tf.shape(a)[1], tf.shape(b)[2]
    a = tf.reshape(a, [batch, m, groups, group_size])     # group j: a[:, :, j]
    b = tf.reshape(b, [batch, groups, group_size, n])     # group j: b[:, j]
    if partial_sum_size:
        ea = _partial_scales(a, a_block_emax, block_size, partial_sum_size, axis=3)
        eb = _partial_scales(b, b_block_emax, block_size, partial_sum_size, axis=2)
    else:
        ea = _operand_exponents(a, a_min_exponent, a_block_emax, axis=3)
        eb = _operand_exponents(b, b_min_exponent, b_block_emax, axis=2)
    per_chunk = chunk_size // group_size if chunk_size else groups + 1
    zeros = tf.zeros([batch, m, n], tf.float64)

    def group(c, j):
        operands = (c, tf.gather(a, j, axis=2), tf.gather(b, j, axis=1),
                    tf.gather(ea, j, axis=2), tf.gather(eb, j, axis=1))
        if partial_sum_size:
            return _fused_partial_group(*operands, partial_sum_size, fraction_bits, output)
        return _fused_group(*operands, fraction_bits, output)

    def step(j, c, total, swamped):
        c, lost = group(c, j)
        if chunk_size:
            promote = tf.logical_or((j + 1) % per_chunk == 0, j + 1 == groups)
            summed = total + c
            promoted = round_to_bits(summed, 23, -126, "nearest_even")
            total = tf.where(promote, tf.where(tf.math.is_finite(summed), promoted, summed),
                             total)
            c = tf.where(promote, tf.zeros_like(c), c)
        return j + 1, c, total, swamped + lost

    _, c, total, swamped = tf.while_loop(
        lambda j, *_: j < groups, step,
        [tf.constant(0), zeros, zeros, tf.constant(0, tf.int64)])
    result = total if chunk_size else c
    return tf_block.to_float32(result), swamped
