"""The scales of today's recipes as their reference code computes them, bit for bit
against numpy references of Transformer Engine's float32 operation sequences: FP32 block
scales (Float8BlockScaling, DeepSeek-V3) in 1 x n blocks and 2D tiles, with the
`deepseek_v3_fp8` preset in layers; MXFP8's E8M0 scales rounded up as TE and cuBLAS
round them ("rceil", MXFP8BlockScaling)."""

import dataclasses

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import tfhfp8
from tfhfp8 import datasets

FLT_MAX = np.float32(np.finfo(np.float32).max)
ELEMENTS = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2}


def te_reference(x, element, rows, cols, power_of_two):
    """TE's `blockwise_quantizer_reference` + `scale_from_amax_tensor` (eps 0) in numpy
    float32 (IEEE, no flushing), tiles of rows x cols over the last two axes of `x`
    (padded with zeros), elements cast with ml_dtypes (nearest even)."""
    dtype = ELEMENTS[element]
    top = np.float32(ml_dtypes.finfo(dtype).max)
    *lead, r, c = x.shape
    pr, pc = -r % rows, -c % cols
    padded = np.pad(x, [(0, 0)] * len(lead) + [(0, pr), (0, pc)])
    tiles = padded.reshape(*lead, (r + pr) // rows, rows, (c + pc) // cols, cols)
    with np.errstate(all="ignore"):
        amax = np.abs(tiles).max(axis=(-3, -1), keepdims=True)  # NaN propagates
        scale = top / amax
        scale[np.isinf(scale)] = FLT_MAX
        if power_of_two:
            _, exponent = np.frexp(scale)
            scale = np.ldexp(np.float32(1), exponent - 1).astype(np.float32)
            scale[np.isinf(amax)] = 0
        scale[amax == 0] = 1
        scale_inv = np.float32(1) / scale
        q = np.clip(tiles * scale, -top, top).astype(dtype).astype(np.float32)
        y = (q * scale_inv).astype(np.float32)
    return y.reshape(padded.shape)[..., :r, :c]


def _adversarial(shape, seed, tiny=True):
    """Outliers, -0, an all-zero row, NaN and infinities; with `tiny`, also subnormals and
    blocks whose scale is huge (computed on the bits, not in float32 operations)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-8, 8, shape))).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    flat[0, :4] = [1e4, -3e-3, 448.0, -0.0]
    flat[1 % len(flat)] = 0.0
    if len(flat) > 2:
        flat[-1, -3:] = [np.nan, np.inf, -np.inf]
        flat[-2, :2] = [1e-30, 3e38]
    if tiny:
        flat[0, 4] = 2.0**-140
        if len(flat) > 2:
            flat[2] *= np.float32(2.0**-135)                # a row of subnormals
            flat[-2, 0] = 1e-38
    return x


def _assert_same_bits(actual, expected):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    assert actual.shape == expected.shape
    differ = actual.view(np.uint32) != expected.view(np.uint32)
    differ &= ~(np.isnan(actual) & np.isnan(expected))
    assert not differ.any(), (f"{differ.sum()} of {differ.size} differ, e.g. "
                              f"{actual[differ][:4]} vs {expected[differ][:4]}")


@pytest.mark.parametrize("tiny", [False, True], ids=["float32_ops", "on_the_bits"])
@pytest.mark.parametrize("backend", ["tf", "cpp"])
@pytest.mark.parametrize("element", sorted(ELEMENTS))
@pytest.mark.parametrize("power_of_two", [False, True])
@pytest.mark.parametrize("tile, shape", [((1, 128), (3, 300)), ((128, 128), (130, 250)),
                                         ((2, 16), (2, 5, 40)), ((1, 32), (2, 3, 4, 5, 70))])
def test_matches_transformer_engines_reference_arithmetic(backend, element, power_of_two,
                                                          tile, shape, tiny):
    x = _adversarial(shape, seed=sum(shape), tiny=tiny)
    fmt = tfhfp8.BlockScaled(element, block_shape=tile, scale="float32",
                             scale_rounding="power_of_two" if power_of_two else None)
    with tfhfp8.ops.forced_backend(backend):
        got = tfhfp8.quantize(tf.constant(x), fmt)
    _assert_same_bits(got, te_reference(x, element, *tile, power_of_two))


def test_other_axes_float64_and_xla_agree_with_the_reference():
    x = _adversarial((40, 6), seed=3)
    fmt = tfhfp8.BlockScaled("float8_e4m3fn", 16, scale="float32", axis=0)
    expected = te_reference(x.T, "float8_e4m3fn", 1, 16, False).T
    _assert_same_bits(tfhfp8.quantize(tf.constant(x), fmt), expected)
    fast = _adversarial((40, 6), seed=3, tiny=False)
    _assert_same_bits(tfhfp8.quantize(tf.constant(fast), fmt),
                      te_reference(fast.T, "float8_e4m3fn", 1, 16, False).T)
    as_float64 = tfhfp8.quantize(tf.constant(x.astype(np.float64)), fmt)
    assert as_float64.dtype == tf.float64
    _assert_same_bits(as_float64.numpy().astype(np.float32), expected)
    compiled = tf.function(lambda t: tfhfp8.quantize(t, fmt), jit_compile=True)
    _assert_same_bits(compiled(tf.constant(x)), expected)
    _assert_same_bits(compiled(tf.constant(fast)),
                      te_reference(fast.T, "float8_e4m3fn", 1, 16, False).T)


def test_stochastic_rounding_picks_a_neighbour_of_the_scaled_value():
    x = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
    fmt = tfhfp8.formats.get("e4m3_1x128")
    nearest = tfhfp8.quantize(tf.constant(x), fmt).numpy()
    draws = tfhfp8.quantize(tf.constant(x), fmt, rounding="stochastic", seed=1).numpy()
    again = tfhfp8.quantize(tf.constant(x), fmt, rounding="stochastic", seed=1).numpy()
    np.testing.assert_array_equal(draws, again)
    assert (draws != nearest).any()
    # Each draw lies on the grid of its block: within one element spacing of x.
    assert np.all(np.abs(draws - x) <= np.abs(x) * 2.0**-3 + 1e-30)


def test_named_formats_and_their_configs():
    tiles = tfhfp8.formats.get("e4m3_128x128")
    assert tiles.block_shape == (128, 128) and tiles.block_size == 128 and tiles.tiles
    assert tiles.bits == 8 + 32 / 128**2
    assert tfhfp8.BlockScaled.from_config(tiles.get_config()) == tiles
    rows = tfhfp8.formats.get("e4m3_1x128")
    assert rows == tfhfp8.BlockScaled("float8_e4m3fn", block_shape=(1, 128), scale="float32")
    assert not rows.tiles and rows.float32_blocks and "block_shape" not in rows.get_config()


@pytest.mark.parametrize("kwargs, message", [
    (dict(block_shape=(128,)), "block_shape must be .rows, cols."),
    (dict(block_shape=(0, 4)), "block_shape\\[0\\]"),
    (dict(block_shape=(16, 16), block_size=64), "sets block_size to 16"),
    (dict(block_shape=(16, 16), axis=0), "axis must be -1"),
    (dict(block_size=None, scale="float8_e8m0fnu"), "block_size=None .per-tensor scaling."),
    (dict(scale_rounding="floor"), "'nearest_even', 'power_of_two'"),
])
def test_bad_block_shapes_are_clear_errors(kwargs, message):
    kwargs.setdefault("scale", "float32")
    with pytest.raises(ValueError, match=message):
        tfhfp8.BlockScaled("float8_e4m3fn", **kwargs)


def test_tiles_need_two_axes():
    with pytest.raises(ValueError, match="block_shape .* needs a tensor of rank >= 2"):
        tfhfp8.quantize(tf.ones([300]), "e4m3_128x128")


def _quantized_product_and_input_gradient(layer, x, dy, equation, kernel_axes):
    """The layer's output and input gradient, and those of the recipe written out: x and
    dy in 1 x 128 blocks along each GEMM's reduction axis, the kernel tiled once in its
    [K, rest] layout (`kernel_axes`: its forward reduction axes)."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    dx = tape.gradient(y, x, output_gradients=dy)
    blocks = tfhfp8.formats.get("e4m3_1x128")
    kernel = tf.convert_to_tensor(layer.kernel)
    wq = tfhfp8.gemm.axes.quantize_tiled(kernel, kernel_axes,
                                         lambda t: tfhfp8.quantize(t, "e4m3_128x128"))
    y_ref = tf.einsum(equation, tfhfp8.quantize(x, blocks), wq)
    inputs, out = equation.split("->")
    a, b = inputs.split(",")
    dyq = tfhfp8.gemm.axes.quantize_along(dy, [out.index(ch) for ch in out if ch in b],
                                          lambda t: tfhfp8.quantize(t, blocks))
    dx_ref = tf.einsum(f"{out},{b}->{a}", dyq, wq)
    return (y, dx), (y_ref, dx_ref)


@pytest.mark.parametrize("make, equation, kernel_axes, x_shape, dy_shape", [
    (lambda p: tfhfp8.layers.Dense(200, use_bias=False, policy=p), "ab,bc->ac", (0,),
     (4, 300), (4, 200)),
    (lambda p: tfhfp8.layers.EinsumDense("abc,cde->abde", (None, 3, 70), policy=p),
     "abc,cde->abde", (0,), (2, 5, 150), (2, 5, 3, 70)),
])
def test_layers_quantize_the_kernel_once_in_tiles_and_the_rest_in_rows(
        make, equation, kernel_axes, x_shape, dy_shape):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(x_shape).astype(np.float32))
    dy = tf.constant(rng.standard_normal(dy_shape).astype(np.float32))
    (y, dx), (y_ref, dx_ref) = _quantized_product_and_input_gradient(
        make("deepseek_v3_fp8"), x, dy, equation, kernel_axes)
    _assert_same_bits(y, y_ref)
    _assert_same_bits(dx, dx_ref)


def test_the_preset_trains_on_real_data_and_reloads_identically(tmp_path):
    (x, y), (xt, yt) = datasets.load("digits", seed=0)[:2]
    x, xt = x.reshape(len(x), -1)[:512], xt.reshape(len(xt), -1)[:256]
    y, yt = y[:512], yt[:256]
    keras.utils.set_random_seed(0)
    dense = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Dense(256, "relu"),
                              keras.layers.Dense(256, "relu"), keras.layers.Dense(10)])
    model = tfhfp8.quantize_model(dense, "deepseek_v3_fp8")
    assert model.layers[1].policy == tfhfp8.Policy("deepseek_v3_fp8")
    model.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=["accuracy"])
    model.fit(x, y, epochs=4, batch_size=64, verbose=0)
    accuracy = model.evaluate(xt, yt, verbose=0)[1]
    assert accuracy > 0.8, accuracy
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(reloaded.predict(xt, verbose=0), model.predict(xt, verbose=0))


def te_mxfp8_reference(x, element):
    """TE's MXFP8 quantization (`float_to_e8m0(amax * max_norm_rcp)`, `exp2f_rcp`, a
    saturating cast; tests/cpp/test_common.h) of finite float32 `x` in blocks of 32 along
    the last axis, in numpy float32, and its dequantized values."""
    dtype = ELEMENTS[element]
    top = float(ml_dtypes.finfo(dtype).max)
    *lead, n = x.shape
    blocks = np.pad(x, [(0, 0)] * len(lead) + [(0, -n % 32)]).reshape(*lead, -1, 32)
    v = np.abs(blocks).max(axis=-1, keepdims=True) * np.float32(1.0 / top)
    bits = v.astype(np.float32).view(np.uint32)
    exponent, mantissa = (bits >> 23).astype(np.int64), bits & 0x7FFFFF
    up = (mantissa > 0) & (exponent != 0xFE) & ~((exponent == 0) & (mantissa <= 0x400000))
    e8 = exponent + up
    scale_inv = np.ldexp(np.float32(1), 127 - e8).astype(np.float32)
    q = np.clip(blocks * scale_inv, -top, top).astype(dtype).astype(np.float64)
    y = (q * np.ldexp(1.0, e8 - 127)).astype(np.float32)
    return y.reshape(*lead, -1)[..., :n]


@pytest.mark.parametrize("backend", ["tf", "cpp"])
@pytest.mark.parametrize("name, element", [("mxfp8_e4m3_rceil", "float8_e4m3fn"),
                                           ("mxfp8_e5m2_rceil", "float8_e5m2")])
def test_rceil_scales_match_transformer_engines_mxfp8(backend, name, element):
    x = _adversarial((6, 200), seed=7)
    x[~np.isfinite(x)] = 1.0  # TE's kernels ignore a NaN in the amax; tfhfp8 gives a NaN block
    top = float(ml_dtypes.finfo(ELEMENTS[element]).max)
    x[3, :32] = top * 2.0 ** np.arange(-16, 16)   # amax exactly max * 2^k
    # amax * fl32(1 / max) just above 2^-127, a float32 subnormal: RCEIL's product rounds
    # down onto 2^-127, "ceil" takes 2^-126, and the block's smallest elements round apart.
    x[4] = top * 2.0 ** np.random.default_rng(4).uniform(-131, -127, 200)
    x[4, ::32] = np.nextafter(np.float32(top * 2.0**-127), np.float32(np.inf))
    smallest = float(ml_dtypes.finfo(ELEMENTS[element]).smallest_normal)
    x[4, 1::32] = x[4, ::32] * np.float32(0.65 * smallest / top)  # subnormal elements
    x[5] = np.float32(3e38) * np.linspace(-1, 1, 200, dtype=np.float32)
    expected = te_mxfp8_reference(x, element)
    with tfhfp8.ops.forced_backend(backend):
        got = tfhfp8.quantize(tf.constant(x), name)
        ceil = tfhfp8.quantize(tf.constant(x), dataclasses.replace(
            tfhfp8.formats.get(name), scale_rounding="ceil"))
    _assert_same_bits(got, expected)
    assert (ceil.numpy() != got.numpy()).any()  # the data tells the two roundings apart


def test_rceil_float64_blocks_round_their_amax_to_float32_first():
    x = np.random.default_rng(1).standard_normal((3, 64)) * 1e3
    fmt = tfhfp8.formats.get("mxfp8_e4m3_rceil")
    expected = te_mxfp8_reference(x.astype(np.float32), "float8_e4m3fn")
    for backend in ("tf", "cpp"):
        with tfhfp8.ops.forced_backend(backend):
            got = tfhfp8.quantize(tf.constant(x.astype(np.float32).astype(np.float64)), fmt)
        _assert_same_bits(got.numpy().astype(np.float32), expected)


def _tiles_as_rows(x, rows, cols):
    """Each rows x cols tile of 2-D `x` (zero padded) as one row, and the inverse."""
    r, c = x.shape
    padded = np.pad(x, [(0, -r % rows), (0, -c % cols)])
    grid = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
    flat = grid.transpose(0, 2, 1, 3).reshape(-1, rows * cols)

    def back(y):
        return (np.asarray(y).reshape(grid.shape[0], grid.shape[2], rows, cols)
                .transpose(0, 2, 1, 3).reshape(padded.shape)[:r, :c])
    return flat, back


@pytest.mark.parametrize("backend", ["tf", "cpp"])
@pytest.mark.parametrize("name, shape", [("mxfp8_e4m3", (70, 90)), ("nvfp4", (40, 50)),
                                         ("mxfp4_e2m1", (33, 64))])
def test_tiles_of_mx_and_nvfp4_scale_each_tile_as_one_block(backend, name, shape):
    # A rows x cols tile is one block of rows * cols elements (the 1D path, checked
    # against gfloat and fractions in test_block_formats.py); NVFP4's tensor scale stays
    # the whole tensor's. Padding zeros change no amax.
    x = _adversarial(shape, seed=11, tiny=False)
    x[~np.isfinite(x)] = 3.0
    one_d = tfhfp8.formats.get(name)
    rows, cols = 8, 16
    tiled = dataclasses.replace(one_d, name=None, block_shape=(rows, cols))
    flat, back = _tiles_as_rows(x, rows, cols)
    as_blocks = dataclasses.replace(one_d, name=None, block_size=rows * cols)
    with tfhfp8.ops.forced_backend(backend):
        got = tfhfp8.quantize(tf.constant(x), tiled)
        expected = back(tfhfp8.quantize(tf.constant(flat), as_blocks))
    _assert_same_bits(got, expected)


def test_nvfp4_weights_in_16x16_tiles_are_quantized_once_per_layer():
    policy = tfhfp8.Policy(weights="nvfp4_16x16", activations="nvfp4", errors="nvfp4")
    layer = tfhfp8.layers.Dense(48, use_bias=False, policy=policy)
    x = tf.constant(np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
    dy = tf.ones_like(y)
    dx = tape.gradient(y, x, output_gradients=dy)
    wq = tfhfp8.quantize(layer.kernel, "nvfp4_16x16")  # [K, N]: its GEMM layout already
    _assert_same_bits(y, tfhfp8.quantize(x, "nvfp4") @ wq)
    _assert_same_bits(dx, tfhfp8.quantize(dy, "nvfp4") @ tf.transpose(wq))
