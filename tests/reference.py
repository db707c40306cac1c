"""An independent, slow, exact reference for the rounding done by `tfhfp8.quantize`.

Written from the definitions of the formats only (the parameters below, IEEE 754 and
ml_dtypes' documented types); it shares no code path with the library:

- The values of a float format are decoded here from its parameters (exponent bits,
  mantissa bits, bias, special-value convention, subnormals) by enumerating every code.
- Rounding is a search in that sorted table with exact (`fractions.Fraction`)
  comparisons, so there is no intermediate format and no double rounding.
- Dynamic fixed point picks the shared exponent from the exact binary exponent of the
  largest finite magnitude.

Conventions (IEEE 754 and ml_dtypes' cast semantics):

- Ties go to the neighbour with the even code (bit pattern), as IEEE round-half-even
  does on encodings. Above `max` the next code, `max_code + 1`, is decoded as if it were
  an ordinary normal number (unbounded exponent range): a value that rounds to it
  overflows. In a format without subnormals the gap (0, min_normal) is a single step
  and its midpoint goes to 0 (0 = 0 * min_normal is the even multiple).
- Overflow with saturate=False: +-inf where the format has inf, NaN where it has only
  NaN, +-max where it has neither (ml_dtypes' 6- and 4-bit types); saturate=True: +-max.
  Infinite inputs follow the same rule.
- Toward zero never increases the magnitude (IEEE 754 §7.4: roundTowardZero carries
  every finite overflow to the largest finite number); only an infinite input can
  produce an infinity or the overflow NaN.
- NaN stays NaN where the format has NaN, or with saturate=True; otherwise (no NaN in
  the format) it becomes a zero of the opposite sign, as ml_dtypes does.
- Signs are kept (-0 stays -0, a negative value that rounds to zero gives -0), except
  in `fnuz` formats, which have no negative zero: there every zero is +0.
"""

import bisect
import functools
import math
from fractions import Fraction

import numpy as np

ROUNDINGS = ("nearest_even", "toward_zero")


class Spec:
    """The parameters of a float format, nothing else."""

    def __init__(self, exponent_bits, mantissa_bits, bias, specials, subnormals=True):
        self.e = int(exponent_bits)
        self.m = int(mantissa_bits)
        self.bias = int(bias)
        self.specials = str(specials)
        self.subnormals = bool(subnormals)
        assert self.specials in ("ieee", "fn", "fnuz", "finite"), self.specials

    @classmethod
    def of(cls, fmt):
        """The parameters of a `tfhfp8.FloatFormat` (its attributes, not its methods)."""
        return cls(fmt.exponent_bits, fmt.mantissa_bits, fmt.bias, fmt.specials,
                   fmt.subnormals)

    def key(self):
        return (self.e, self.m, self.bias, self.specials, self.subnormals)

    def __repr__(self):
        return "Spec(%d, %d, bias=%d, %s, subnormals=%s)" % self.key()

    @property
    def has_inf(self):
        return self.specials == "ieee"

    @property
    def has_nan(self):
        return self.specials != "finite"

    @property
    def unsigned_zero(self):
        return self.specials == "fnuz"

    # -- the value table ----------------------------------------------------------
    def decode_unbounded(self, code):
        """Value of magnitude code `(E << m) | M` read as an ordinary number (exact)."""
        exponent, mantissa = code >> self.m, code & ((1 << self.m) - 1)
        if exponent == 0:
            if not self.subnormals:
                return Fraction(0)
            return Fraction(mantissa, 1 << self.m) * Fraction(2) ** (1 - self.bias)
        return (1 + Fraction(mantissa, 1 << self.m)) * Fraction(2) ** (exponent - self.bias)

    def is_special(self, code):
        """Whether a magnitude code (sign bit clear) is inf or NaN rather than a number."""
        top = (1 << self.e) - 1
        if self.specials == "ieee":
            return code >> self.m == top
        if self.specials == "fn":
            return code == (1 << (self.e + self.m)) - 1
        return False  # fnuz: the NaN is the negative-zero code; finite: no specials

    @property
    def table(self):
        return _table(self.key())

    @property
    def max(self):
        return self.table[0][-1]

    @property
    def max_code(self):
        return self.table[1][-1]


@functools.lru_cache(maxsize=None)
def _table(key):
    """(values, codes, floats): the finite non-negative values ascending, exact.

    Without subnormals every E = 0 code is zero; the table keeps zero once (code 0).
    """
    spec = Spec(*key)
    by_value = {}
    for code in range(1 << (spec.e + spec.m)):
        if spec.is_special(code):
            continue
        value = spec.decode_unbounded(code)
        by_value.setdefault(value, code)  # the smallest code of a value (zero: code 0)
    values = sorted(by_value)
    codes = [by_value[v] for v in values]
    return values, codes, [float(v) for v in values]


def finite_values(spec):
    """The format's finite non-negative values, ascending, as Python floats."""
    return list(spec.table[2])


def _neighbours(a, spec):
    """For a magnitude `a >= 0` (a Python float): (lo, lo_code, hi, hi_code), exact
    Fractions with lo <= a < hi.

    `hi` may be the first value past `max` (code max_code + 1, unbounded). Comparing
    floats is exact, and every value of the table is a float, so the search is exact."""
    values, codes, floats = spec.table
    i = bisect.bisect_right(floats, a) - 1
    lo, lo_code = values[i], codes[i]
    if i + 1 < len(values):
        return lo, lo_code, values[i + 1], codes[i + 1]
    return lo, lo_code, spec.decode_unbounded(spec.max_code + 1), spec.max_code + 1


def _sign_of(x):
    return math.copysign(1.0, x) < 0


def _finish(magnitude, negative, spec, saturate, overflow):
    """Applies the overflow and signed-zero rules to an exact rounded magnitude."""
    if overflow:
        if saturate or spec.specials == "finite":
            magnitude = spec.max
        elif spec.has_inf:
            return -math.inf if negative else math.inf
        else:
            return math.nan
    value = float(magnitude)
    if value == 0.0 and spec.unsigned_zero:
        return 0.0
    return -value if negative else value


def _nan_result(x, spec, saturate):
    if spec.has_nan or saturate:
        return math.nan
    return 0.0 if _sign_of(x) else -0.0  # ml_dtypes: NaN -> zero of the opposite sign


def round_value(x, spec, rounding="nearest_even", saturate=False):
    """`x` (a Python float: float16/32/64 values are all exact in it) rounded to `spec`."""
    x = float(x)
    negative = _sign_of(x)
    if math.isnan(x):
        return _nan_result(x, spec, saturate)
    if math.isinf(x):
        return _finish(None, negative, spec, saturate, overflow=True)
    a = abs(Fraction(x))
    lo, lo_code, hi, hi_code = _neighbours(abs(x), spec)
    if rounding == "toward_zero":
        return _finish(lo, negative, spec, saturate, overflow=False)
    if rounding != "nearest_even":
        raise ValueError(rounding)
    if a == lo:
        result, code = lo, lo_code
    elif a - lo < hi - a:
        result, code = lo, lo_code
    elif a - lo > hi - a:
        result, code = hi, hi_code
    elif lo == 0 and not spec.subnormals:
        result, code = lo, lo_code  # the one-step gap below min_normal: tie -> 0
    else:
        result, code = (lo, lo_code) if lo_code % 2 == 0 else (hi, hi_code)
    return _finish(result, negative, spec, saturate, overflow=code > spec.max_code)


def stochastic(x, spec, saturate=False):
    """Stochastic rounding of `x`: (down, up, P(up)) with P(up) a Fraction.

    `down` and `up` are the results (rules applied) of rounding the magnitude down or up;
    P(up) = (|x| - lo) / (hi - lo). Exact values have P(up) = 0."""
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        r = round_value(x, spec, "nearest_even", saturate)
        return r, r, Fraction(0)
    negative = _sign_of(x)
    a = abs(Fraction(x))
    lo, lo_code, hi, hi_code = _neighbours(abs(x), spec)
    down = _finish(lo, negative, spec, saturate, overflow=False)
    up = _finish(hi, negative, spec, saturate, overflow=hi_code > spec.max_code)
    return down, up, (a - lo) / (hi - lo)


def round_array(xs, spec, rounding="nearest_even", saturate=False):
    """`round_value` over a numpy array; returns float64 (exact for every format)."""
    xs = np.asarray(xs)
    flat = [round_value(float(v), spec, rounding, saturate) for v in xs.ravel()]
    return np.array(flat, dtype=np.float64).reshape(xs.shape)


# ---------------------------------------------------------------------------------
# Dynamic fixed point.

def exact_exponent(a):
    """floor(log2(a)) of a positive Fraction, exactly."""
    a = Fraction(a)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    assert Fraction(2) ** e <= a < Fraction(2) ** (e + 1)
    return e


def _round_integer(q, rounding):
    """An exact rational rounded to an integer."""
    floor = q.numerator // q.denominator
    if rounding == "toward_zero":
        return floor if q >= 0 else -((-q.numerator) // q.denominator)
    frac = q - floor
    if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and floor % 2 == 1):
        return floor + 1
    return floor


def dfp_exponent(values, bits=16, rounding="nearest_even", min_exponent=-149):
    """The shared exponent E_s of one slice (an iterable of Python floats).

    E_s = E_max - (bits - 2), E_max the exponent of the largest finite magnitude; one
    more when that magnitude would round (stochastic: could round) to 2^(bits - 1).
    Never below `min_exponent` (the container's smallest subnormal exponent, where all
    values are exact anyway); a slice with no non-zero finite value (E_max = -inf) gets
    `min_exponent`."""
    finite = [abs(Fraction(v)) for v in values if math.isfinite(v)]
    largest = max(finite, default=Fraction(0))
    if largest == 0:
        return min_exponent
    e_s = exact_exponent(largest) - (bits - 2)
    scaled = largest / Fraction(2) ** e_s
    limit = (1 << (bits - 1)) - 1
    if rounding == "nearest_even":
        needed = _round_integer(scaled, "nearest_even")
    elif rounding == "stochastic":
        needed = math.ceil(scaled)
    else:
        needed = _round_integer(scaled, "toward_zero")
    if needed > limit:
        e_s += 1
    return max(e_s, min_exponent)


def dfp_round(x, e_s, bits=16, rounding="nearest_even", saturate=False):
    """One element rounded to a multiple of 2^e_s (nearest-even or toward zero)."""
    x = float(x)
    if math.isnan(x):
        return math.nan
    if math.isinf(x):
        if saturate:
            return math.copysign(float(((1 << (bits - 1)) - 1) * Fraction(2) ** e_s), x)
        return x
    i = _round_integer(Fraction(x) / Fraction(2) ** e_s, rounding)
    return math.copysign(float(i * Fraction(2) ** e_s), x)


def dfp_stochastic(x, e_s):
    """(down, up, P(up)) for stochastic rounding of a finite `x` to multiples of 2^e_s."""
    q = abs(Fraction(float(x))) / Fraction(2) ** e_s
    floor = q.numerator // q.denominator
    step = Fraction(2) ** e_s
    sign = -1.0 if _sign_of(x) else 1.0
    return (math.copysign(float(floor * step), sign),
            math.copysign(float((floor + 1) * step), sign), q - floor)


def dfp_reference(x, bits=16, axis=None, rounding="nearest_even", saturate=False,
                  min_exponent=-149):
    """DFP of a numpy array: (rounded float64 array, exponents per slice).

    `axis=None`: one exponent for the tensor; else one per index along `axis`."""
    x = np.asarray(x)
    if axis is None:
        slices = [x.reshape(1, -1)]
        moved = x.reshape(1, -1)
    else:
        moved = np.moveaxis(x, axis, 0)
        slices = [moved[i].reshape(1, -1) for i in range(moved.shape[0])]
    out = np.empty(moved.shape, np.float64)
    exponents = []
    for i, s in enumerate(slices):
        flat = [float(v) for v in s.ravel()]
        e_s = dfp_exponent(flat, bits, rounding, min_exponent)
        exponents.append(e_s)
        rounded = [dfp_round(v, e_s, bits, rounding, saturate) for v in flat]
        if axis is None:
            out = np.array(rounded, np.float64).reshape(x.shape)
        else:
            out[i] = np.array(rounded, np.float64).reshape(moved.shape[1:])
    if axis is not None:
        out = np.moveaxis(out, 0, axis)
    return out, exponents
