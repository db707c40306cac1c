"""Dynamic fixed point (INT16 DFP): shared exponents, rounding, slices, specials."""

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import reference as R
import tfhfp8
from helpers import assert_same_bits, bits_of, quantize_np

MIN_EXP = {np.dtype(np.float32): -149, np.dtype(np.float64): -1074}
DFP16 = tfhfp8.DynamicFixedPoint(16)


def fast_reference(x, bits=16, axis=None, rounding="nearest_even", saturate=False):
    """Vectorised DFP reference for finite-heavy float32/float64 arrays.

    The shared exponents come from the fractions reference (on each slice's largest
    finite magnitude); the rounding of x / 2^E_s is np.rint (ties to even) or np.trunc
    in float64, exact for these inputs (scaling by a power of two with ldexp is exact,
    and |x / 2^E_s| < 2^24)."""
    x = np.asarray(x)
    min_exponent = MIN_EXP[x.dtype]
    moved = x[None] if axis is None else np.moveaxis(x, axis, 0)
    x64 = moved.astype(np.float64)
    out = np.empty_like(x64)
    exponents = []
    for i in range(moved.shape[0]):
        s = x64[i]
        finite = np.abs(s[np.isfinite(s)])
        largest = float(finite.max()) if finite.size else 0.0
        e_s = R.dfp_exponent([largest], bits, rounding, min_exponent)
        exponents.append(e_s)
        with np.errstate(invalid="ignore"):
            scaled = np.ldexp(s, -e_s)
            integer = np.rint(scaled) if rounding == "nearest_even" else np.trunc(scaled)
            y = np.copysign(np.ldexp(integer, e_s), s)
        largest_q = ((1 << (bits - 1)) - 1) * 2.0**e_s
        y = np.where(np.isinf(s), np.copysign(largest_q, s) if saturate else s, y)
        out[i] = np.where(np.isnan(s), np.nan, y)
    out = out[0] if axis is None else np.moveaxis(out, 0, axis)
    return out.astype(x.dtype), exponents


def scaled_rows(shape, axis, seed=0, dtype=np.float32):
    """Random data whose slices along `axis` have very different magnitudes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if axis is not None:
        n = shape[axis]
        scales = np.exp2(rng.integers(-40, 40, n).astype(np.float64))
        scales[0] = 0.0 if n > 2 else scales[0]  # an all-zero slice
        view = [1] * len(shape)
        view[axis] = n
        x = x * scales.reshape(view)
    return x.astype(dtype)


def check_structure(y, x, exponents, axis, bits=16, max_error=0.5):
    """Every output is I * 2^E_s of its slice with |I| <= 2^(bits-1) - 1, the error is
    at most `max_error` steps, and E_s is minimal: at E_s - 1 the largest finite
    magnitude of the slice would need a mantissa beyond 2^(bits-1) - 1."""
    limit = (1 << (bits - 1)) - 1
    moved_y = y[None] if axis is None else np.moveaxis(y, axis, 0)
    moved_x = x[None] if axis is None else np.moveaxis(x, axis, 0)
    for i, e_s in enumerate(exponents):
        yi = moved_y[i].astype(np.float64).ravel()
        xi = moved_x[i].astype(np.float64).ravel()
        finite = np.isfinite(xi)
        mantissa = np.ldexp(yi[finite], -e_s)
        assert np.all(mantissa == np.round(mantissa)), "not a multiple of 2^E_s"
        assert np.all(np.abs(mantissa) <= limit)
        error = np.abs(np.ldexp(xi[finite], -e_s) - mantissa)
        assert np.all(error <= max_error)
        if finite.any() and np.abs(xi[finite]).max() > 0:
            largest = Fraction(float(np.abs(xi[finite]).max()))
            at_e_s = largest / Fraction(2) ** e_s
            assert at_e_s < limit + 1  # fits (before rounding) at E_s
            if e_s > MIN_EXP[np.dtype(x.dtype)]:
                below = largest / Fraction(2) ** (e_s - 1)
                # One exponent lower the largest magnitude would round beyond the limit.
                assert below > limit + Fraction(1, 2) or (
                    below == limit + Fraction(1, 2) and limit % 2 == 1), (e_s, below)


# ---------------------------------------------------------------------------------

CASES = [((1000,), None), ((3, 7, 11), None), ((6, 200), 0), ((200, 5), -1), ((200, 5), 1),
         ((4, 30, 5), 0), ((4, 30, 5), 1), ((4, 30, 5), -1), ((4, 30, 5), -3)]


@pytest.mark.parametrize("rounding", ["nearest_even", "toward_zero"])
@pytest.mark.parametrize("shape,axis", CASES, ids=[f"{s}-axis{a}" for s, a in CASES])
def test_matches_fraction_reference(shape, axis, rounding, backend):
    x = scaled_rows(shape, axis, seed=len(shape) + (axis or 0))
    fmt = tfhfp8.DynamicFixedPoint(16, axis=axis)
    expected, exponents = R.dfp_reference(x, 16, axis, rounding)
    y = quantize_np(x, fmt, rounding=rounding)
    assert y.shape == x.shape
    assert_same_bits(y, expected.astype(np.float32), x, f"{fmt} {rounding} [{backend}]")
    check_structure(y, x, exponents, axis, max_error=0.5 if rounding == "nearest_even" else 1)
    if axis is not None:
        assert len(set(e for e in exponents)) > 1  # the slices really differ


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((2000, 50), None), ((64, 1000), 0), ((50, 999), 1),
                                        ((8, 50, 200), 2)])
def test_large_tensors_vectorised_reference(shape, axis, dtype, backend):
    x = scaled_rows(shape, axis, seed=3, dtype=dtype)
    for rounding in ("nearest_even", "toward_zero"):
        fmt = tfhfp8.DynamicFixedPoint(16, axis=axis)
        expected, exponents = fast_reference(x, 16, axis, rounding)
        y = quantize_np(x, fmt, rounding=rounding)
        assert_same_bits(y, expected, x, f"{fmt} {rounding} {dtype} [{backend}]")
        check_structure(y, x, exponents, axis,
                        max_error=0.5 if rounding == "nearest_even" else 1)


def test_fast_reference_agrees_with_fractions():
    x = scaled_rows((40, 30), 1, seed=8)
    x[3, 4], x[5, 6], x[7, 8] = np.inf, -np.inf, np.nan
    for rounding in ("nearest_even", "toward_zero"):
        for saturate in (False, True):
            a, ea = fast_reference(x, 16, 1, rounding, saturate)
            b, eb = R.dfp_reference(x, 16, 1, rounding, saturate)
            assert ea == eb
            assert_same_bits(a, b.astype(np.float32), x, "fast vs fractions")


@pytest.mark.parametrize("k", [0, -20, 17, -130])
def test_exponent_choice_at_the_boundary(k, backend):
    """The largest magnitude near 2^15 * 2^k: the exponent bumps exactly when rounding
    reaches 2^15 (a tie of 32767.5 goes to the even 32768), and probes reveal E_s."""
    limit = 2**15 - 1
    cases = {  # max / 2^k -> E_s - k with nearest even
        32767.0: 0, 32767.25: 0, 32767.5 - 2.0**-8: 0, 32767.5: 1, 32767.75: 1,
        16384.0: 0, 32768.0 - 2.0**-8: 1, 65535.0: 2, 65534.0: 1, 65533.0: 1,
    }
    for largest, bump in cases.items():
        e_expected = k + bump
        probes = [1.5 * 2.0 ** e_expected, 0.5 * 2.0 ** e_expected, 2.5 * 2.0 ** e_expected,
                  0.75 * 2.0 ** e_expected, -3.5 * 2.0 ** e_expected]
        x = np.array([largest * 2.0**k, -largest * 2.0**k / 3] + probes, np.float32)
        assert x[0] == largest * 2.0**k  # exact in float32
        e_s = R.dfp_exponent([float(x[0])], 16, "nearest_even")
        assert e_s == e_expected, (largest, e_s)
        expected, _ = R.dfp_reference(x)
        y = quantize_np(x, DFP16)
        assert_same_bits(y, expected.astype(np.float32), x, f"max={largest}*2^{k}")
        check_structure(y, x, [e_s], None)
        # E_s - 1 would overflow: the largest element needs more than 2^15 - 1 there.
        assert round(Fraction(float(x[0])) / Fraction(2) ** (e_s - 1)) > limit


def test_exponent_choice_stochastic_and_toward_zero(backend):
    """Stochastic rounding bumps as soon as the largest magnitude could round up to
    2^15; toward zero never needs to."""
    x = np.array([32767.25, 1.5, -2.75], np.float32)
    for rounding, e_expected in (("stochastic", 1), ("toward_zero", 0), ("nearest_even", 0)):
        assert R.dfp_exponent([float(x[0])], 16, rounding) == e_expected
        y = quantize_np(x, DFP16, rounding=rounding, seed=3)
        mantissa = np.ldexp(y.astype(np.float64), -e_expected)
        assert np.all(mantissa == np.round(mantissa)) and np.all(np.abs(mantissa) <= 2**15 - 1)
        if e_expected == 1:
            assert y[0] in (32766.0, 32768.0)
            assert y[1] in (0.0, 2.0)
        else:
            assert y[1] in (1.0, 2.0)
    y = quantize_np(x, DFP16, rounding="toward_zero")
    np.testing.assert_array_equal(y, [32767.0, 1.0, -2.0])


def test_zeros(backend):
    for x in (np.zeros(7, np.float32), np.array([0.0, -0.0, 0.0], np.float32),
              np.zeros((3, 4), np.float64)):
        for rounding in ("nearest_even", "stochastic", "toward_zero"):
            y = quantize_np(x, DFP16, rounding=rounding, seed=1)
            assert_same_bits(y, x, x, "zeros")
    # A zero slice next to non-zero ones.
    x = np.array([[0.0, 0.0], [1e-3, 5.0]], np.float32)
    y = quantize_np(x, tfhfp8.DynamicFixedPoint(16, axis=0))
    expected, _ = R.dfp_reference(x, axis=0)
    assert_same_bits(y, expected.astype(np.float32), x, "zero slice")


@pytest.mark.parametrize("saturate", [False, True])
def test_inf_and_nan(saturate, backend):
    x = np.array([1.0, np.inf, -np.inf, np.nan, 3.0, -0.4, -np.nan], np.float32)
    y = quantize_np(x, DFP16, saturate=saturate)
    e_s = R.dfp_exponent([3.0])  # infinities do not set the exponent
    assert e_s == 1 - 14
    expected, _ = R.dfp_reference(x, saturate=saturate)
    assert_same_bits(y, expected.astype(np.float32), x, f"saturate={saturate}")
    assert np.isnan(y[3]) and np.isnan(y[6])
    if saturate:
        assert y[1] == (2**15 - 1) * 2.0**e_s and y[2] == -y[1]
    else:
        assert y[1] == np.inf and y[2] == -np.inf
    assert y[0] == 1.0 and y[4] == 3.0


@pytest.mark.parametrize("saturate", [False, True])
def test_inf_and_nan_per_slice(saturate, backend):
    x = scaled_rows((5, 40), 0, seed=2)
    x[1, 3], x[2, 0], x[4, 7] = np.inf, -np.inf, np.nan
    fmt = tfhfp8.DynamicFixedPoint(16, axis=0)
    expected, exponents = R.dfp_reference(x, axis=0, saturate=saturate)
    y = quantize_np(x, fmt, saturate=saturate)
    assert_same_bits(y, expected.astype(np.float32), x, f"saturate={saturate}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_subnormal_largest_magnitude(dtype, backend):
    """The largest magnitude is a subnormal of the container: its exponent still sets
    E_s (above the clamp), e.g. float32 max 2^-130 -> E_s = -144."""
    tiny = float(np.finfo(dtype).smallest_normal)
    x = np.array([tiny / 16, tiny / 16 * 0.3, -tiny / 16 * 0.71, tiny * 2.0**-25], dtype)
    expected, exponents = R.dfp_reference(x, min_exponent=MIN_EXP[np.dtype(dtype)])
    assert exponents[0] == R.exact_exponent(Fraction(float(x[0]))) - 14
    y = quantize_np(x, DFP16)
    assert_same_bits(y, expected.astype(dtype), x, f"{dtype} subnormal max [{backend}]")
    check_structure(y, x, exponents, None)


def test_subnormal_clamp(backend):
    """E_s is never below the container's smallest subnormal exponent: all exact."""
    x32 = np.array([2.0**-140, 5 * 2.0**-149, -3 * 2.0**-149, 0.0], np.float32)
    np.testing.assert_array_equal(quantize_np(x32, DFP16), x32)
    x64 = np.array([2.0**-1070, 5 * 2.0**-1074, -(2.0**-1074), 0.0])
    np.testing.assert_array_equal(quantize_np(x64, DFP16), x64)
    expected, exponents = R.dfp_reference(x64, min_exponent=-1074)
    assert exponents == [-1074]
    # Just above the clamp, rounding happens again.
    x = np.array([2.0**-120, 2.0**-149 * 3, 2.0**-135 * 1.5], np.float32)
    expected, exponents = R.dfp_reference(x)
    assert exponents == [-134]
    assert_same_bits(quantize_np(x, DFP16), expected.astype(np.float32), x, "near clamp")


@pytest.mark.parametrize("bits", [2, 8, 12, 24])
def test_other_widths(bits, backend):
    x = scaled_rows((30, 20), 1, seed=bits)
    for axis in (None, 1):
        fmt = tfhfp8.DynamicFixedPoint(bits, axis=axis)
        expected, exponents = R.dfp_reference(x, bits, axis)
        y = quantize_np(x, fmt)
        assert_same_bits(y, expected.astype(np.float32), x, f"{fmt} [{backend}]")
        check_structure(y, x, exponents, axis, bits=bits)


def test_named_int16_dfp(backend):
    x = scaled_rows((300,), None, seed=4)
    np.testing.assert_array_equal(quantize_np(x, "int16_dfp"), quantize_np(x, DFP16))
    expected, _ = R.dfp_reference(x)
    assert_same_bits(quantize_np(x, "int16_dfp"), expected.astype(np.float32), x, "int16_dfp")


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_half_precision_inputs(dtype, backend):
    x = scaled_rows((20, 30), None, seed=5).astype(dtype)
    x[0, :4] = [np.inf, -np.inf, np.nan, 0.0]
    for axis in (None, 0):
        for saturate in (False, True):
            expected, _ = R.dfp_reference(x.astype(np.float32), axis=axis, saturate=saturate)
            y = quantize_np(x, tfhfp8.DynamicFixedPoint(16, axis=axis), saturate=saturate)
            assert y.dtype == x.dtype
            assert_same_bits(y, expected.astype(dtype), x, f"{dtype} axis={axis}")


# ---------------------------------------------------------------------------------
# Stochastic rounding.

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stochastic_unbiased(dtype, backend):
    n = 10**5
    x = np.full(n, 0.3, dtype)
    x[0] = 20000.0  # E_s = 0 (20000 < 2^15, E_max = 14): steps of 1
    e_s = R.dfp_exponent([20000.0], 16, "stochastic", MIN_EXP[np.dtype(dtype)])
    assert e_s == 0
    for seed in (1, 2):
        y = quantize_np(x, DFP16, rounding="stochastic", seed=seed)
        assert y[0] == 20000.0
        down, up, p = R.dfp_stochastic(float(x[1]), e_s)
        draws = y[1:].astype(np.float64)
        assert set(np.unique(draws)) <= {down, up}
        p = float(p)
        se = math.sqrt(p * (1 - p) / (n - 1))
        assert abs(np.mean(draws == up) - p) <= 4 * se
        assert abs(draws.mean() - float(x[1])) <= 4 * se * (up - down)


def test_stochastic_negative_and_per_slice(backend):
    n = 50_000
    x = np.empty((2, n), np.float32)
    x[0] = -2.0**-20 * 1.25  # slice 0: E_s from its own max
    x[0, 0] = -(2.0**-10)  # E_max = -10 -> E_s = -24: -1.25 * 2^-20 = -20 steps exactly
    x[0, 1:] = -(2.0**-24) * 20.75
    x[1] = 1000.0 + 0.125
    x[1, 0] = 1000.0  # E_max = 9, E_s = -5: steps of 1/32
    fmt = tfhfp8.DynamicFixedPoint(16, axis=0)
    y = quantize_np(x, fmt, rounding="stochastic", seed=8)
    assert y[0, 0] == -(2.0**-10) and y[1, 0] == 1000.0
    draws = y[0, 1:].astype(np.float64)
    assert set(np.unique(draws)) <= {-(2.0**-24) * 20, -(2.0**-24) * 21}
    assert abs(np.mean(draws == -(2.0**-24) * 21) - 0.75) <= 4 * math.sqrt(0.75 * 0.25 / n)
    np.testing.assert_array_equal(y[1, 1:], 1000.125)  # exact at steps of 1/32


@pytest.mark.parametrize("axis", [None, 0, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_backends_identical(axis, dtype, monkeypatch):
    x = scaled_rows((64, 300), axis, seed=6, dtype=dtype)
    x[5, 5], x[6, 6], x[7, 7] = np.inf, -np.inf, np.nan
    fmt = tfhfp8.DynamicFixedPoint(16, axis=axis)
    for rounding in ("nearest_even", "stochastic", "toward_zero"):
        for saturate in (False, True):
            results = []
            for name in ("tf", "cpp"):
                monkeypatch.setenv("TFHFP8_BACKEND", name)
                results.append(quantize_np(x, fmt, rounding=rounding, saturate=saturate,
                                           seed=-77))
            assert np.array_equal(bits_of(results[0]), bits_of(results[1])), (
                rounding, saturate)


# ---------------------------------------------------------------------------------
# Shapes.

def test_axis_out_of_range(backend):
    with pytest.raises(ValueError, match="axis"):
        tfhfp8.quantize(tf.zeros([2, 3]), tfhfp8.DynamicFixedPoint(16, axis=2))
    with pytest.raises(ValueError, match="axis"):
        tfhfp8.quantize(tf.zeros([2, 3]), tfhfp8.DynamicFixedPoint(16, axis=-3))


def test_unknown_dimensions_in_tf_function(backend):
    x = scaled_rows((6, 40), 0, seed=9)
    for axis in (None, 0, 1):
        fmt = tfhfp8.DynamicFixedPoint(16, axis=axis)
        f = tf.function(lambda t: tfhfp8.quantize(t, fmt),
                        input_signature=[tf.TensorSpec([None, None], tf.float32)])
        expected, _ = R.dfp_reference(x, axis=axis)
        assert_same_bits(f(tf.constant(x)).numpy(), expected.astype(np.float32), x, str(fmt))
        assert f(tf.zeros([0, 3])).shape == (0, 3)


def test_empty_and_scalar(backend):
    assert quantize_np(np.zeros((0, 4), np.float32), DFP16).shape == (0, 4)
    assert quantize_np(np.zeros((3, 0), np.float32),
                       tfhfp8.DynamicFixedPoint(16, axis=0)).shape == (3, 0)
    y = quantize_np(np.array(0.1, np.float32), DFP16)
    assert y.shape == () and y == R.dfp_reference(np.array([0.1], np.float32))[0][0]
