"""The reference of tests/test_p3109.py: gfloat's rounding, tfhfp8's rule for negative
inputs of unsigned formats, and the inputs that test them.

The oracle is `gfloat.round_ndarray`, gfloat's vectorised `round_float` (one Python call
per element would make the tests minutes long; test_p3109.py checks that the two agree on
these inputs). gfloat rounds negative inputs of unsigned formats to garbage: those follow
tfhfp8's rule (`unsigned_negative`), written here from its definition with exact
fractions.
"""

import functools
import math
import re
import zlib
from fractions import Fraction

import gfloat
import gfloat.formats as gf
import numpy as np
import tensorflow as tf
from gfloat.types import Domain, RoundMode, Signedness

from tfhfp8 import formats, quantization
from tfhfp8.formats import roundings
from tfhfp8.ops import tf_backend

# Formats outside P3109, as gfloat describes them.
OTHERS = {"float8_e4m3fn": gf.format_info_ocp_e4m3, "float8_e5m2": gf.format_info_ocp_e5m2,
          "bfloat16": gf.format_info_bfloat16}
GF_MODE = {"nearest_even": RoundMode.TiesToEven, "nearest_away": RoundMode.TiesToAway,
           "toward_zero": RoundMode.TowardZero, "toward_positive": RoundMode.TowardPositive,
           "toward_negative": RoundMode.TowardNegative, "stochastic": RoundMode.Stochastic,
           "stochastic_odd": RoundMode.StochasticOdd,
           "stochastic_fast": RoundMode.StochasticFast}
THRESHOLD_INPUTS = 400  # per r-bit case, after the shared inputs


def p3109_args(name):
    """(k, precision, signed, domain) of a P3109 format name, as FloatFormat.p3109 takes."""
    k, p, sign, domain = re.fullmatch(r"p3109_k(\d)p(\d)([su])([ef])", name).groups()
    return int(k), int(p), sign == "s", "extended" if domain == "e" else "finite"


def gfloat_info(name):
    """gfloat's FormatInfo of a tfhfp8 format name."""
    if name in OTHERS:
        return OTHERS[name]
    k, p, signed, domain = p3109_args(name)
    return gf.format_info_p3109(k, p, Signedness.Signed if signed else Signedness.Unsigned,
                                Domain.Extended if domain == "extended" else Domain.Finite)


# -- inputs ---------------------------------------------------------------------------
@functools.cache
def _grid(name):
    """(lows, highs): values of the format (all, or a sample of bfloat16's) with the next
    code's value above each (above max: the next code decoded as an ordinary number)."""
    fmt = formats.get(name)
    values = fmt.values()
    upper = np.append(values[1:], fmt.decode(fmt.max_code + 1))
    if len(values) > 512:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        n = len(values)
        pick = np.unique(np.concatenate([np.arange(48), np.arange(n - 48, n),
                                         rng.choice(n, 256, replace=False)]))
        values, upper = values[pick], upper[pick]
    return values, upper


def _gaps(name):
    """(low, gap) rows of a few gaps: the first subnormal one, one near 1, the one below
    max and the one above it (where rounding up overflows)."""
    lows, highs = _grid(name)
    middle = min(int(np.searchsorted(lows, 1.0)), len(lows) - 1)
    rows = [(lows[i], highs[i] - lows[i]) for i in (0, 1, middle, -2, -1)]
    return np.array(rows)


@functools.cache
def signed_inputs(name):
    """The shared float32 inputs of a format, both signs."""
    fmt = formats.get(name)
    lows, highs = _grid(name)
    mids = ((lows + highs) / 2).astype(np.float32)
    gaps = _gaps(name)
    fractions = (gaps[:, :1] + gaps[:, 1:] * np.arange(1, 16) / 16).ravel()
    tiny = fmt.min_subnormal * np.array([2.0 ** -30, 0.25, 0.5, 0.75, 1.5])
    rng = np.random.default_rng(zlib.crc32(name.encode()) + 1)
    log_range = np.log2([fmt.min_subnormal / 8, fmt.max * 4])
    randoms = np.exp2(rng.uniform(*log_range, 300))
    top = highs[-1] * np.array([1.0, 1.5, 2.0])
    with np.errstate(over="ignore"):  # bfloat16's next code above max: inf in float32
        magnitudes = np.concatenate([
            lows, mids, np.nextafter(mids, np.float32(0)),
            np.nextafter(mids, np.float32(np.inf)),
            fractions, tiny, randoms, top, [2.0 ** -149, 2.0 ** -126, 3.4e38, np.inf],
        ]).astype(np.float32)
    magnitudes = np.unique(magnitudes)
    return np.concatenate([magnitudes, -magnitudes, [np.nan]]).astype(np.float32)


def threshold_inputs(name, r, bits, dtype=np.float32):
    """One input per element of `bits`: low + gap * t / 2^r with t one step, half a step,
    zero or minus half a step below 2^r - bits (mod 2^r), where the bits start to round
    the element away from zero; over a few gaps, with random signs. (In float32, ties of
    more than 15 bits cannot occur in bfloat16: there it takes float64 inputs.)"""
    gaps = _gaps(name)
    index = np.arange(len(bits))
    offset = np.array([-1.0, -0.5, 0.0, 0.5])[index // len(gaps) % 4]
    steps = np.mod(2.0 ** r - bits + offset, 2.0 ** r)
    low, gap = gaps[index % len(gaps)].T
    signs = np.random.default_rng(r).choice([-1.0, 1.0], len(bits))
    with np.errstate(over="ignore"):
        return (signs * (low + gap * steps / 2.0 ** r)).astype(dtype)


def r_bit_inputs(name, rounding, draw_bits, dtype=np.float32):
    """(x, bits): the shared inputs and threshold inputs, and each element's random bits
    (`draw_bits(n)`: n of them, as the rounding will see them)."""
    r = roundings.parse(rounding).random_bits
    base = signed_inputs(name).astype(dtype)
    bits = draw_bits(len(base) + THRESHOLD_INPUTS)
    x = np.concatenate([base, threshold_inputs(name, r, bits[len(base):], dtype)])
    return x, bits


def hash_bits(n, seed, r, dtype=np.float32):
    """The r random bits tfhfp8 draws for the elements 0..n-1 of a float32 (float64)
    tensor: the top r bits of the hash word(s) of the seed and the flat index."""
    c = tf_backend.CONTAINERS[tf.as_dtype(dtype)]
    words = tf_backend.random_bits(tf.constant([n]), quantization.seed_tensor(seed), c)
    return (words.numpy() >> (c.width - r)).astype(np.int64)


def seed_of(*parts):
    """A reproducible integer seed for a test case."""
    return zlib.crc32("-".join(map(str, parts)).encode())


# -- the reference --------------------------------------------------------------------
def expected(name, x, rounding, overflow, bits=None):
    """gfloat's rounding of the inputs `x` (in their dtype), `bits` gfloat's srbits;
    negative inputs of unsigned formats by `unsigned_negative`."""
    info, parsed = gfloat_info(name), roundings.parse(rounding)
    x64 = x.astype(np.float64)
    srbits = None if bits is None else np.asarray(bits, np.int64)

    def run(sat):
        with np.errstate(all="ignore"):
            return gfloat.round_ndarray(info, x64, GF_MODE[parsed.mode], sat, srbits,
                                        parsed.random_bits or 0)

    if overflow == "sat_propagate":  # gfloat's sat=True for finite inputs only
        y = np.where(np.isinf(x64), run(False), run(True))
    else:
        y = run(overflow == "sat_finite")
    with np.errstate(over="ignore"):  # gfloat's garbage for negatives of unsigned formats
        y = y.astype(x.dtype)
    if not info.is_signed:
        negative = np.signbit(x) & ~np.isnan(x)
        y[negative] = unsigned_negative(name, x[negative], parsed, overflow,
                                        None if bits is None else srbits[negative])
    return y


def _rounds_to_nonzero(fmt, magnitude, parsed, bits):
    """Whether a magnitude rounds to nonzero, with the direction `parsed` has for a
    negative value (exact: below the smallest subnormal only the fraction matters)."""
    if magnitude == 0 or magnitude >= fmt.min_subnormal:
        return magnitude != 0
    delta = Fraction(magnitude) / Fraction(fmt.min_subnormal)
    mode, r = parsed.mode, parsed.random_bits
    if mode in ("toward_zero", "toward_positive", "toward_negative"):
        return mode == "toward_negative"  # away from zero for a negative value
    if mode in ("nearest_even", "nearest_away"):
        return delta > Fraction(1, 2) or (mode == "nearest_away" and delta == Fraction(1, 2))
    if mode == "stochastic_fast":
        return delta + (bits + Fraction(1, 2)) / 2 ** r >= 1
    scaled = delta * 2 ** r
    floor = math.floor(scaled)
    tie_up = floor % 2 == (1 if mode == "stochastic" else 0)  # to even / to odd
    rest = scaled - floor
    rounded = floor + (rest > Fraction(1, 2) or (rest == Fraction(1, 2) and tie_up))
    return rounded + bits >= 2 ** r


def unsigned_negative(name, x, parsed, overflow, bits):
    """tfhfp8's rule for negative inputs of an unsigned format: a magnitude that rounds
    to nonzero is out of range: NaN (ovf_inf), 0 (sat_finite), 0 when finite and NaN for
    -inf (sat_propagate); the others (and -0) give +0."""
    fmt = formats.get(name)
    out = np.zeros(len(x), x.dtype)
    for i, value in enumerate(x):
        magnitude = -float(value)
        if _rounds_to_nonzero(fmt, magnitude, parsed, None if bits is None else int(bits[i])):
            nan = overflow == "ovf_inf" or (
                overflow == "sat_propagate" and math.isinf(magnitude))
            out[i] = np.nan if nan else 0.0
    return out
