"""Block-scaled formats (OCP MX, NVFP4): the format objects, and `quantize` bit for bit
against gfloat (MX) and an independent `fractions` reference (NVFP4), on both backends,
eagerly and under XLA."""

import dataclasses
import fractions
import math

import gfloat
import gfloat.formats as gf
import keras
import numpy as np
import pytest
import tensorflow as tf

import tfhfp8
from tfhfp8 import formats

MX = {
    "mxfp8_e4m3": gf.format_info_mxfp8_e4m3,
    "mxfp8_e5m2": gf.format_info_mxfp8_e5m2,
    "mxfp6_e3m2": gf.format_info_mxfp6_e3m2,
    "mxfp6_e2m3": gf.format_info_mxfp6_e2m3,
    "mxfp4_e2m1": gf.format_info_mxfp4_e2m1,
    "mxint8": gf.format_info_mxint8,
}
GF_ROUNDING = {"nearest_even": gfloat.RoundMode.TiesToEven,
               "toward_zero": gfloat.RoundMode.TowardZero}
F32_MAX = float(np.finfo(np.float32).max)


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint64 if a.dtype == np.float64 else np.uint32)


def _quantize_all(backend, monkeypatch, x, fmt, **kwargs):
    """`tfhfp8.quantize(x, fmt, **kwargs)` on `backend`: on cpp once per CPU variant this
    CPU supports (each runs the block kernel's loops compiled for it), on tf eagerly and
    XLA-compiled. All must give the same bits; returns them as a NumPy array."""
    if backend == "tf":
        compiled = tf.function(lambda t: tfhfp8.quantize(t, fmt, **kwargs), jit_compile=True)
        results = [tfhfp8.quantize(x, fmt, **kwargs).numpy(),
                   compiled(tf.constant(x)).numpy()]
    else:
        results = []
        for variant in tfhfp8.ops.backend_info()["cpu_variants_supported"]:
            monkeypatch.setenv("TFHFP8_CPU_VARIANT", variant)
            results.append(tfhfp8.quantize(x, fmt, **kwargs).numpy())
        monkeypatch.delenv("TFHFP8_CPU_VARIANT")
    for other in results[1:]:
        np.testing.assert_array_equal(_bits(other), _bits(results[0]))
    return results[0]


# -- the format objects -------------------------------------------------------------
def test_named_formats_match_the_ocp_and_nvfp4_definitions():
    for name, info in MX.items():
        fmt = formats.get(name)
        assert isinstance(fmt, tfhfp8.BlockScaled) and fmt.name == name
        assert fmt.block_size == info.k == 32 and fmt.scale == "float8_e8m0fnu"
        assert fmt.emax_element == info.etype.emax
        assert fmt.element.max == info.etype.max
        assert fmt.scale_rounding == "floor" and not fmt.tensor_scale
    nvfp4 = formats.get("nvfp4")
    assert nvfp4.element.name == "float4_e2m1fn" and nvfp4.block_size == 16
    assert nvfp4.scale.name == "float8_e4m3fn" and nvfp4.tensor_scale
    assert nvfp4.scale_rounding == "nearest_even"
    assert set(MX) | {"nvfp4"} <= set(formats.names())


def test_formats_are_frozen_hashable_and_round_trip_through_configs():
    custom = tfhfp8.BlockScaled("float8_e4m3fn", 16, axis=0, scale_rounding="ceil")
    for fmt in [formats.get(name) for name in (*MX, "nvfp4")] + [
            custom, tfhfp8.BlockScaled("int8", 4),
            tfhfp8.BlockScaled(tfhfp8.FloatFormat(3, 4, bias=5), 8, scale="bfloat16",
                               tensor_scale=True, scale_rounding="floor")]:
        assert hash(fmt) == hash(formats.get(formats.serialize(fmt)))
        assert formats.get(formats.serialize(fmt)) == fmt
        config = keras.saving.serialize_keras_object(fmt)
        assert keras.saving.deserialize_keras_object(config) == fmt
        with pytest.raises(dataclasses.FrozenInstanceError):
            fmt.block_size = 3
    assert formats.serialize(formats.get("mxfp8_e4m3")) == "mxfp8_e4m3"
    assert formats.get(formats.serialize(custom)) == custom
    assert {custom: 1}[tfhfp8.BlockScaled("float8_e4m3fn", 16, axis=0,
                                          scale_rounding="ceil")] == 1


@pytest.mark.parametrize("kwargs, parameter", [
    (dict(element="float9"), "element"),
    (dict(element="int16_dfp"), "element"),
    (dict(element="mxfp8_e4m3"), "element"),
    (dict(element=3.0), "element"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=2.0), "block_size"),
    (dict(block_size=True), "block_size"),
    (dict(scale="float8_e8m0"), "scale"),
    (dict(scale="int16_dfp"), "scale"),
    (dict(axis="last"), "axis"),
    (dict(axis=40), "axis"),
    (dict(tensor_scale=1), "tensor_scale"),
    (dict(tensor_scale=True), "tensor_scale"),
    (dict(scale_rounding="nearest_even"), "scale_rounding"),
    (dict(scale="float8_e4m3fn", scale_rounding="ceil"), "scale_rounding"),
])
def test_bad_arguments_name_the_parameter(kwargs, parameter):
    kwargs = {"element": "float8_e4m3fn", **kwargs}
    with pytest.raises((ValueError, TypeError), match=parameter):
        tfhfp8.BlockScaled(**kwargs)


def test_axis_out_of_range_for_the_tensor_is_a_clear_error(backend):
    with pytest.raises(ValueError, match="axis 2 .* rank 2"):
        tfhfp8.quantize(tf.ones([2, 3]), tfhfp8.BlockScaled("float8_e4m3fn", 4, axis=2))


# -- MX against gfloat --------------------------------------------------------------
def _gfloat_blocks(info, x, block_size, rounding, axis=-1):
    """gfloat.quantize_block on consecutive blocks of x along axis (last may be short)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    out = np.empty_like(x)
    for index in np.ndindex(x.shape[:-1]):
        row = x[index]
        out[index] = np.concatenate([
            gfloat.quantize_block(info, row[i:i + block_size], gfloat.compute_scale_amax,
                                  GF_ROUNDING[rounding])
            for i in range(0, len(row), block_size)])
    return np.moveaxis(out, -1, axis)


def _mxint8_symmetric(reference, x, block_size):
    """gfloat's MXINT8 elements are two's complement (-128/64 = -2 allowed); tfhfp8's
    are symmetric (+-127/64, as microxcaling): -2 * scale becomes -127/64 * scale."""
    out = reference.copy()
    for index in np.ndindex(x.shape[:-1]):
        for i in range(0, x.shape[-1], block_size):
            block = np.abs(x[index][i:i + block_size]).astype(np.float64)
            amax = block.max()
            if amax == 0 or not np.isfinite(amax):
                continue
            scale = 2.0 ** np.clip(np.floor(np.log2(amax)), -127, 127)
            chunk = out[index][i:i + block_size]
            chunk[chunk == -2 * scale] = -127 / 64 * scale
    return out


def _adversarial_rows(rng):
    """Rows of 64 float32 values (two blocks of 32), one hard case per row."""
    tiny = np.float32(2.0**-149)
    rows = []
    for scale in (1e-3, 1.0, 1e4):
        rows.append(rng.standard_normal(64) * scale)
    rows.append(np.zeros(64))
    rows.append(np.full(64, -0.0))
    huge = rng.standard_normal(64) * 1e-3
    huge[5], huge[40] = F32_MAX, -3e38
    rows.append(huge)
    rows.append(rng.integers(-2**23, 2**23, 64) * tiny)  # subnormal blocks
    rows.append(rng.integers(-8, 8, 64) * tiny)  # a few quanta: scale clamps at 2^-127
    rows.append(np.where(rng.random(64) < 0.5, 2.0**-126, -(2.0**-127)))
    rows.append(rng.standard_normal(64) * 2.0**120)  # scales near the top of E8M0
    mixed = rng.standard_normal(64) * np.exp2(rng.integers(-60, 60, 64))
    rows.append(mixed)
    # Ties of every element format: multiples of small powers of two around a max.
    rows.append(rng.integers(-64, 64, 64) / 8.0 * 2.0**rng.integers(-3, 4))
    rows.append(np.concatenate([[448.0, 464.0, 480.0, 500.0, 511.9, 57344, 61440, 65000],
                                rng.integers(-512, 512, 56) / 2.0]))
    rows.append(np.concatenate([[-1.99, 1.99, -1.995, 1.995, -1.9999, 0.0078125, 0.01171875,
                                 0.0234375], rng.integers(-255, 256, 56) / 128.0]))
    return np.array(rows, np.float32)


@pytest.mark.arithmetic
@pytest.mark.parametrize("name", list(MX))
@pytest.mark.parametrize("rounding", list(GF_ROUNDING))
def test_mx_matches_gfloat_bit_for_bit(backend, monkeypatch, name, rounding):
    rng = np.random.default_rng(sum(map(ord, name + rounding)))
    x = _adversarial_rows(rng)
    reference = _gfloat_blocks(MX[name], x, 32, rounding)
    if name == "mxint8":
        reference = _mxint8_symmetric(reference, x, 32)
    y = _quantize_all(backend, monkeypatch, x, name, rounding=rounding)
    np.testing.assert_array_equal(y.view(np.uint32), reference.astype(np.float32).view(np.uint32))


def test_mxint8_differs_from_gfloat_only_at_minus_two(backend, monkeypatch):
    """The documented discrepancy, shown: gfloat rounds -1.999 * 2^k to -2 * 2^k."""
    x = np.array([[-1.999, 1.5] + [0.25] * 30], np.float32)
    ours = _quantize_all(backend, monkeypatch, x, "mxint8")
    theirs = _gfloat_blocks(gf.format_info_mxint8, x, 32, "nearest_even")
    assert theirs[0, 0] == -2.0 and ours[0, 0] == -127 / 64
    np.testing.assert_array_equal(ours[0, 1:], theirs[0, 1:])


@pytest.mark.arithmetic
@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp4_e2m1", "mxint8"])
def test_partial_blocks_and_other_axes_match_gfloat(backend, monkeypatch, name):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((70, 3)) * np.exp2(rng.integers(-10, 10, (70, 3)))).astype(
        np.float32)
    base = formats.get(name)
    for axis, size in ((0, 32), (-2, 16), (1, 2), (-1, 32)):
        fmt = tfhfp8.BlockScaled(base.element, size, axis=axis)
        info = gfloat.BlockFormatInfo("custom", MX[name].etype, size, MX[name].stype)
        reference = _gfloat_blocks(info, x, size, "nearest_even", axis=axis)
        if name == "mxint8":
            moved = np.moveaxis(x, axis, -1)
            reference = np.moveaxis(_mxint8_symmetric(np.moveaxis(reference, axis, -1),
                                                      moved, size), -1, axis)
        y = _quantize_all(backend, monkeypatch, x, fmt)
        np.testing.assert_array_equal(y.view(np.uint32),
                                      reference.astype(np.float32).view(np.uint32))
    # A 3-D tensor blocked along its middle axis, 5 elements: one partial block of 5.
    x3 = rng.standard_normal((2, 5, 4)).astype(np.float32)
    y3 = _quantize_all(backend, monkeypatch, x3, tfhfp8.BlockScaled(base.element, 32, axis=1))
    ref3 = _gfloat_blocks(MX[name], x3, 32, "nearest_even", axis=1)
    if name == "mxint8":
        moved = np.moveaxis(x3, 1, -1)
        ref3 = np.moveaxis(_mxint8_symmetric(np.moveaxis(ref3, 1, -1), moved, 32), -1, 1)
    np.testing.assert_array_equal(y3, ref3.astype(np.float32))


def test_nan_and_inf_in_a_block(backend, monkeypatch):
    x = np.ones((3, 64), np.float32)
    x[0, 3] = np.nan
    x[1, 40] = np.inf
    x[2, 0] = -np.inf
    # A NaN poisons its block (as gfloat and microxcaling); the other block is exact.
    y = _quantize_all(backend, monkeypatch, x, "mxfp8_e4m3")
    reference = _gfloat_blocks(gf.format_info_mxfp8_e4m3, x[:1], 32, "nearest_even")
    np.testing.assert_array_equal(y[:1], reference.astype(np.float32))
    assert np.isnan(y[0, :32]).all() and (y[0, 32:] == 1).all()
    # Not saturating, an infinity gives its block a NaN scale (microxcaling; gfloat clips
    # the scale to 2^127 and saturates instead, returning values beyond float32).
    assert np.isnan(y[1, 32:]).all() and (y[1, :32] == 1).all()
    assert np.isnan(y[2, :32]).all() and (y[2, 32:] == 1).all()
    # Saturating, an infinity is the largest float32: same as quantizing that value.
    ys = _quantize_all(backend, monkeypatch, x[1:], "mxfp8_e4m3", saturate=True)
    finite = np.nan_to_num(x[1:], posinf=F32_MAX, neginf=-F32_MAX)
    np.testing.assert_array_equal(
        ys, _gfloat_blocks(gf.format_info_mxfp8_e4m3, finite, 32, "nearest_even").astype(
            np.float32))
    assert ys[0, 40] == 448 * 2.0**119


def test_float64_scales_beyond_e8m0(backend, monkeypatch):
    """float64 blocks past 2^127 * 2^emax: NaN (E8M0 has no inf), or, saturating, the
    scale clamps at 2^127 and the elements saturate, which is what gfloat does."""
    x = np.array([[2.0**200, 1.0, -2.0**140, 3.0**90] + [0.0] * 28], np.float64)
    assert np.isnan(_quantize_all(backend, monkeypatch, x, "mxfp8_e4m3")).all()
    y = _quantize_all(backend, monkeypatch, x, "mxfp8_e4m3", saturate=True)
    np.testing.assert_array_equal(
        y, _gfloat_blocks(gf.format_info_mxfp8_e4m3, x, 32, "nearest_even"))
    assert y.dtype == np.float64


def test_ceil_scale_never_saturates(backend, monkeypatch):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((16, 32)) * np.exp2(rng.integers(-30, 30, (16, 1)))).astype(
        np.float32)
    x[0, 0] = 480.0  # floor scale 2^0 saturates it to 448; ceil picks 2^1
    fmt = tfhfp8.BlockScaled("float8_e4m3fn", scale_rounding="ceil")
    y = _quantize_all(backend, monkeypatch, x, fmt)
    amax = np.abs(x).max(axis=1, keepdims=True).astype(np.float64)
    k = np.ceil(np.log2(amax / 448.0))
    info = gf.format_info_ocp_e4m3
    expected = np.array([[gfloat.round_float(info, v / 2.0**kk, gfloat.RoundMode.TiesToEven,
                                             True) * 2.0**kk for v in row]
                         for row, kk in zip(x.astype(np.float64), k[:, 0])])
    np.testing.assert_array_equal(y, expected.astype(np.float32))
    assert y[0, 0] == 480.0


def test_scalars_empty_tensors_and_low_precision_dtypes(backend):
    assert float(tfhfp8.quantize(tf.constant(1000.0), "mxfp4_e2m1")) == 768.0
    # A scalar is one block of one element: NVFP4's S = fl32(1000 / 2688) makes it inexact.
    y = tfhfp8.quantize(tf.constant(-1000.0, tf.float64), "nvfp4")
    rank1 = tfhfp8.quantize(np.array([-1000.0]), "nvfp4")
    assert y.shape == [] and float(y) == float(rank1[0]) != -1000
    for shape, axis in (([0], -1), ([3, 0, 2], 1), ([3, 0, 2], 0)):
        fmt = tfhfp8.BlockScaled("float8_e4m3fn", 4, axis=axis)
        assert tfhfp8.quantize(tf.zeros(shape), fmt).shape == shape
        assert tfhfp8.quantize(tf.zeros(shape), "nvfp4").shape == shape
    for dtype in (tf.float16, tf.bfloat16):
        x = tf.constant([[1.0, 0.1, -3.0, 7.0]], dtype)
        y = tfhfp8.quantize(x, "mxfp4_e2m1")
        assert y.dtype == dtype
        np.testing.assert_array_equal(
            y.numpy().astype(np.float32),
            tfhfp8.quantize(tf.cast(x, tf.float32), "mxfp4_e2m1").numpy())


def test_stochastic_rounding_picks_a_neighbour_reproducibly(backend, monkeypatch):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((4, 96)) * 10).astype(np.float32)
    fmt = formats.get("mxfp4_e2m1")
    down = tfhfp8.quantize(x, fmt, rounding="toward_zero").numpy()
    y = _quantize_all(backend, monkeypatch, x, fmt, rounding="stochastic", seed=11)
    np.testing.assert_array_equal(y, tfhfp8.quantize(x, fmt, rounding="stochastic",
                                                     seed=11).numpy())
    # Each result is the value toward zero or the next one away from zero.
    amax = np.abs(x.reshape(4, 3, 32)).max(-1, keepdims=True)
    scale = np.broadcast_to(2.0 ** (np.floor(np.log2(amax)) - 2), (4, 3, 32)).reshape(4, 96)
    grid = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    up = np.sign(x) * grid[np.minimum(np.searchsorted(grid, np.abs(down) / scale) + 1, 7)] * scale
    assert np.all((y == down) | (y == up))
    assert 0 < np.mean(y != down) < 1


def test_gradient_is_straight_through():
    x = tf.constant(np.linspace(-3, 5, 40, dtype=np.float32).reshape(2, 20))
    for name in ("mxfp8_e4m3", "nvfp4"):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(tfhfp8.quantize(x, name) * 3.0)
        np.testing.assert_array_equal(tape.gradient(y, x).numpy(), np.full((2, 20), 3.0))


# -- NVFP4 against an independent fractions reference ---------------------------------
def _round_to(value, fmt, mode):
    """Exact rounding of a Fraction to a FloatFormat's grid, saturating at its max."""
    if value == 0:
        return fractions.Fraction(0)
    sign, v = (-1 if value < 0 else 1), abs(value)
    e = math.floor(math.log2(v))  # corrected exactly below
    while fractions.Fraction(2) ** e > v:
        e -= 1
    while fractions.Fraction(2) ** (e + 1) <= v:
        e += 1
    quantum = fractions.Fraction(2) ** (max(e, 1 - fmt.bias) - fmt.mantissa_bits)
    n, remainder = divmod(v, quantum)
    if mode == "nearest_even":
        if remainder * 2 > quantum or (remainder * 2 == quantum and n % 2 == 1):
            n += 1
    result = n * quantum
    return sign * min(result, fractions.Fraction(fmt.max))


def _nvfp4_reference(x, fmt, rounding="nearest_even"):
    F = fractions.Fraction
    float32 = tfhfp8.FloatFormat(8, 23)
    element, scale = fmt.element, fmt.scale
    out = np.empty(x.shape, np.float32)
    finite = [F(float(v)) for v in x.ravel()]
    if fmt.tensor_scale:
        amax_t = max(abs(v) for v in finite)
        s = F(1) if amax_t == 0 else max(
            _round_to(amax_t / (F(scale.max) * F(element.max)), float32, "nearest_even"),
            F(2) ** -149)
    else:
        s = F(1)
    for index in np.ndindex(x.shape[:-1]):
        row = [F(float(v)) for v in x[index]]
        for i in range(0, len(row), fmt.block_size):
            block = row[i:i + fmt.block_size]
            amax = max(abs(v) for v in block)
            block_scale = _round_to(amax / (F(element.max) * s), scale, {
                "nearest_even": "nearest_even", "floor": "toward_zero"}[fmt.scale_rounding])
            d = block_scale * s
            for j, v in enumerate(block):
                if d == 0:
                    y = math.copysign(0.0, float(v))
                else:
                    q = _round_to(v / d, element, rounding)
                    y = float(_round_to(q * d, float32, "nearest_even"))
                    if q == 0:
                        y = math.copysign(0.0, float(v))
                out[index + (i + j,)] = y
    return out


def _nvfp4_cases(rng):
    F = np.float32
    cases = [
        rng.standard_normal((3, 40)) * 3,
        rng.standard_normal((2, 32)) * np.exp2(rng.integers(-40, 40, (2, 32))),
        np.concatenate([rng.standard_normal((1, 16)) * 1e4, rng.standard_normal((1, 16)) * 1e-4],
                       axis=1),  # second block's scale underflows E4M3: zeros
        rng.integers(-2**20, 2**20, (2, 24)) * 2.0**-149,  # a subnormal tensor
        np.zeros((1, 16)),
        # Exact ties: block amax 7.5 -> scale 1.25; 3.125 / 1.25 = 2.5 lies between 2 and 3.
        np.array([[7.5, 3.125, -3.125, 0.625, 1.875, 4.375, 0.3125] + [0.0] * 9]),
        rng.standard_normal((2, 16)) * 1e35,
        _mixed_tiny_blocks(rng),
    ]
    return [np.asarray(c, F) for c in cases]


def _mixed_tiny_blocks(rng):
    """One row of NVFP4 blocks whose results are float32 normals (block 0, holding
    subnormal elements too, and block 2) and subnormals (block 1: scale * tensor scale
    below 2^-125) and a zero-scale block 3: the C++ kernel rounds these blocks with
    different code, in one run."""
    x = np.concatenate([rng.standard_normal(16) * 2.0**-115,
                        rng.standard_normal(16) * 2.0**-124,
                        rng.standard_normal(16) * 2.0**-116,
                        rng.standard_normal(16) * 2.0**-140])
    x[[3, 36]] = 2.0**-140, -(2.0**-147)
    return x.reshape(1, -1)


@pytest.mark.parametrize("fmt", [
    "nvfp4",
    tfhfp8.BlockScaled("float4_e2m1fn", 16, scale="float8_e4m3fn"),
    tfhfp8.BlockScaled("float6_e2m3fn", 8, scale="float8_e4m3fn", tensor_scale=True,
                       scale_rounding="floor"),
], ids=["nvfp4", "e4m3_scale_no_tensor_scale", "e2m3_floor"])
@pytest.mark.arithmetic
@pytest.mark.parametrize("rounding", ["nearest_even", "toward_zero"])
def test_float_scales_match_the_fractions_reference(backend, monkeypatch, fmt, rounding):
    fmt = formats.get(fmt)
    rng = np.random.default_rng(11)
    for x in _nvfp4_cases(rng):
        expected = _nvfp4_reference(x, fmt, rounding)
        y = _quantize_all(backend, monkeypatch, x, fmt, rounding=rounding)
        np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))


def test_nvfp4_tie_rounds_to_even(backend):
    fmt = tfhfp8.BlockScaled("float4_e2m1fn", 16, scale="float8_e4m3fn")
    y = tfhfp8.quantize(np.array([[7.5, 3.125, 0.3125] + [0.0] * 13], np.float32), fmt)
    # scale 7.5 / 6 = 1.25 (exact in E4M3); 2.5 -> 2, 0.25 -> 0 (ties to even).
    np.testing.assert_array_equal(y.numpy()[0, :3], [7.5, 2.5, 0.0])


def test_nvfp4_nan_and_inf(backend):
    x = np.ones((1, 48), np.float32)
    x[0, 1], x[0, 20] = np.nan, np.inf
    y = tfhfp8.quantize(x, "nvfp4").numpy()
    assert np.isnan(y[0, :32]).all()
    # The tensor scale comes from the finite elements: the last block as if alone.
    np.testing.assert_array_equal(y[0, 32:], _nvfp4_reference(x[:, 32:], formats.get("nvfp4"))[0])
    ys = tfhfp8.quantize(x, "nvfp4", saturate=True).numpy()
    assert np.isnan(ys[0, :16]).all() and np.isfinite(ys[0, 16:]).all()
    finite = x.copy()
    finite[0, 20] = F32_MAX  # the same tensor and block scales, as the infinity counts so
    np.testing.assert_array_equal(ys[0, 16:], tfhfp8.quantize(finite[:, 16:], "nvfp4").numpy()[0])
    assert ys[0, 20] > 3e38


# -- usable wherever a format is ---------------------------------------------------
def test_policy_roles_accept_block_formats():
    policy = tfhfp8.Policy("mx", weights="mxfp8_e4m3", activations="mxfp8_e4m3",
                           errors="mxfp8_e5m2", weight_gradients="nvfp4",
                           rounding=dict(errors="stochastic"))
    assert policy.weights == formats.get("mxfp8_e4m3")
    config = policy.get_config()
    assert config["weights"] == "mxfp8_e4m3"
    assert tfhfp8.Policy.from_config(config) == policy
    custom = tfhfp8.Policy(weights=tfhfp8.BlockScaled("float8_e4m3fn", 16), activations=None)
    assert tfhfp8.Policy.from_config(custom.get_config()) == custom

    keras.utils.set_random_seed(0)
    layer = tfhfp8.layers.Dense(8, policy=policy)
    x = tf.constant(np.random.default_rng(0).standard_normal((4, 40)), tf.float32)
    with tf.GradientTape() as tape:
        y = layer(x)
        loss = tf.reduce_sum(y * y)
    grads = tape.gradient(loss, layer.trainable_variables)
    # The forward GEMM blocks x along its features and the kernel along its input
    # axis (axis 0): both along the reduction (tests/test_gemm_scaling.py has the rest).
    along_inputs = tfhfp8.BlockScaled("float8_e4m3fn", 32, axis=0)
    expected = tf.matmul(tfhfp8.quantize(x, "mxfp8_e4m3"),
                         tfhfp8.quantize(layer.kernel, along_inputs)) + layer.bias
    np.testing.assert_array_equal(y.numpy(), expected.numpy())
    assert all(np.isfinite(g.numpy()).all() for g in grads)

    model = keras.Sequential([keras.Input((40,)), tfhfp8.layers.Dense(8, policy=policy)])
    rows = tfhfp8.summary(model, print_fn=lambda line: None)
    assert "W:mxfp8_e4m3" in rows[0]["formats"] and "E:mxfp8_e5m2/sr" in rows[0]["formats"]
    assert "G:nvfp4" in rows[0]["formats"]


def test_cli_formats_table_lists_block_formats():
    from tfhfp8 import cli
    table = cli.formats_table().splitlines()
    rows = {line.split()[0]: line for line in table[2:]}
    assert set(rows) == set(formats.names())
    assert rows["mxfp8_e4m3"].split()[1:5] == ["8.25", "4-3", "7", "448"]
    assert "blocks of 32 x float8_e8m0fnu" in rows["mxfp8_e4m3"]
    assert rows["mxint8"].split()[1:4] == ["8.25", "int8", "1.98438"]
    assert "blocks of 16 x float8_e4m3fn scale in an FP32 tensor scale" in rows["nvfp4"]


def test_guide_block_formats_example_prints_what_it_says(capsys):
    import pathlib
    import re
    page = pathlib.Path(__file__).resolve().parent.parent / "docs" / "block_formats.md"
    code = re.search(r"```python\n(.*?)```", page.read_text(), re.S).group(1)
    exec(compile(code, str(page), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    # mxfp8_e4m3, one block, amax 1000: scale 2^(9 - 8); 0.1 / 2 rounds to 0.05078125.
    assert printed[0] == "[[1.0, 0.1015625, -3.0, 896.0]]"
    assert printed[1] == "[[1.0, 0.125, -0.0, 768.0]]"
    assert printed[2].startswith("<tfhfp8.Policy") and "mxfp8_e5m2" in printed[2]


@pytest.mark.parametrize("name", ["mxfp8_e4m3", "nvfp4"])
def test_large_tensors_compiled_outside_xla_give_the_same_bits(backend, name):
    """Above 2^16 elements quantize runs the block code compiled by XLA; rows are
    independent (blocks along the last axis, NVFP4's tensor scale aside), so row chunks
    below that size (run op by op) must agree."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((300, 256)) * np.exp2(rng.integers(-20, 20, (300, 1)))).astype(
        np.float32)
    x[0, 0] = 1e9  # NVFP4: the same tensor scale in every chunk
    big = tfhfp8.quantize(x, name).numpy()
    for start in range(0, 300, 100):
        chunk = x[start:start + 100].copy()
        chunk[0, 0] = 1e9
        small = tfhfp8.quantize(chunk, name).numpy()
        np.testing.assert_array_equal(big[start + 1:start + 100], small[1:])


# -- the two backends agree bit for bit ------------------------------------------------
def _hard_blocks(rng, dtype):
    """19 rows of 70: every row's last block is partial (70 = 2 * 32 + 6 = 4 * 16 + 6),
    and so is the last block of every column along axis 0 for blocks of 8."""
    rows = list(_adversarial_rows(rng)[:, :64].astype(dtype))  # 14 rows
    nan_inf = np.ones(64, dtype)
    nan_inf[[3, 40]] = np.nan, np.inf
    rows.append(nan_inf)
    rows.append(np.where(np.arange(64) % 5 == 0, -np.inf, 0.5).astype(dtype))
    top = rng.standard_normal(64) * F32_MAX / 4
    top[0] = F32_MAX  # ceil scales here reach past float32's max
    rows.append(top)
    if dtype == np.float64:  # beyond E8M0 and float32; float64 subnormals
        rows.append(rng.standard_normal(64) * 2.0**300)
        rows.append(rng.integers(-2**40, 2**40, 64) * 2.0**-1074)
    else:
        rows.append(rng.standard_normal(64) * 2.0**-140)
        rows.append(rng.standard_normal(64) * 2.0**-126)
        signs = np.where(rng.random(64) < 0.5, -1.0, 1.0)
        # Elements from float32's smallest subnormal up to the block's amax: some scaled
        # below 2^-126; and amaxes 2^t, 2^(t+1) around the smallest scales at which
        # the C++ kernel's round-to-nearest loop shifts exponent fields.
        rows.append(signs * np.exp2(rng.uniform(-149, 100, 64)))
        for t in range(-120, -96, 2):
            row = signs * np.exp2(rng.uniform(-149, t, 64))
            row[[7, 40]] = 2.0**t, -(2.0**(t + 1))
            rows.append(row)
    x = np.array(rows, dtype)
    with np.errstate(over="ignore"):  # the row at the float32 limit overflows to inf
        return np.concatenate([x, x[:, :6] * dtype(3)], axis=1)


@pytest.mark.parametrize("fmt", [
    "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1", "mxint8", "nvfp4",
    tfhfp8.BlockScaled("float8_e4m3fn", 8, axis=0, scale_rounding="ceil"),
    tfhfp8.BlockScaled("float4_e2m1fn", 8, axis=0, scale="float8_e4m3fn", tensor_scale=True,
                       scale_rounding="floor"),
    tfhfp8.BlockScaled("float6_e2m3fn", 5, scale="bfloat16"),
], ids=lambda f: f if isinstance(f, str) else f"{f.element.name}_{f.block_size}_{f.axis}")
def test_backends_agree_bit_for_bit_on_hard_blocks(fmt, monkeypatch):
    """The fused C++ kernel (each CPU variant) against the TF-ops code: all zeros, one
    huge value, subnormal blocks, NaN / inf, scales at the E8M0 and float32 limits,
    partial blocks; every rounding (stochastic with the same bits), saturating or not,
    float32 and float64."""
    rng = np.random.default_rng(13)
    fmt = formats.get(fmt)
    for dtype in (np.float32, np.float64):
        x = _hard_blocks(rng, dtype)
        for rounding in ("nearest_even", "stochastic", "toward_zero"):
            for saturate in (False, True):
                kwargs = dict(rounding=rounding, saturate=saturate, seed=21)
                monkeypatch.setenv("TFHFP8_BACKEND", "tf")
                expected = tfhfp8.quantize(x, fmt, **kwargs).numpy()
                monkeypatch.setenv("TFHFP8_BACKEND", "cpp")
                got = _quantize_all("cpp", monkeypatch, x, fmt, **kwargs)
                np.testing.assert_array_equal(_bits(got), _bits(expected),
                                              f"{dtype.__name__} {rounding} {saturate}")


def test_nvfp4_blocks_of_normal_subnormal_and_zero_results_agree(monkeypatch):
    """The C++ kernel's fast and general NVFP4 blocks side by side in one row, every
    rounding (stochastic with the same random bits): the TF-ops code's bits."""
    x = np.concatenate([_mixed_tiny_blocks(np.random.default_rng(5))] * 3).astype(np.float32)
    x[1] *= -1.0
    for rounding in ("nearest_even", "stochastic", "toward_zero"):
        monkeypatch.setenv("TFHFP8_BACKEND", "tf")
        expected = tfhfp8.quantize(x, "nvfp4", rounding=rounding, seed=4).numpy()
        monkeypatch.setenv("TFHFP8_BACKEND", "cpp")
        got = _quantize_all("cpp", monkeypatch, x, "nvfp4", rounding=rounding, seed=4)
        np.testing.assert_array_equal(_bits(got), _bits(expected), rounding)
        tiny = got[:, 16:32]
        assert np.any((tiny != 0) & (np.abs(tiny) < 2.0**-126)), "no subnormal result"
        head = got[:, :16]
        assert not np.any(got[:, 48:]) and np.all((head == 0) | (np.abs(head) >= 2.0**-126))


@pytest.mark.parametrize("fmt", [
    "mxfp8_e4m3", "nvfp4", tfhfp8.BlockScaled("float8_e5m2", 32, axis=0)],
    ids=["mxfp8_e4m3", "nvfp4", "e5m2_axis0"])
def test_backends_agree_on_large_tensors_with_stochastic_rounding(fmt, monkeypatch):
    """Above 2^16 elements: the TF-ops code compiled by XLA, the C++ kernel split over
    threads (blocks along axis 0: column tiles of 128 and a partial one)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((260, 300)) * np.exp2(rng.integers(-20, 20, (260, 1)))).astype(
        np.float32)
    results = []
    for backend in ("tf", "cpp"):
        monkeypatch.setenv("TFHFP8_BACKEND", backend)
        results.append(tfhfp8.quantize(x, fmt, rounding="stochastic", seed=-5).numpy())
    np.testing.assert_array_equal(_bits(results[1]), _bits(results[0]))
    down = tfhfp8.quantize(x, fmt, rounding="toward_zero").numpy()
    assert 0.01 < np.mean(results[0] != down)


@pytest.mark.parametrize("attrs, message", [
    (dict(block_size=0), "block_size must be in"),
    (dict(block_size=1 << 17), "block_size must be in"),
    (dict(axis=2), "axis 2 .* rank 2"),
    (dict(axis=-3), "axis -3 .* rank 2"),
    (dict(element_exponent_bits=9), "element_exponent_bits must be in"),
    (dict(element_bias=300), "element_bias must be in"),
    (dict(scale_rounding="nearest_even"), "scale_rounding must be 'floor', 'ceil' or 'rceil'"),
    (dict(tensor_scale=True), "tensor_scale=true needs scale='float'"),
    (dict(scale="float", scale_rounding="ceil"), "scale_rounding must be 'nearest_even'"),
    (dict(scale="float", scale_rounding="floor", scale_mantissa_bits=30),
     "scale_mantissa_bits must be in"),
    (dict(scale="float", scale_rounding="floor", scale_signed=False),
     "scale_signed=false is for the P3109 specials"),
])
def test_the_kernel_rejects_bad_attributes_with_a_clear_error(attrs, message):
    """Called directly (tfhfp8 itself never passes these): an error, never a crash."""
    from tfhfp8.ops import cpp_backend
    base = dict(axis=-1, block_size=32, element_exponent_bits=4, element_mantissa_bits=3,
                element_bias=7, element_specials="fn", element_subnormals=True, scale="e8m0",
                scale_rounding="floor", rounding="nearest_even", saturate=False)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
        cpp_backend.load().hfp8_quantize_block(tf.ones([2, 3]), tf.constant(0, tf.int64),
                                               **{**base, **attrs})
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="seed"):
        cpp_backend.load().hfp8_quantize_block(tf.ones([2, 3]), tf.constant([0, 1], tf.int64),
                                               **base)


# -- block floating point (DynamicFixedPoint with block_size) ------------------------
def _block_dfp_reference(x, bits, block_size, rounding, axis=-1):
    """Fractions: per block E_s = E_max - (bits - 2), one more when max|x| would round to
    2^(bits-1); never below float32's smallest exponent 2^-149; I = round(x / 2^E_s)."""
    F = fractions.Fraction
    limit = 2 ** (bits - 1) - 1
    moved = np.moveaxis(x, axis, -1)
    out = np.empty(moved.shape, np.float32)

    def round_int(v):
        n = math.floor(v)
        if rounding == "toward_zero":
            return math.trunc(v)
        rest = v - n
        return n + (1 if rest > F(1, 2) or (rest == F(1, 2) and n % 2) else 0)

    for index in np.ndindex(moved.shape[:-1]):
        row = [F(float(v)) for v in moved[index]]
        for i in range(0, len(row), block_size):
            block = row[i:i + block_size]
            amax = max(abs(v) for v in block)
            if amax == 0:
                e = -149
            else:
                e_max = math.floor(math.log2(amax))
                while F(2) ** e_max > amax:
                    e_max -= 1
                while F(2) ** (e_max + 1) <= amax:
                    e_max += 1
                e = e_max - (bits - 2)
                if rounding == "nearest_even" and round_int(amax / F(2) ** e) > limit:
                    e += 1
                e = max(e, -149)
            for j, v in enumerate(block):
                value = float(round_int(v / F(2) ** e) * F(2) ** e)
                out[index + (i + j,)] = math.copysign(value, moved[index + (i + j,)])
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("bits, block_size, axis", [(8, 16, None), (4, 32, -1), (16, 8, 0),
                                                    (12, 5, 1)])
@pytest.mark.parametrize("rounding", ["nearest_even", "toward_zero"])
def test_block_dfp_matches_the_fractions_reference(backend, bits, block_size, axis, rounding):
    rng = np.random.default_rng(bits * 100 + block_size)
    x = rng.standard_normal((6, 40)) * np.exp2(rng.integers(-30, 30, (6, 40)))
    x[0] = 0.0
    x[1, :20] = rng.integers(-2**23, 2**23, 20) * 2.0**-149  # subnormal blocks
    x[2, :16] = np.where(rng.random(16) < 0.5, 1.0, -1.0) * (2.0**8 - 0.5) * 2.0**-3
    x[2, 16:32] = np.where(rng.random(16) < 0.5, 1.0, -1.0) * (2.0**7 - 0.5)  # amax a tie
    x[3, :8] = np.array([2.5, 3.5, -4.5, 0.5, 1.5, -2.5, 3.0, 7.0]) * 2.0**-10  # ties
    x = x.astype(np.float32)
    fmt = tfhfp8.DynamicFixedPoint(bits, axis=axis, block_size=block_size)
    expected = _block_dfp_reference(x, bits, block_size, rounding,
                                    axis=-1 if axis is None else axis)
    y = tfhfp8.quantize(x, fmt, rounding=rounding).numpy()
    np.testing.assert_array_equal(y.view(np.uint32), expected.view(np.uint32))
    if backend == "tf":  # the C++ kernels do not run inside XLA (TFHFP8_BACKEND=cpp forces them)
        compiled = tf.function(lambda t: tfhfp8.quantize(t, fmt, rounding=rounding),
                               jit_compile=True)
        np.testing.assert_array_equal(compiled(tf.constant(x)).numpy().view(np.uint32),
                                      expected.view(np.uint32))


def test_block_dfp_stochastic_is_identical_on_both_backends(monkeypatch):
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((8, 50)) * 100).astype(np.float32)
    fmt = tfhfp8.DynamicFixedPoint(6, block_size=16)
    results = []
    for backend in ("tf", "cpp"):
        monkeypatch.setenv("TFHFP8_BACKEND", backend)
        results.append(tfhfp8.quantize(x, fmt, rounding="stochastic", seed=4).numpy())
    np.testing.assert_array_equal(results[0], results[1])
    down = tfhfp8.quantize(x, fmt, rounding="toward_zero").numpy()
    assert 0 < np.mean(results[0] != down) < 1


def test_block_dfp_format_object():
    fmt = tfhfp8.DynamicFixedPoint(8, block_size=32)
    assert formats.get(formats.serialize(fmt)) == fmt
    assert formats.get(fmt.get_config()) == fmt
    assert fmt != tfhfp8.DynamicFixedPoint(8)
    assert "block_size" not in tfhfp8.DynamicFixedPoint(8).get_config()
    assert repr(fmt) == "DynamicFixedPoint(bits=8, per block of 32 along axis -1)"
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="block_size"):
            tfhfp8.DynamicFixedPoint(8, block_size=bad)
    policy = tfhfp8.Policy(weights=fmt, activations=fmt)
    assert tfhfp8.Policy.from_config(policy.get_config()).weights == fmt


@pytest.mark.parametrize("fmt", [
    "mxfp4_e2m1", "nvfp4", tfhfp8.BlockScaled("float8_e4m3fn", 4, axis=3),
    tfhfp8.DynamicFixedPoint(6, block_size=3), tfhfp8.DynamicFixedPoint(6, axis=-2,
                                                                        block_size=2)])
def test_rank_above_eight_blocks_like_rank_three(fmt):
    """TF's select stops at rank 8: a rank-9 tensor is rounded through a rank-3 view
    that keeps every block."""
    fmt = formats.get(fmt)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 1, 3, 5, 1, 2, 1, 1, 7)) * np.exp2(
        rng.integers(-8, 8, (2, 1, 3, 5, 1, 2, 1, 1, 7)))).astype(np.float32)
    y = tfhfp8.quantize(x, fmt, rounding="stochastic", seed=1).numpy()
    # The same blocks in a rank-4 tensor (the axes around the block axis merged).
    axis = fmt.axis if fmt.axis is not None else -1
    axis %= 9
    small = x.reshape(int(np.prod(x.shape[:axis])), x.shape[axis], -1, 1)
    expected = tfhfp8.quantize(small, dataclasses.replace(fmt, axis=1), rounding="stochastic",
                               seed=1).numpy().reshape(x.shape)
    np.testing.assert_array_equal(y, expected)


def test_a_model_trains_with_block_formats_in_every_role():
    keras.utils.set_random_seed(1)
    policy = tfhfp8.Policy("mx", weights="mxfp8_e4m3", activations="mxfp8_e4m3",
                           errors="mxfp8_e5m2", weight_gradients="mxfp4_e2m1",
                           master_weights=tfhfp8.DynamicFixedPoint(12, block_size=8),
                           rounding=dict(errors="stochastic", weight_gradients="stochastic"))
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        tfhfp8.layers.Conv2D(4, 3, policy=policy),
        keras.layers.Flatten(),
        tfhfp8.layers.Dense(2, policy=policy),
    ])
    model.compile("sgd", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((16, 8, 8, 3)).astype(np.float32), rng.integers(0, 2, 16)
    before = [w.numpy() for w in model.trainable_weights]
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    after = [w.numpy() for w in model.trainable_weights]
    assert any((a != b).any() for a, b in zip(after, before))
    # Master weights stay on their block-DFP grid.
    kernel = model.layers[-1].kernel.numpy()
    np.testing.assert_array_equal(
        kernel, tfhfp8.quantize(kernel, tfhfp8.DynamicFixedPoint(12, block_size=8)).numpy())


@pytest.mark.parametrize("fmt", [
    "mxfp8_e4m3", "nvfp4", tfhfp8.DynamicFixedPoint(8, block_size=16),
    tfhfp8.BlockScaled("float4_e2m1fn", 8, axis=0)])
def test_unknown_shapes_in_graphs(fmt):
    x = np.random.default_rng(0).standard_normal((3, 70)).astype(np.float32)
    dynamic = tf.function(lambda t: tfhfp8.quantize(t, fmt),
                          input_signature=[tf.TensorSpec([None, None])])
    np.testing.assert_array_equal(dynamic(x).numpy(), tfhfp8.quantize(x, fmt).numpy())
    unknown_rank = tf.function(lambda t: tfhfp8.quantize(t, fmt),
                               input_signature=[tf.TensorSpec(None)])
    with pytest.raises(ValueError, match="known rank"):
        unknown_rank(x)
