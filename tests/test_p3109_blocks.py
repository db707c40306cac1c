"""IEEE P3109 formats in block-scaled formats (`tfhfp8.BlockScaled`): as elements
(signed, and unsigned: a negative element gives +0, P3109's saturation to [0, max]) and
as block scales (`amax / max_element` rounded to the scale format: signed and unsigned,
extended and finite domains), on both backends and every CPU variant of the C++ loops,
against gfloat where gfloat defines the result. The block helpers (gfloat's blocks with
tfhfp8's draws, the loops of every CPU variant) are in tests/rounding_reference.py.
"""

import dataclasses

import gfloat
import gfloat.formats as gf
import numpy as np
import pytest
import tensorflow as tf
from gfloat.types import RoundMode
from helpers import assert_same_bits
from p3109_reference import GF_MODE, gfloat_info
from rounding_reference import (NEW_ROUNDINGS, SEED, block_inputs, gfloat_blocks,
                                quantize_variants, seeded_draws)

import tfhfp8
from tfhfp8.formats import roundings


@pytest.mark.parametrize("element", ["p3109_k8p4se", "p3109_k8p3sf", "p3109_k6p3se"])
def test_p3109_elements_of_block_scaled_formats(element):
    """A signed P3109 element in MX blocks: the same bits on both backends, every value a
    block scale times an element value (unsigned elements: against gfloat, below)."""
    x = tf.constant(np.random.default_rng(2).normal(size=(8, 96)).astype(np.float32))
    fmt = tfhfp8.BlockScaled(element, 32)
    results = []
    for backend in ("tf", "cpp"):
        with tfhfp8.ops.forced_backend(backend):
            results.append(tfhfp8.quantize(x, fmt, saturate=True).numpy())
    assert_same_bits(results[1], results[0], x, element)
    values = tfhfp8.formats.get(element).values()
    for block in results[0].reshape(-1, 32):
        scale = 2.0 ** np.floor(np.log2(np.abs(block).max())) / 2.0 ** np.floor(
            np.log2(values.max()))
        assert np.isin(np.abs(block) / scale, values).all()


# -- unsigned (P3109) elements: against gfloat, negative inputs by P3109's rule --

def _unsignedblock_inputs():
    """`block_inputs()` and rows of four 32-element blocks: all negative, all positive,
    +-0, mixed; float32 subnormals; NaN, +inf, -inf, elements beyond the scale's max."""
    rng = np.random.default_rng(9)
    normal = rng.standard_normal(32)
    tiny = rng.integers(-2 ** 23, 2 ** 23, 128) * np.float32(2.0 ** -149)
    special = rng.standard_normal((4, 32))
    special[0, 3], special[1, 7], special[2, 0] = np.nan, np.inf, -np.inf
    special[3, :4] = [1.99, 1.9, -1.99, 1.0]  # beyond max * 2^k (k from 1.99): saturate
    rows = [np.concatenate([-np.abs(normal), np.abs(normal) * 3,
                            np.where(normal > 0, 0.0, -0.0), normal * 1e-3]),
            tiny, special.ravel()]
    return np.concatenate([block_inputs(), np.array(rows, np.float32)])


def _saturated(x):
    """x with its infinities as the largest finite values of its dtype, as saturating
    blocks take them."""
    largest = np.finfo(x.dtype).max
    return np.nan_to_num(x, nan=np.nan, posinf=largest, neginf=-largest)


def _assert_same_along_axis_0(backend, monkeypatch, x, fmt, rounding, expected, **kwargs):
    """The blocks of `fmt` laid along axis 0 of x.T (the C++ kernel's column loops) round
    to `expected`.T; not for stochastic roundings, whose draws follow the layout."""
    if roundings.parse(rounding).stochastic:
        return
    by_columns = quantize_variants(backend, monkeypatch, x.T, dataclasses.replace(fmt, axis=0),
                                    rounding, **kwargs)
    assert_same_bits(by_columns.T, expected, x, f"{fmt} {rounding} along axis 0")


@pytest.mark.parametrize("backend", ["tf", "cpp"])
@pytest.mark.parametrize("rounding", ["nearest_even", "toward_zero"] + NEW_ROUNDINGS)
@pytest.mark.parametrize("element", ["p3109_k8p3ue", "p3109_k6p3uf"])
def test_unsigned_mx_elements_match_gfloat(monkeypatch, backend, rounding, element):
    """E8M0 scales from the magnitudes of all of a block's elements; infinities count as
    the largest float32 (saturating) or make their block NaN (not)."""
    x = _unsignedblock_inputs()
    etype = gfloat_info(element)
    expected = gfloat_blocks(etype, 32, _saturated(x), rounding,
                              seeded_draws(x, rounding, SEED)).astype(np.float32)
    fmt = tfhfp8.BlockScaled(element, 32)
    got = quantize_variants(backend, monkeypatch, x, fmt, rounding, saturate=True)
    assert_same_bits(got, expected, x, f"{element} {rounding}")
    not_saturating = quantize_variants(backend, monkeypatch, x, fmt, rounding)
    expected[np.repeat(np.isinf(x).reshape(len(x), -1, 32).any(-1), 32, axis=-1)] = np.nan
    assert_same_bits(not_saturating, expected, x, f"{element} {rounding}, not saturating")
    _assert_same_along_axis_0(backend, monkeypatch, x, fmt, rounding, expected)


@pytest.mark.parametrize("backend", ["tf", "cpp"])
@pytest.mark.parametrize("rounding", ["nearest_even", "toward_zero", "stochastic_r5"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unsigned_elements_with_a_float_scale_match_gfloat(monkeypatch, backend, rounding,
                                                           dtype):
    """An unsigned NVFP4 without tensor scale: E4M3 block scales `amax / 6` rounded to
    nearest (a zero scale: zeros), the elements rounded in float64 (its draws)."""
    x = _unsignedblock_inputs().astype(dtype)
    x[-3, 96:] *= 1e-6  # a block whose scale underflows E4M3: +0s
    etype = gfloat_info("p3109_k4p2ue")

    def scale_of(amax):
        return gfloat.round_float(gf.format_info_ocp_e4m3, amax / etype.max,
                                  RoundMode.TiesToEven, True)

    draws = seeded_draws(x, rounding, SEED, tf.float64)
    expected = gfloat_blocks(etype, 16, _saturated(x), rounding, draws, scale_of).astype(dtype)
    fmt = tfhfp8.BlockScaled("p3109_k4p2ue", 16, scale="float8_e4m3fn")
    got = quantize_variants(backend, monkeypatch, x, fmt, rounding, saturate=True)
    assert_same_bits(got, expected, x, f"{dtype.__name__} {rounding}")
    _assert_same_along_axis_0(backend, monkeypatch, x, fmt, rounding, expected, saturate=True)
    assert (got[-3, 96:] == 0).all() and not np.signbit(got[-3, 96:]).any()


@pytest.mark.parametrize("fmt", [
    tfhfp8.BlockScaled("p3109_k4p2ue", 16, scale="float8_e4m3fn", tensor_scale=True),
    tfhfp8.BlockScaled("p3109_k8p3ue", 32, scale_rounding="ceil"),
    tfhfp8.BlockScaled("p3109_k8p3ue", None, scale="float32"),
    tfhfp8.BlockScaled("p3109_k4p2ue", 16, scale="p3109_k8p3ue", tensor_scale=True),
], ids=["tensor_scale", "ceil", "per_tensor", "p3109_scale_tensor_scale"])
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic_r5"])
def test_unsigned_elements_in_every_block_kind_agree_across_backends(monkeypatch, fmt,
                                                                     rounding):
    """Scales no gfloat function computes: the same bits on both backends, negative
    inputs +0 (without the row of NaN and inf, which would set the tensor's amax)."""
    x = _unsignedblock_inputs()[:-1]
    y, cpp = [quantize_variants(backend, monkeypatch, x, fmt, rounding, saturate=True)
              for backend in ("tf", "cpp")]
    assert_same_bits(cpp, y, x, f"{fmt} {rounding}")
    assert not np.signbit(y).any() and (y[np.signbit(x)] == 0).all() and (y > 0).mean() > 0.1


# -- P3109 block scales: amax / max_element rounded to the scale format --

# Every kind of P3109 scale: unsigned and signed, extended and finite domain.
P3109_SCALES = ["p3109_k8p3ue", "p3109_k8p3uf", "p3109_k8p4se", "p3109_k8p4sf"]
# Elements with and without a -0 (a block whose scale underflows keeps x's sign only
# where the element has one), as gfloat describes them.
ELEMENTS = {"float4_e2m1fn": gf.format_info_ocp_e2m1, "p3109_k4p2ue": gfloat_info("p3109_k4p2ue")}


def _scale_inputs(dtype):
    """`_unsignedblock_inputs()` (negatives, +-0, float32 subnormals, NaN, +-inf, blocks
    up to 2^20) as `dtype`, with one 16-element block so small that its scale underflows
    every scale format here (amax / 6 below half of 2^-33, k8p3's smallest subnormal)."""
    x = _unsignedblock_inputs().astype(dtype)
    x[-3, 96:112] *= 1e-9
    return x


def _zero_scale_blocks(x, scale_of, size=16):
    """Per element of x: whether its block's scale `scale_of(amax)` is 0."""
    amax = np.abs(_saturated(x)).reshape(len(x), -1, size).max(-1)
    zero = np.array([[scale_of(a) == 0 for a in row] for row in amax])
    return np.repeat(zero, size, axis=-1)


@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", P3109_SCALES)
def test_p3109_scales_agree_across_backends(monkeypatch, scale, dtype, rounding):
    """Both scale roundings, saturating or not, blocks along the last axis and (not
    stochastic) along axis 0: the same bits on both backends."""
    x = _scale_inputs(dtype)
    for element in ELEMENTS:
        for scale_rounding, saturate in (("nearest_even", True), ("nearest_even", False),
                                         ("floor", True)):
            fmt = tfhfp8.BlockScaled(element, 16, scale=scale, scale_rounding=scale_rounding)
            what = f"{fmt} {dtype.__name__} {rounding} saturate={saturate}"
            y, cpp = [quantize_variants(backend, monkeypatch, x, fmt, rounding,
                                         saturate=saturate) for backend in ("tf", "cpp")]
            assert_same_bits(cpp, y, x, what)
            _assert_same_along_axis_0("cpp", monkeypatch, x, fmt, rounding, y,
                                      saturate=saturate)
            underflow = y[-3, 96:112]
            assert (underflow == 0).all(), what
            np.testing.assert_array_equal(
                np.signbit(underflow), np.signbit(x[-3, 96:112]) & fmt.element.has_negative_zero)
            # A NaN's block is NaN; an infinity's only when not saturating.
            assert np.isnan(y[-1, :16]).all() and np.isnan(y[-1, 32:48]).all() != saturate


def _gfloat_scale_of(scale, etype):
    """gfloat's scale of a block: amax / max_element rounded to nearest, saturating."""
    stype = gfloat_info(scale)
    return lambda amax: gfloat.round_float(stype, amax / etype.max, RoundMode.TiesToEven, True)


@pytest.mark.parametrize("backend", ["tf", "cpp"])
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic_r5"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("scale", P3109_SCALES)
def test_p3109_scales_match_gfloat(monkeypatch, backend, scale, dtype, rounding):
    """Elements rounded in float64 (its draws); a block whose scale underflows, where
    gfloat divides by zero, gives zeros, signed as x where the element has a -0."""
    x = _scale_inputs(dtype)
    draws = seeded_draws(x, rounding, SEED, tf.float64)
    for element, etype in ELEMENTS.items():
        scale_of = _gfloat_scale_of(scale, etype)
        expected = gfloat_blocks(etype, 16, _saturated(x), rounding, draws, scale_of)
        zero = _zero_scale_blocks(x, scale_of)
        assert zero.any() and not zero.all()
        fmt = tfhfp8.BlockScaled(element, 16, scale=scale)
        if fmt.element.has_negative_zero:
            expected[zero] = np.copysign(0.0, x[zero])
        expected = expected.astype(dtype)
        got = quantize_variants(backend, monkeypatch, x, fmt, rounding, saturate=True)
        assert_same_bits(got, expected, x, f"{fmt} {dtype.__name__} {rounding}")
        not_saturating = quantize_variants(backend, monkeypatch, x, fmt, rounding)
        expected[np.repeat(np.isinf(x).reshape(len(x), -1, 16).any(-1), 16, axis=-1)] = np.nan
        assert_same_bits(not_saturating, expected, x, f"{fmt} {rounding}, not saturating")


@pytest.mark.parametrize("rounding", ["nearest_even", "toward_zero", "nearest_away"])
@pytest.mark.parametrize("scale", P3109_SCALES)
def test_p3109_scale_reference_is_gfloats_own_blocks(scale, rounding):
    """The reference above is gfloat's `quantize_block` with that scale, where gfloat
    defines it: finite blocks whose scale is not 0 (and, unsigned elements, no negative
    input)."""
    x = np.abs(_scale_inputs(np.float64)[:-1])  # no NaN nor inf
    for element, etype in ELEMENTS.items():
        scale_of = _gfloat_scale_of(scale, etype)
        info = gfloat.BlockFormatInfo(f"{element} / {scale}", etype, 16, gfloat_info(scale))
        ours = gfloat_blocks(etype, 16, x, rounding, None, scale_of)
        blocks = x.reshape(-1, 16)
        kept = ~_zero_scale_blocks(x, scale_of).reshape(-1, 16)[:, 0]
        theirs = [gfloat.quantize_block(info, block, lambda _, v: scale_of(np.max(np.abs(v))),
                                        GF_MODE[rounding]) for block in blocks[kept]]
        assert_same_bits(ours.reshape(-1, 16)[kept], np.array(theirs), blocks[kept],
                         f"{info.name} {rounding}")
