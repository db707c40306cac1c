"""An exact reference of the fused (block-FMA) dot product, from its definition
(tfhfp8.fused_accumulation's docstring; Khattak & Mikaitis 2025, MMA-Sim), in Python
fractions: one output element at a time, nothing shared with the code under test."""

import math
from fractions import Fraction

ZERO_EXPONENT = -126
OUTPUTS = {"float32": (23, -126, "toward_zero"), "e8m13": (13, -126, "toward_zero"),
           "float16": (10, -14, "nearest_even")}


def floor_log2(value):
    """floor(log2 value) of a positive Fraction."""
    e = value.numerator.bit_length() - value.denominator.bit_length()
    return e - 1 if Fraction(2) ** e > value else e


def exponent(x, min_exponent):
    """MMA-Sim's exponent of an operand (or, with -126, of the accumulator)."""
    if x == 0:
        return ZERO_EXPONENT
    return max(floor_log2(abs(Fraction(x))), min_exponent)


def round_to(value, bits, min_exponent, rounding):
    """The Fraction `value` in a format of `bits` mantissa bits, minimum normal exponent
    `min_exponent`, rounded toward zero or to nearest even; beyond its range: inf."""
    if value == 0:
        return 0.0
    quantum = Fraction(2) ** (max(floor_log2(abs(value)), min_exponent) - bits)
    units = value / quantum
    n = math.trunc(units) if rounding == "toward_zero" else round(units)  # half to even
    result = n * quantum
    if abs(result) >= Fraction(2) ** (2 - min_exponent):
        return math.copysign(math.inf, value)
    return float(result)


def fused_dot(a, b, group_size, fraction_bits, output="float32", chunk_size=None,
              a_min_exponent=-126, b_min_exponent=-126, a_scales=None, b_scales=None,
              partial_sum_size=None, block_size=None):
    """sum_k a[k] b[k] (Python floats) as the fused accumulator computes it; with
    `a_scales` (and `b_scales`), `a[k]` is an element of a block-scaled operand whose
    value is `a[k] * 2**a_scales[k // block_size]` (`block_size`: the group's by
    default; blocks past the given scales: -127, E8M0's least). With
    `partial_sum_size`, each run of that many products is summed exactly first, one
    term whose exponent is the sum of its two blocks' scale exponents (Blackwell's
    kind::mxf4nvf4, as MMA-Sim's `nv_fused_dot_add_with_block_scale` defines it)."""
    k = len(a)
    groups = max(1, -(-k // group_size)) if k else 0
    a = list(a) + [0.0] * (groups * group_size - k)
    b = list(b) + [0.0] * (groups * group_size - k)
    block_size = block_size or group_size
    blocks = groups * group_size // block_size if groups else 0
    a_scales = list(a_scales or [0] * blocks) + [-127] * blocks
    b_scales = list(b_scales or [0] * blocks) + [-127] * blocks
    c, total = 0.0, 0.0
    for g in range(groups):
        start = g * group_size
        pairs = list(zip(a[start:start + group_size], b[start:start + group_size]))
        products = [x * y for x, y in pairs]  # exact: at most 24 significand bits
        if not all(math.isfinite(p) for p in products + [c]):
            c = sum(products) + c  # NaN or +-inf, whatever the order
        else:
            if partial_sum_size:
                terms = _partial_sums(pairs, start, partial_sum_size, block_size, a_scales,
                                      b_scales)
            else:
                scale = a_scales[start // block_size] + b_scales[start // block_size]
                terms = [(Fraction(x) * Fraction(y) * Fraction(2) ** scale,
                          exponent(x, a_min_exponent) + exponent(y, b_min_exponent) + scale)
                         for x, y in pairs]
            terms.append((Fraction(c), exponent(c, -126)))
            unit = Fraction(2) ** (max(e for _, e in terms) - fraction_bits)
            exact = sum(math.trunc(v / unit) for v, _ in terms) * unit
            c = round_to(exact, *OUTPUTS[output])
        if chunk_size and ((g + 1) % (chunk_size // group_size) == 0 or g + 1 == groups):
            if math.isfinite(total) and math.isfinite(c):
                total = round_to(Fraction(total) + Fraction(c), 23, -126, "nearest_even")
            else:
                total = total + c
            c = 0.0
    return total if chunk_size else c


def _partial_sums(pairs, start, size, block_size, a_scales, b_scales):
    """(value, exponent) terms of one group (`pairs` from element `start` on): the exact
    sum of each `size` products, scaled by its blocks, with their scales' exponents."""
    terms = []
    for p in range(0, len(pairs), size):
        block = (start + p) // block_size
        scale = a_scales[block] + b_scales[block]
        exact = sum(Fraction(x) * Fraction(y) for x, y in pairs[p:p + size])
        terms.append((exact * Fraction(2) ** scale, scale))
    return terms
