"""tfhfp8.quantize, round to nearest even and toward zero, bit for bit.

Named formats are compared with ml_dtypes (`x.astype(fmt).astype(x.dtype)`) for
float32, float16 and bfloat16 inputs, custom formats with the fractions reference in
reference.py. For float64 inputs ml_dtypes is not a valid reference: it converts
float64 to float32 first and then to the target, which double-rounds values just
above or below a tie of the target format. That holds for every ml_dtypes type, not
only bfloat16 (e.g. 1 + eps/2 + 2^-52 becomes 1.0 instead of 1 + eps for all of
them, checked with ml_dtypes 0.6). float64 tests therefore use an exact reference
(round to odd into float32, then ml_dtypes; cross-checked with the fractions one).
"""

import functools
import math

import ml_dtypes
import numpy as np
import pytest

import reference as R
import tfhfp8
from helpers import (FLOAT_NAMES, assert_same_bits, exact_float64_cast, format_values,
                     ml_cast, np_type, quantize_np)
from tfhfp8 import formats

pytestmark = pytest.mark.arithmetic  # see setup.cfg

F32_MAX = float(np.finfo(np.float32).max)


def _signs(x):
    return np.concatenate([x, -x])


def _neighbours(x):
    """x and the next representable value of its dtype either side."""
    x = np.asarray(x)
    up = np.nextafter(x, x.dtype.type(np.inf))
    down = np.nextafter(x, x.dtype.type(-np.inf))
    return np.concatenate([x, up, down])


def _specials(dtype):
    nan_bits = {np.float32: [0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7F800001, 0xFFFFFFFF],
                np.float64: [0x7FF8000000000000, 0xFFF8000000000000, 0x7FF0000000000001]}
    uint = np.uint32 if dtype == np.float32 else np.uint64
    nans = np.array(nan_bits[dtype], uint).view(dtype)
    finfo = np.finfo(dtype)
    extremes = [np.inf, -np.inf, 0.0, -0.0, finfo.max, -finfo.max, finfo.smallest_subnormal,
                -finfo.smallest_subnormal, finfo.smallest_normal, -finfo.smallest_normal]
    return np.concatenate([nans, np.array(extremes, dtype)])


def _points(fmt_values):
    """Exact float64 points: the values, midpoints, the overflow threshold, tiny values."""
    v = np.asarray(fmt_values, np.float64)
    mids = (v[:-1] + v[1:]) / 2
    threshold = v[-1] + (v[-1] - v[-2]) / 2  # halfway to the next (absent) value
    tiny = v[v > 0][:3]
    extra = [threshold, 2 * v[-1], 4 * v[-1], 1.5 * v[-1], 2 ** -126, 2 ** -149, 3 * 2 ** -149]
    extra = np.array(extra + list(tiny / 2) + list(tiny / 4) + list(tiny * 0.75)
                     + list(tiny * 1.5) + list(tiny * 3))
    return np.concatenate([v, mids, extra[extra <= F32_MAX]])


@functools.lru_cache(maxsize=None)
def interesting32(name):
    """float32: every value (both signs), every midpoint, the overflow threshold and the
    smallest subnormals with their halves, each with its float32 neighbours; specials."""
    points = _points(format_values(name))
    p32 = points.astype(np.float32)
    assert np.array_equal(p32.astype(np.float64), points)  # all exact in float32
    return np.concatenate([_signs(_neighbours(p32)), _specials(np.float32)])


@functools.lru_cache(maxsize=None)
def random32():
    """10^6 random float32 bit patterns (every exponent, NaNs and infinities included)."""
    rng = np.random.default_rng(20190611)
    return rng.integers(0, 1 << 32, 10**6, dtype=np.uint64).astype(np.uint32).view(np.float32)


def in_range(name, n, dtype, seed=0):
    """Random values spread log-uniformly over the format's range (and a bit beyond)."""
    fmt = formats.get(name)
    rng = np.random.default_rng(seed)
    log = rng.uniform(math.log2(fmt.min_subnormal) - 3, math.log2(fmt.max) + 1.5, n)
    x = np.exp2(log) * rng.choice([-1.0, 1.0], n)
    return np.minimum(x, F32_MAX).astype(dtype)


@functools.lru_cache(maxsize=None)
def tie_neighbours64(name):
    """float64: values, midpoints and the threshold, with 1 and 2 float64 ulps either side."""
    p = _points(format_values(name))
    p1 = _neighbours(p)
    p2 = _neighbours(p1)
    return np.unique(_signs(p2))


def sample(x, n, seed=0):
    x = np.asarray(x)
    if x.size <= n:
        return x
    return np.random.default_rng(seed).choice(x, n, replace=False)


# ---------------------------------------------------------------------------------
# Named formats, saturate=False: ml_dtypes bit for bit.

@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_values_midpoints_thresholds_float32(name, backend):
    x = interesting32(name)
    assert_same_bits(quantize_np(x, name), ml_cast(x, name), x, f"{name} [{backend}]")


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_random_float32(name, backend):
    x = np.concatenate([random32(), in_range(name, 2 * 10**5, np.float32)])
    assert_same_bits(quantize_np(x, name), ml_cast(x, name), x, f"{name} [{backend}]")


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_named_formats_match_fraction_reference(name, backend):
    """The same points against the fractions reference (checks the references agree)."""
    x = np.concatenate([sample(interesting32(name), 2500), sample(random32(), 500)])
    expected = R.round_array(x, R.Spec.of(formats.get(name))).astype(np.float32)
    assert_same_bits(quantize_np(x, name), expected, x, f"{name} [{backend}]")


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_overflow_threshold(name, backend):
    fmt = formats.get(name)
    v = format_values(name)
    mx, below = v[-1], v[-2]
    threshold = np.float32(mx + (mx - below) / 2)
    at_or_above = np.array([threshold, np.nextafter(threshold, np.float32(np.inf)), 2 * mx,
                            F32_MAX, np.inf], np.float32)
    at_or_above = at_or_above[at_or_above >= threshold]
    below_threshold = np.array([mx, np.nextafter(np.float32(mx), np.float32(np.inf)),
                                np.nextafter(threshold, np.float32(0))], np.float32)
    spec = R.Spec.of(fmt)
    # Ties at the threshold go to the even code: up (overflow) when max's code is odd.
    tie_overflows = spec.max_code % 2 == 1
    for sign in (1, -1):
        y = quantize_np(sign * below_threshold, name)
        np.testing.assert_array_equal(y, np.float32(sign * mx))
        y = quantize_np(sign * at_or_above, name)
        beyond = y[1:] if not tie_overflows else y
        if fmt.specials == "ieee":
            assert np.all(beyond == sign * np.inf)
        elif fmt.specials in ("fn", "fnuz"):
            assert np.all(np.isnan(beyond))
        else:
            assert np.all(beyond == np.float32(sign * mx))
        if not tie_overflows:
            assert y[0] == np.float32(sign * mx)


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_signed_zeros_and_specials(name, backend):
    fmt = formats.get(name)
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan,
                  fmt.min_subnormal / 4, -fmt.min_subnormal / 4], np.float32)
    y = quantize_np(x, name)
    zero_sign = [False, fmt.specials != "fnuz"]
    assert y[0] == 0 and not np.signbit(y[0])
    assert y[1] == 0 and np.signbit(y[1]) == zero_sign[1]
    assert y[6] == 0 and not np.signbit(y[6])
    assert y[7] == 0 and np.signbit(y[7]) == zero_sign[1]
    if fmt.has_nan:
        assert np.isnan(y[4]) and np.isnan(y[5])
    else:  # ml_dtypes: NaN becomes a zero of the opposite sign
        assert y[4] == 0 and np.signbit(y[4])
        assert y[5] == 0 and not np.signbit(y[5])
    if fmt.specials == "ieee":
        assert y[2] == np.inf and y[3] == -np.inf
    elif fmt.specials == "finite":
        assert y[2] == fmt.max and y[3] == -fmt.max
    else:
        assert np.isnan(y[2]) and np.isnan(y[3])


# ---------------------------------------------------------------------------------
# Other input dtypes.

@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float64_input(name, backend):
    rng = np.random.default_rng(7)
    x = np.concatenate([
        rng.integers(0, 1 << 64, 2 * 10**5, dtype=np.uint64).view(np.float64),
        in_range(name, 10**5, np.float64, seed=1),
        tie_neighbours64(name),
        _specials(np.float64),
    ])
    assert_same_bits(quantize_np(x, name), exact_float64_cast(x, name), x,
                     f"{name} float64 [{backend}]")


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float64_ties_match_fraction_reference(name, backend):
    x = np.concatenate([sample(tie_neighbours64(name), 3000, seed=3), _specials(np.float64)])
    expected = R.round_array(x, R.Spec.of(formats.get(name)))
    assert_same_bits(quantize_np(x, name), expected, x, f"{name} float64 [{backend}]")


@pytest.mark.parametrize("name", sorted({formats.get(n).name for n in FLOAT_NAMES}))
def test_exact_float64_reference_is_exact(name):
    """The vectorised float64 reference (round to odd, then ml_dtypes) is exact."""
    rng = np.random.default_rng(11)
    x = np.concatenate([sample(tie_neighbours64(name), 1500, seed=5),
                        rng.integers(0, 1 << 64, 300, dtype=np.uint64).view(np.float64),
                        in_range(name, 300, np.float64, seed=2), _specials(np.float64)])
    expected = R.round_array(x, R.Spec.of(formats.get(name)))
    assert_same_bits(exact_float64_cast(x, name), expected, x, name)


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_float16_input_all_patterns(name, backend):
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    assert_same_bits(quantize_np(x, name), ml_cast(x, name), x, f"{name} float16 [{backend}]")


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_bfloat16_input_all_patterns(name, backend):
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    assert_same_bits(quantize_np(x, name), ml_cast(x, name), x, f"{name} bfloat16 [{backend}]")


def test_float64_bfloat16_is_one_rounding(backend):
    """bfloat16 from float64 rounds once (ml_dtypes goes through float32)."""
    eps = 2.0**-7
    x = np.array([1 + eps / 2 + 2.0**-52, 1 + eps / 2 - 2.0**-53, 1 + 3 * eps / 2 - 2.0**-52,
                  1 + eps / 2], np.float64)
    y = quantize_np(x, "bfloat16")
    np.testing.assert_array_equal(y, [1 + eps, 1.0, 1 + eps, 1.0])


# ---------------------------------------------------------------------------------
# Custom formats against the fractions reference.

CUSTOM = [
    dict(exponent_bits=2, mantissa_bits=0, specials="fn"),
    dict(exponent_bits=2, mantissa_bits=1, bias=0, specials="finite"),
    dict(exponent_bits=2, mantissa_bits=3, bias=3, subnormals=False),
    dict(exponent_bits=2, mantissa_bits=6, bias=-5, specials="fn"),
    dict(exponent_bits=3, mantissa_bits=0, bias=1),
    dict(exponent_bits=3, mantissa_bits=2, bias=-2, specials="fnuz"),
    dict(exponent_bits=3, mantissa_bits=5, bias=5, specials="fn", subnormals=False),
    dict(exponent_bits=3, mantissa_bits=6, bias=0),
    dict(exponent_bits=4, mantissa_bits=0, bias=4, specials="finite"),
    dict(exponent_bits=4, mantissa_bits=1, bias=10, specials="fnuz", subnormals=False),
    dict(exponent_bits=4, mantissa_bits=3, bias=127, specials="fn"),  # subnormals < 2^-126
    dict(exponent_bits=4, mantissa_bits=6, bias=7),
    dict(exponent_bits=5, mantissa_bits=2, bias=-97),  # max near float32's max
    dict(exponent_bits=5, mantissa_bits=3, bias=20, specials="fn"),
    dict(exponent_bits=5, mantissa_bits=4, bias=1, subnormals=False),
    dict(exponent_bits=5, mantissa_bits=6, bias=31, specials="fnuz"),
    dict(exponent_bits=6, mantissa_bits=0, bias=0, specials="fnuz", subnormals=False),
    dict(exponent_bits=6, mantissa_bits=2, bias=40),
    dict(exponent_bits=6, mantissa_bits=5, bias=70, specials="finite", subnormals=False),
    dict(exponent_bits=7, mantissa_bits=0, bias=63),
    dict(exponent_bits=7, mantissa_bits=3, bias=100, specials="fn"),
    dict(exponent_bits=7, mantissa_bits=6, bias=120, specials="fnuz", subnormals=False),
    dict(exponent_bits=8, mantissa_bits=2),  # subnormals inside float32's subnormals
]


def _custom_id(params):
    return "e%(exponent_bits)dm%(mantissa_bits)d" % params + "".join(
        f"-{k}={v}" for k, v in params.items() if k not in ("exponent_bits", "mantissa_bits"))


@functools.lru_cache(maxsize=None)
def custom_points(index, dtype):
    """Sampled values, midpoints, threshold and tiny values with their ulp neighbours."""
    fmt = tfhfp8.FloatFormat(**CUSTOM[index])
    spec = R.Spec.of(fmt)
    values = np.array(R.finite_values(spec))
    virtual = float(spec.decode_unbounded(spec.max_code + 1))
    rng = np.random.default_rng(index)
    chosen = np.unique(np.concatenate([
        np.arange(min(12, len(values))), np.arange(max(len(values) - 12, 0), len(values)),
        rng.integers(0, len(values), 60)]))
    nxt = np.append(values, virtual)[chosen + 1]
    points = np.concatenate([values[chosen], (values[chosen] + nxt) / 2, [virtual, 2 * virtual],
                             values[1:4] / 2, values[1:4] / 4, values[1:4] * 0.75])
    points = points[points <= np.finfo(dtype).max]
    px = points.astype(dtype)
    assert np.array_equal(px.astype(np.float64), points)
    log = rng.uniform(math.log2(values[1]) - 3, math.log2(values[-1]) + 1, 100)
    randoms = np.minimum(np.exp2(log), np.finfo(dtype).max).astype(dtype)
    x = np.concatenate([_signs(_neighbours(px)), _signs(randoms), _specials(dtype)])
    return x


@functools.lru_cache(maxsize=None)
def custom_expected(index, dtype, rounding, saturate):
    spec = R.Spec.of(tfhfp8.FloatFormat(**CUSTOM[index]))
    x = custom_points(index, dtype)
    return R.round_array(x, spec, rounding, saturate).astype(dtype)


@pytest.mark.parametrize("saturate", [False, True], ids=["wrap", "saturate"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("index", range(len(CUSTOM)), ids=[_custom_id(p) for p in CUSTOM])
def test_custom_format_nearest_even(index, dtype, saturate, backend):
    fmt = tfhfp8.FloatFormat(**CUSTOM[index])
    x = custom_points(index, dtype)
    expected = custom_expected(index, dtype, "nearest_even", saturate)
    assert_same_bits(quantize_np(x, fmt, saturate=saturate), expected, x,
                     f"{fmt!r} saturate={saturate} [{backend}]")


def _in_range_mask(x, fmt):
    """|x| below the first value past max (where toward-zero cannot overflow by design)."""
    spec = R.Spec.of(fmt)
    virtual = float(spec.decode_unbounded(spec.max_code + 1))
    with np.errstate(invalid="ignore"):
        return ~(np.abs(x.astype(np.float64)) >= virtual)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("index", range(len(CUSTOM)), ids=[_custom_id(p) for p in CUSTOM])
def test_custom_format_toward_zero(index, dtype, backend):
    fmt = tfhfp8.FloatFormat(**CUSTOM[index])
    x = custom_points(index, dtype)
    keep = _in_range_mask(x, fmt)  # overflow: test_toward_zero_overflow
    for saturate in (False, True):
        expected = custom_expected(index, dtype, "toward_zero", saturate)
        got = quantize_np(x[keep], fmt, rounding="toward_zero", saturate=saturate)
        assert_same_bits(got, expected[keep], x[keep],
                         f"{fmt!r} toward_zero saturate={saturate} [{backend}]")


# ---------------------------------------------------------------------------------
# saturate=True on the named formats.

def saturated(x, name):
    """ml_dtypes' cast with overflow (inf or the overflow NaN) replaced by +-max."""
    fmt = formats.get(name)
    y = ml_cast(x, name)
    with np.errstate(invalid="ignore"):
        x_nan = np.isnan(x.astype(np.float64))
        y64 = y.astype(np.float64)
        overflow = ~x_nan & ~np.isfinite(y64)
    y = np.where(overflow, np.copysign(np.asarray(fmt.max, x.dtype), x), y)
    return np.where(x_nan, np.asarray(np.nan, x.dtype), y)


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_saturate(name, backend):
    fmt = formats.get(name)
    x = np.concatenate([interesting32(name), random32()[:2 * 10**5],
                        in_range(name, 10**5, np.float32, seed=4)])
    y = quantize_np(x, name, saturate=True)
    assert_same_bits(y, saturated(x, name), x, f"{name} saturate [{backend}]")
    finite = np.isfinite(x)
    assert np.all(np.isfinite(y[finite])), "finite input gave inf/NaN"
    assert np.all(np.isnan(y[np.isnan(x)]))
    assert np.all(np.abs(y[~np.isnan(x)]) <= fmt.max)
    v = format_values(name)
    threshold = v[-1] + (v[-1] - v[-2]) / 2
    beyond = np.abs(x.astype(np.float64)) > threshold
    np.testing.assert_array_equal(y[beyond], np.copysign(np.float32(fmt.max), x[beyond]))
    for value in (fmt.max, np.inf):
        np.testing.assert_array_equal(
            quantize_np(np.array([value, -value], np.float32), name, saturate=True),
            np.array([fmt.max, -fmt.max], np.float32))


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_saturate_float64_and_fraction_reference(name, backend):
    x = np.concatenate([sample(tie_neighbours64(name), 1500, seed=9), _specials(np.float64)])
    expected = R.round_array(x, R.Spec.of(formats.get(name)), saturate=True)
    assert_same_bits(quantize_np(x, name, saturate=True), expected, x,
                     f"{name} float64 saturate [{backend}]")


# ---------------------------------------------------------------------------------
# Toward zero on the named formats.

@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_toward_zero_matches_reference(name, backend):
    fmt = formats.get(name)
    x = np.concatenate([sample(interesting32(name), 2500, seed=1), sample(random32(), 500)])
    x = x[_in_range_mask(x, fmt)]  # overflow: test_toward_zero_overflow
    spec = R.Spec.of(fmt)
    for saturate in (False, True):
        expected = R.round_array(x, spec, "toward_zero", saturate).astype(np.float32)
        got = quantize_np(x, name, rounding="toward_zero", saturate=saturate)
        assert_same_bits(got, expected, x, f"{name} toward_zero [{backend}]")


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_toward_zero_is_largest_value_not_above(name, backend):
    """Vectorised on many values: |q| is the largest format value <= |x|."""
    fmt = formats.get(name)
    x = np.concatenate([random32(), in_range(name, 10**5, np.float32, seed=6),
                        interesting32(name)])
    x = x[np.isfinite(x) & _in_range_mask(x, fmt)]
    y = quantize_np(x, name, rounding="toward_zero")
    v = format_values(name)
    ax = np.abs(x.astype(np.float64))
    expected = v[np.searchsorted(v, ax, side="right") - 1]
    expected = np.copysign(expected, x)
    if fmt.specials == "fnuz":
        expected = np.where(expected == 0, 0.0, expected)
    assert_same_bits(y, expected.astype(np.float32), x, f"{name} toward_zero [{backend}]")


@pytest.mark.parametrize("name", FLOAT_NAMES)
def test_toward_zero_overflow(name, backend):
    """Toward zero never increases a magnitude: finite overflow gives +-max (IEEE 754
    roundTowardZero); only an infinite input gives inf (or NaN where there is no inf)."""
    fmt = formats.get(name)
    spec = R.Spec.of(fmt)
    virtual = float(spec.decode_unbounded(spec.max_code + 1))
    big = np.array([fmt.max, virtual, virtual * 1.25, 2 * virtual, F32_MAX], np.float64)
    big = big[big <= F32_MAX].astype(np.float32)
    x = np.concatenate([_signs(_neighbours(big)), np.array([np.inf, -np.inf], np.float32)])
    for saturate in (False, True):
        y = quantize_np(x, name, rounding="toward_zero", saturate=saturate)
        expected = R.round_array(x, spec, "toward_zero", saturate).astype(np.float32)
        assert_same_bits(y, expected, x, f"{name} toward_zero saturate={saturate} [{backend}]")
        finite = np.isfinite(x)
        assert np.all(np.abs(y[finite]) <= np.abs(x[finite]))
