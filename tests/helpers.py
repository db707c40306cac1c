"""Small helpers shared by the quantize tests (numpy references, bit comparisons)."""

import ml_dtypes
import numpy as np
import tensorflow as tf

import tfhfp8
from tfhfp8 import formats

# The named float formats that ml_dtypes (or numpy) also has: the oracle of these tests.
# (float16_e6m9 has none; tests/test_optimizers.py checks it against tests/reference.py.)
FLOAT_NAMES = [n for n in formats.names() if isinstance(formats.get(n), tfhfp8.FloatFormat)
               and (formats.get(n).name == "float16" or hasattr(ml_dtypes, formats.get(n).name))]

_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def np_type(fmt):
    """The numpy / ml_dtypes scalar type of a named float format."""
    name = formats.get(fmt).name
    return np.float16 if name == "float16" else getattr(ml_dtypes, name)


def ml_cast(x, fmt):
    """ml_dtypes' cast `x.astype(fmt).astype(x.dtype)` (the saturate=False reference)."""
    with np.errstate(all="ignore"):
        return x.astype(np_type(fmt)).astype(x.dtype)


def quantize_np(x, fmt, **kwargs):
    """tfhfp8.quantize on a numpy array, back as numpy (same dtype)."""
    y = tfhfp8.quantize(tf.constant(x), fmt, **kwargs)
    assert y.dtype == tf.as_dtype(x.dtype)
    return y.numpy()


def bits_of(a):
    a = np.asarray(a)
    return a.view(_UINT[a.dtype.itemsize])


def mismatches(got, expected):
    """Boolean mask of elements whose bits differ (two NaNs are equal, payload aside)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape and got.dtype == expected.dtype, (
        got.shape, expected.shape, got.dtype, expected.dtype)
    with np.errstate(invalid="ignore"):
        nan_got = np.isnan(got.astype(np.float64))
        nan_expected = np.isnan(expected.astype(np.float64))
    return (nan_got != nan_expected) | (~nan_got & (bits_of(got) != bits_of(expected)))


def assert_same_bits(got, expected, x, what=""):
    """Bit-exact comparison with a readable report of the first mismatches."""
    bad = mismatches(got, expected)
    if bad.any():
        x = np.asarray(x)
        idx = np.flatnonzero(bad.ravel())[:12]
        lines = [
            "  x=%r (bits 0x%x): expected %r (0x%x), got %r (0x%x)" % (
                float(x.ravel()[i]), int(bits_of(x).ravel()[i]),
                float(np.asarray(expected).ravel()[i]), int(bits_of(expected).ravel()[i]),
                float(np.asarray(got).ravel()[i]), int(bits_of(got).ravel()[i]))
            for i in idx]
        raise AssertionError("%s: %d of %d elements differ\n%s" % (
            what, int(bad.sum()), bad.size, "\n".join(lines)))


def float64_to_float32_round_to_odd(x):
    """float64 -> float32 rounding to odd (truncate, set the last bit when inexact).

    Rounding to odd into a format with at least two more bits of precision than the
    target, then rounding once to the target, equals rounding once directly
    (Boldo & Melquiond). float32 has 24 bits, every format here at most 11 (bfloat16 8)
    and their subnormals lie inside float32's normal or fine subnormal grid, so
    `ml_cast(round_to_odd(x))` is an exact float64 reference, unlike ml_dtypes' own
    float64 cast, which rounds to float32 first (double rounding)."""
    x = np.asarray(x, np.float64)
    with np.errstate(all="ignore"):
        y = x.astype(np.float32)
        toward = np.abs(y.astype(np.float64)) > np.abs(x)  # RNE went up: step back
        y = np.where(toward, np.nextafter(y, np.float32(0)), y)
        inexact = (y.astype(np.float64) != x) & np.isfinite(x)
    return (y.view(np.uint32) | inexact.astype(np.uint32)).view(np.float32)


def exact_float64_cast(x, fmt):
    """Exact float64 -> fmt -> float64 (saturate=False semantics)."""
    return ml_cast(float64_to_float32_round_to_odd(x), fmt).astype(np.float64)


def format_values(fmt):
    """All finite non-negative values of a named format, from ml_dtypes' bit patterns."""
    dtype = np.dtype(np_type(fmt))
    if dtype.itemsize == 2:
        codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(dtype)
    else:
        codes = np.arange(1 << ml_dtypes.finfo(dtype).bits, dtype=np.uint16)
        codes = codes.astype(np.uint8).view(dtype)
    with np.errstate(invalid="ignore"):
        v = codes.astype(np.float64)
    return np.unique(v[np.isfinite(v) & (v >= 0)])


def current_scaling_reference(x, element, maximum, margin=0):
    """Per-tensor current scaling (`e4m3_current` and the like) in numpy float32 (IEEE,
    subnormals kept): the factor fl(fl(max / amax) / 2^margin) clamped to [2^-126,
    2^126] (1 for an amax of 0 or not finite), the scale s its reciprocal, fl(q * s) with q the
    element (an ml_dtypes type, nearest even) of fl(x / s) saturated at +-max."""
    x = np.asarray(x, np.float32)
    amax = np.max(np.abs(x)) if x.size else np.float32(0)
    with np.errstate(over="ignore", divide="ignore"):
        factor = np.float32(np.float32(maximum) / amax) / np.float32(2.0**margin)
    if not amax > 0 or not np.isfinite(amax):
        factor = np.float32(1)
    factor = min(max(factor, np.float32(2.0**-126)), np.float32(2.0**126))
    s = np.float32(1) / factor
    with np.errstate(invalid="ignore", over="ignore"):
        quotient = np.clip(x / s, -maximum, maximum)
        q = quotient.astype(element).astype(np.float32)
    return q * s
