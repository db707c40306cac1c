"""An independent, slow, exact reference for emulated accumulation (tfhfp8.Accumulator).

Written from the definition (the Accumulator docstring and
/work/helpers/accumulation-interface.md), sharing no code with the library:

- sums are exact rationals (`fractions.Fraction`); for `nearest_even` and
  `toward_zero` the exact sum is rounded ONCE to the accumulator format (no float32
  step at all: this also checks the round-to-odd argument the kernels rely on);
- for `stochastic`, the exact sum is rounded to float32 with round-to-odd (here, from
  the rational), then up or down with probability given by the 32 random bits of the
  counter-based hash (re-implemented below from its constants): up iff
  `rand < floor(P(up) * 2^32)`, which is how quantize compares its random word with the
  dropped bits;
- format values come from `reference.Spec` (every code decoded from the parameters);
- INT32: numpy int64 arithmetic, wrapped or clamped after every addition.
"""

import bisect
import math
from fractions import Fraction

import numpy as np

import reference as R

FLT_MAX = float(np.finfo(np.float32).max)
_M32 = 0xFFFFFFFF


# -- the counter-based hash (lowbias32), from its published constants ------------------

def _mix32(x):
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def keys(seed):
    s = seed & 0xFFFFFFFFFFFFFFFF
    key0 = _mix32((s & _M32) ^ _mix32((s >> 32) ^ 0x2545F491))
    return key0, _mix32(key0 ^ 0x68E31DA4)


def random32(index, key):
    lo, hi = index & _M32, (index >> 32) & _M32
    return _mix32(((lo * 0x9E3779B9) & _M32) ^ ((hi * 0x85EBCA77) & _M32) ^ key[0])


# -- rounding rationals ---------------------------------------------------------------

def round_to_odd32(q):
    """The float32 round-to-odd of a nonzero rational (finite overflow: +-FLT_MAX)."""
    negative, a = q < 0, abs(q)
    e = R.exact_exponent(a)
    if e > 127:
        value = Fraction(FLT_MAX)
    else:
        quantum = Fraction(2) ** (max(e, -126) - 23)
        n = a.numerator * quantum.denominator // (a.denominator * quantum.numerator)
        if n * quantum != a and n % 2 == 0:
            n += 1
        value = n * quantum
    return -float(value) if negative else float(value)


def _neighbours(a, spec):
    """(lo, lo_code, hi, hi_code) around a rational magnitude a >= 0, lo <= a < hi."""
    values, codes, _ = spec.table
    i = bisect.bisect_right(values, a) - 1
    if i + 1 < len(values):
        return values[i], codes[i], values[i + 1], codes[i + 1]
    return values[i], codes[i], spec.decode_unbounded(spec.max_code + 1), spec.max_code + 1


def _finish(magnitude, code, negative, spec, saturate):
    return R._finish(magnitude, negative, spec, saturate, overflow=code > spec.max_code)


def round_rational(q, negative, spec, rounding, saturate):
    """A nonzero rational q rounded once to `spec` (nearest even or toward zero)."""
    a = abs(q)
    lo, lo_code, hi, hi_code = _neighbours(a, spec)
    if a == lo:
        return _finish(lo, lo_code, negative, spec, saturate)
    if rounding == "toward_zero":  # never grows: beyond max, max (IEEE 754 7.4)
        return R._finish(lo, negative, spec, saturate, overflow=False)
    tie = a - lo == hi - a
    if a - lo < hi - a or (tie and ((lo == 0 and not spec.subnormals) or lo_code % 2 == 0)):
        return _finish(lo, lo_code, negative, spec, saturate)
    return _finish(hi, hi_code, negative, spec, saturate)


def round_float(x, spec, rounding, saturate, rand):
    """quantize of a float32 value x (a Python float) to `spec`."""
    if rounding != "stochastic":
        return R.round_value(x, spec, rounding, saturate)
    down, up, p_up = R.stochastic(x, spec, saturate)
    return up if rand < math.floor(p_up * 2**32) else down


def add(acc, p, spec, rounding, saturate, rand):
    """One addition of the accumulator: acc + p rounded once to `spec`."""
    if not (math.isfinite(acc) and math.isfinite(p)):
        return round_float(acc + p, spec, rounding, saturate, rand)  # inf/NaN rules
    q = Fraction(acc) + Fraction(p)
    if q == 0:  # IEEE: an exact zero sum is +0 unless both terms are -0
        zero = -0.0 if math.copysign(1, acc) < 0 and math.copysign(1, p) < 0 else 0.0
        return round_float(zero, spec, rounding, saturate, rand)
    if rounding == "stochastic":
        return round_float(round_to_odd32(q), spec, rounding, saturate, rand)
    return round_rational(q, q < 0, spec, rounding, saturate)


def float_matmul(a, b, acc, seed=0, first_index=0):
    """(c, swamped) for float32 a [M, K], b [K, N] and a float `tfhfp8.Accumulator`
    (read through its attributes only); c as float32."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    m, k = a.shape
    n = b.shape[1]
    inner, outer = R.Spec.of(acc.format), R.Spec.of(acc.outer)
    products = R.Spec.of(acc.products) if acc.products is not None else None
    rounding, saturate = acc.rounding, acc.saturate
    chunk = acc.chunk_size if acc.chunk_size and acc.chunk_size < k else max(k, 1)
    num_chunks = -(-k // chunk)
    keys_inner, keys_outer, keys_products = keys(seed), keys(seed + 1), keys(seed + 2)
    stochastic = rounding == "stochastic"
    c = np.zeros((m, n), np.float32)
    swamped = 0
    for i in range(m):
        for j in range(n):
            o = first_index + i * n + j
            total = 0.0
            sum_ = 0.0
            for ci in range(num_chunks):
                sum_ = 0.0
                for kk in range(ci * chunk, min(k, (ci + 1) * chunk)):
                    p = float(a[i, kk] * b[kk, j])  # float32 product (exact by the contract)
                    if products is not None:
                        rand = random32(o * k + kk, keys_products) if stochastic else 0
                        p = round_float(p, products, rounding, saturate, rand)
                    rand = random32(o * k + kk, keys_inner) if stochastic else 0
                    new = add(sum_, p, inner, rounding, saturate, rand)
                    if p != 0 and new == sum_:
                        swamped += 1
                    sum_ = new
                if num_chunks > 1:
                    rand = random32(o * num_chunks + ci, keys_outer) if stochastic else 0
                    total = add(total, sum_, outer, rounding, saturate, rand)
            c[i, j] = total if num_chunks > 1 else sum_
    return c, swamped


def int32_matmul(a, b, chunk_size=None, overflow="wrap"):
    """(c float32, overflows) of the INT32 accumulator, for integer a [M, K], b [K, N]."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    k = a.shape[1]
    low, high = -(2**31), 2**31 - 1
    acc = np.zeros((a.shape[0], b.shape[1]), np.int64)
    total = np.zeros(acc.shape, np.float32)
    overflows = 0
    for kk in range(k):
        s = acc + a[:, kk, None] * b[None, kk, :]
        out = (s < low) | (s > high)
        overflows += int(out.sum())
        acc = ((s - low) % 2**32 + low) if overflow == "wrap" else np.clip(s, low, high)
        if chunk_size and chunk_size < k and ((kk + 1) % chunk_size == 0 or kk + 1 == k):
            total = total + acc.astype(np.int32).astype(np.float32)
            acc = np.zeros_like(acc)
    if chunk_size and chunk_size < k:
        return total, overflows
    return acc.astype(np.int32).astype(np.float32), overflows
