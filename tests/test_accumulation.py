"""Emulated accumulation: the Accumulator, tfhfp8.matmul on both backends, against an
independent sequential reference (fractions) and apytypes."""

import keras
import pytest

import tfhfp8
from tfhfp8 import accumulation


# -- the Accumulator ------------------------------------------------------------------
@pytest.mark.parametrize("name", accumulation.names())
def test_named_accumulators_round_trip(name):
    acc = accumulation.get(name)
    assert accumulation.serialize(acc) == name
    assert accumulation.get(accumulation.serialize(acc)) == acc


def test_named_accumulators_are_what_they_say():
    assert accumulation.get("float32").kind == "float32"
    assert accumulation.get("float16").format == tfhfp8.formats.get("float16")
    assert accumulation.get("float16_chunk64") == tfhfp8.Accumulator("float16", chunk_size=64)
    assert accumulation.get("int32") == tfhfp8.Accumulator("int32", overflow="wrap")


@pytest.mark.parametrize("acc", [
    tfhfp8.Accumulator("float8_e5m2", chunk_size=16, rounding="stochastic",
                       outer_format="float16", products="bfloat16", saturate=True),
    tfhfp8.Accumulator(tfhfp8.FloatFormat(6, 9), chunk_size=3),
    tfhfp8.Accumulator("int32", chunk_size=8, overflow="saturate"),
])
def test_custom_accumulators_round_trip(acc):
    config = accumulation.serialize(acc)
    assert isinstance(config, dict)
    assert accumulation.get(config) == acc
    assert keras.saving.deserialize_keras_object(config) == acc


@pytest.mark.parametrize("kwargs, parameter", [
    (dict(format="float32", chunk_size=3), "chunk_size"),
    (dict(format="int32", rounding="stochastic"), "rounding"),
    (dict(format="int32", overflow="clamp"), "overflow"),
    (dict(format="float16", overflow="wrap"), "overflow"),
    (dict(format=tfhfp8.FloatFormat(8, 23)), "format"),
    (dict(format="int16_dfp"), "format"),
    (dict(format="float16", chunk_size=0), "chunk_size"),
    (dict(format="float16", chunk_size=2.5), "chunk_size"),
    (dict(format="float16", rounding="up"), "rounding"),
    (dict(format="float16", outer_format="float32"), "outer_format"),
    (dict(format="float16", products="nope"), "products"),
    (dict(format="float16", saturate=1), "saturate"),
])
def test_bad_arguments_name_the_parameter(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        tfhfp8.Accumulator(**kwargs)


def test_accumulator_is_frozen():
    acc = tfhfp8.Accumulator("float16")
    with pytest.raises(Exception):
        acc.chunk_size = 4


# -- an independent sequential reference (fractions) -------------------------------------
import bisect  # noqa: E402
import math  # noqa: E402
from fractions import Fraction  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import reference  # noqa: E402
from tfhfp8.ops import tf_accumulate  # noqa: E402


def _round_exact(q, spec, rounding, saturate):
    """The exact rational `q != 0` rounded once to `spec` (a Python float)."""
    negative = q < 0
    a = abs(q)
    values, codes, _ = spec.table
    i = bisect.bisect_right(values, a) - 1
    lo, lo_code = values[i], codes[i]
    if i + 1 < len(values):
        hi, hi_code = values[i + 1], codes[i + 1]
    else:
        hi, hi_code = spec.decode_unbounded(spec.max_code + 1), spec.max_code + 1
    if rounding == "toward_zero" or a == lo or a - lo < hi - a:
        result, code = lo, lo_code
    elif a - lo > hi - a:
        result, code = hi, hi_code
    else:
        result, code = (lo, lo_code) if lo_code % 2 == 0 else (hi, hi_code)
    overflow = code > spec.max_code and rounding != "toward_zero"
    if rounding == "toward_zero" and code > spec.max_code:
        result = spec.max
    return reference._finish(result, negative, spec, saturate, overflow)


def _add(acc, p, spec, rounding, saturate):
    """One addition of the definition: the exact sum rounded once, IEEE zero signs."""
    if not (math.isfinite(acc) and math.isfinite(p)):
        return reference.round_value(acc + p, spec, rounding, saturate)
    exact = Fraction(acc) + Fraction(p)
    if exact == 0:
        both_negative = math.copysign(1, acc) < 0 and math.copysign(1, p) < 0
        zero = -0.0 if both_negative else 0.0
        return 0.0 if spec.unsigned_zero else zero
    return _round_exact(exact, spec, rounding, saturate)


def reference_dot(a, b, acc):
    """`sum_k a[k] b[k]` as `acc` (a float Accumulator) defines it, term by term."""
    spec, outer = reference.Spec.of(acc.format), reference.Spec.of(acc.outer)
    products = None if acc.products is None else reference.Spec.of(acc.products)
    chunk = acc.chunk_size or max(len(a), 1)
    chunks = []
    for start in range(0, len(a), chunk):
        s = 0.0
        for k in range(start, min(start + chunk, len(a))):
            p = float(a[k]) * float(b[k])  # exact in float64 (<= 24-bit products)
            if products is not None:
                p = 0.0 * p if p == 0 else _round_exact(Fraction(p), products, acc.rounding,
                                                        acc.saturate)
            s = _add(s, p, spec, acc.rounding, acc.saturate)
        chunks.append(s)
    if len(chunks) <= 1:
        return chunks[0] if chunks else 0.0
    total = 0.0
    for s in chunks:
        total = _add(total, s, outer, acc.rounding, acc.saturate)
    return total


def reference_matmul(a, b, acc):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = np.empty((a.shape[0], b.shape[1]))
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = reference_dot(a[i], b[:, j], acc)
    return out.astype(np.float32)


def _bits(x):
    x = np.asarray(x, np.float32)
    # NaNs compare by class, every other value by its exact bits (zero signs included).
    return np.where(np.isnan(x), np.uint32(0x7FC00000), x.view(np.uint32))


def _assert_bits(got, expected):
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    bad = _bits(got) != _bits(expected)
    assert not bad.any(), (f"{bad.sum()} of {bad.size} differ, e.g. got {got[bad][:5]} "
                           f"expected {expected[bad][:5]}")


def _operands(rng, m, k, n, fmt, scale=1.0):
    a = tfhfp8.quantize(rng.normal(size=(m, k)).astype("float32") * scale, fmt,
                        saturate=True).numpy()
    b = tfhfp8.quantize(rng.normal(size=(k, n)).astype("float32") * scale, fmt,
                        saturate=True).numpy()
    return a, b


def _kernel(a, b, acc, seed=0):
    """The TF-ops kernel under XLA, as `tfhfp8.matmul` runs it."""
    c, swamped = tf.function(
        lambda a, b: tf_accumulate.accumulating_matmul(a, b, *acc.kernel_arguments(),
                                                       tf.constant(seed, tf.int64)),
        jit_compile=True)(tf.constant(a[None]), tf.constant(b[None]))
    return c.numpy()[0], int(swamped)


ACCUMULATORS = [
    tfhfp8.Accumulator("float16"),
    tfhfp8.Accumulator("bfloat16", chunk_size=64),
    tfhfp8.Accumulator("float8_e5m2", outer_format="float16", chunk_size=5),
    tfhfp8.Accumulator(tfhfp8.FloatFormat(6, 9), rounding="toward_zero", chunk_size=7),
    tfhfp8.Accumulator("float16", products="float8_e4m3", saturate=True, chunk_size=16),
]


@pytest.mark.parametrize("acc", ACCUMULATORS, ids=str)
def test_float_accumulation_matches_reference(acc):
    rng = np.random.default_rng(0)
    a, b = _operands(rng, 2, 300, 3, "float8_e4m3", scale=4.0)
    got, _ = _kernel(a, b, acc)
    _assert_bits(got, reference_matmul(a, b, acc))


@pytest.mark.parametrize("k", [0, 1, 13])
def test_short_sums(k):
    rng = np.random.default_rng(k)
    a, b = _operands(rng, 3, k, 2, "float8_e5m2", scale=64.0)
    acc = tfhfp8.Accumulator("float8_e4m3", chunk_size=4)
    got, _ = _kernel(a, b, acc)
    _assert_bits(got, reference_matmul(a, b, acc) if k else np.zeros((3, 2)))


def _adversarial(rng, k=40):
    """Operands `[4 cases, 4, k]`, `[4 cases, k, 3]`: cancellation, overflow, sums in
    FP16's subnormal range, exact ties."""
    # +x, -x pairs around large partial sums.
    x = rng.choice([1.0, 1024.0, 3.0, 2048.0, 0.125], size=(4, k // 2))
    cancel_a, cancel_b = np.concatenate([x, -x[:, ::-1]], axis=1), np.ones((k, 3))
    cancel_b[::3, 1] = 0.5
    # Past FP16's max 65504, then back.
    over_a = rng.choice([240.0, -240.0, 448.0], size=(4, k))
    over_b = np.full((k, 3), 240.0)
    over_b[k // 2:, 2] = -240.0
    # Sums in FP16's subnormal range (2^-24 .. 2^-14).
    sub_a = rng.choice([2.0**-9, -(2.0**-9), 2.0**-12, 3 * 2.0**-10], size=(4, k))
    sub_b = rng.choice([2.0**-9, 2.0**-13, 1.5 * 2.0**-8], size=(k, 3))
    # 2048 + odd integers lands halfway between FP16 values.
    tie_a = np.ones((4, k))
    tie_a[:, 0] = 2048.0
    tie_b = rng.choice([1.0, 3.0, -1.0, 0.5], size=(k, 3))
    a = np.stack([cancel_a, over_a, sub_a, tie_a]).astype("float32")
    b = np.stack([cancel_b, over_b, sub_b, tie_b]).astype("float32")
    return a, b


@pytest.mark.parametrize("acc", [tfhfp8.Accumulator("float16", chunk_size=4),
                                 tfhfp8.Accumulator("float16", saturate=True),
                                 tfhfp8.Accumulator("float16", rounding="toward_zero")],
                         ids=str)
def test_float_accumulation_adversarial(acc):
    a, b = _adversarial(np.random.default_rng(1))
    got, _ = tf.function(
        lambda a, b: tf_accumulate.accumulating_matmul(a, b, *acc.kernel_arguments(),
                                                       tf.constant(0, tf.int64)),
        jit_compile=True)(a, b)
    for case in range(4):
        _assert_bits(got[case], reference_matmul(a[case], b[case], acc))


def test_long_sums_with_chunks_not_dividing_k():
    rng = np.random.default_rng(7)
    a, b = _operands(rng, 1, 10_000, 1, "float8_e5m2")
    for acc in (tfhfp8.Accumulator("float16"), tfhfp8.Accumulator("float16", chunk_size=64)):
        got, _ = _kernel(np.abs(a), np.abs(b), acc)
        _assert_bits(got, reference_matmul(np.abs(a), np.abs(b), acc))


def test_swamping_counts_lost_addends():
    # 2048 then ones: in FP16 every +1 is lost (ties to even); with chunks of 4 none is.
    a = np.ones((1, 9), "float32")
    a[0, 0] = 2048.0
    b = np.ones((9, 1), "float32")
    c, swamped = _kernel(a, b, tfhfp8.Accumulator("float16"))
    assert (c[0, 0], swamped) == (2048.0, 8)
    # Chunks of 4: 2048 (three +1 lost), 4, 1; then 2048 + 4 = 2052, + 1 ties to 2052.
    c, swamped = _kernel(a, b, tfhfp8.Accumulator("float16", chunk_size=4))
    assert (c[0, 0], swamped) == (2052.0, 3)


def test_matches_apytypes():
    apytypes = pytest.importorskip("apytypes")
    rng = np.random.default_rng(3)
    a, b = _operands(rng, 3, 300, 4, "float8_e4m3", scale=8.0)
    got, _ = _kernel(a, b, tfhfp8.Accumulator("float16"))
    a_apy = apytypes.APyFloatArray.from_float(a, 4, 3)
    b_apy = apytypes.APyFloatArray.from_float(b, 4, 3)
    with apytypes.APyFloatAccumulatorContext(exp_bits=5, man_bits=10):
        expected = (a_apy @ b_apy).to_numpy()
    _assert_bits(got, expected.astype(np.float32))


# -- INT32 ---------------------------------------------------------------------------------
def reference_int32(a, b, chunk, overflow):
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    m, k = a.shape
    out, overflows = np.zeros((m, b.shape[1]), np.float32), 0
    for i in range(m):
        for j in range(b.shape[1]):
            total, s = np.float32(0), 0
            for t in range(k):
                s = s + int(a[i, t]) * int(b[t, j])
                if not -2**31 <= s < 2**31:
                    overflows += 1
                    s = ((s + 2**31) % 2**32) - 2**31 if overflow == "wrap" else \
                        min(max(s, -2**31), 2**31 - 1)
                if chunk and (t + 1) % chunk == 0 and t + 1 < k:
                    total, s = np.float32(total + np.float32(s)), 0
            out[i, j] = np.float32(total + np.float32(s))
    return out, overflows


@pytest.mark.parametrize("overflow", ["wrap", "saturate"])
@pytest.mark.parametrize("chunk", [None, 3, 16])
def test_int32_accumulation_matches_integers(overflow, chunk):
    rng = np.random.default_rng(5)
    a = rng.integers(-2**15 + 1, 2**15, size=(3, 50), dtype=np.int32)
    b = rng.integers(-2**15 + 1, 2**15, size=(50, 2), dtype=np.int32)
    a[0] = 2**15 - 1  # a row that overflows: 50 products of ~2^30
    b[:, 0] = 2**15 - 1
    c, overflows = tf.function(lambda a, b: tf_accumulate.int32_matmul(a, b, chunk, overflow),
                               jit_compile=True)(a[None], b[None])
    expected, expected_overflows = reference_int32(a, b, chunk, overflow)
    _assert_bits(c.numpy()[0], expected)
    assert int(overflows) == expected_overflows
    assert expected_overflows > 0 or chunk == 3


def test_int32_matmul_scales_by_shared_exponents():
    rng = np.random.default_rng(6)
    x, w = rng.normal(size=(4, 30)).astype("float32"), rng.normal(size=(30, 5)).astype("float32")
    got = tfhfp8.matmul(x, w, "int32", a_format="int16_dfp", b_format="int16_dfp").numpy()
    xq = tfhfp8.quantize(x, "int16_dfp").numpy().astype(np.float64)
    wq = tfhfp8.quantize(w, "int16_dfp").numpy().astype(np.float64)
    # Integer sums below 2^24 are exact: the result is the exact product, rounded once.
    np.testing.assert_array_equal(got, (xq @ wq).astype(np.float32))


# -- the emulated layers: forward, dx and dW with the policy's accumulators ----------------
LAYER_POLICY = dict(weights="float8_e4m3", activations="float8_e4m3", errors="float8_e5m2",
                    accumulation={"forward": "float16",
                                  "input_gradient": tfhfp8.Accumulator("float16", chunk_size=4),
                                  "weight_gradient": "bfloat16"})


def _layer_gradients(layer, x, rng):
    x = tf.constant(x)
    y = layer(x)  # builds
    g = tfhfp8.quantize(rng.normal(size=y.shape).astype("float32"), "float8_e5m2").numpy()
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * g)  # dy = g, already in the errors' format
    dx, dw = tape.gradient(loss, [x, layer.kernel])
    return y.numpy(), dx.numpy(), dw.numpy(), g


def test_dense_forward_and_gradients_match_reference():
    rng = np.random.default_rng(11)
    policy = tfhfp8.Policy(**LAYER_POLICY)
    layer = tfhfp8.layers.Dense(3, use_bias=False, policy=policy)
    x = rng.normal(size=(5, 37)).astype("float32")
    y, dx, dw, g = _layer_gradients(layer, x, rng)
    xq = tfhfp8.quantize(x, "float8_e4m3").numpy()
    wq = tfhfp8.quantize(layer.kernel, "float8_e4m3").numpy()
    accs = policy.accumulation
    _assert_bits(y, reference_matmul(xq, wq, accs["forward"]))
    _assert_bits(dx, reference_matmul(g, wq.T, accs["input_gradient"]))
    _assert_bits(dw, reference_matmul(xq.T, g, accs["weight_gradient"]))


def _conv_reference(x, w, dy, stride, accs):
    """Conv2D (padding "same") forward, dx and dW summed term by term in the documented
    orders: forward over (kernel row, kernel column, in channel), dW over (batch, output
    row, output column), dx over (flipped kernel row, column, out channel) of the output
    gradient dilated by the stride and padded."""
    n, h, wd, cin = x.shape
    k, cout = w.shape[0], w.shape[3]
    out = -(-h // stride)
    pad = max((out - 1) * stride + k - h, 0) // 2
    xp = np.zeros((n, h + 2 * k, wd + 2 * k, cin), np.float32)
    xp[:, pad:pad + h, pad:pad + wd] = x
    y = np.zeros((n, out, out, cout), np.float32)
    for b in range(n):
        for i in range(out):
            for j in range(out):
                patch = xp[b, i * stride:i * stride + k, j * stride:j * stride + k].reshape(-1)
                for co in range(cout):
                    y[b, i, j, co] = reference_dot(patch, w[..., co].reshape(-1),
                                                   accs["forward"])
    dw = np.zeros_like(w)
    for r in range(k):
        for c in range(k):
            for ci in range(cin):
                xs = xp[:, r:r + (out - 1) * stride + 1:stride,
                        c:c + (out - 1) * stride + 1:stride, ci].reshape(-1)
                for co in range(cout):
                    dw[r, c, ci, co] = reference_dot(xs, dy[..., co].reshape(-1),
                                                     accs["weight_gradient"])
    dx = np.zeros_like(x)
    for b in range(n):
        for hh in range(h):
            for ww in range(wd):
                for ci in range(cin):
                    terms_a, terms_b = [], []
                    for jr in range(k):
                        for jc in range(k):
                            for co in range(cout):
                                # padded-input row hh + pad gets dy[o] where
                                # o * stride + (k - 1 - jr) == hh + pad.
                                u, v = hh + pad - (k - 1 - jr), ww + pad - (k - 1 - jc)
                                ok = (u % stride == 0 and v % stride == 0
                                      and 0 <= u // stride < out and 0 <= v // stride < out)
                                terms_a.append(dy[b, u // stride, v // stride, co] if ok else 0.0)
                                terms_b.append(w[k - 1 - jr, k - 1 - jc, ci, co])
                    dx[b, hh, ww, ci] = reference_dot(terms_a, terms_b, accs["input_gradient"])
    return y, dx, dw


def test_conv2d_forward_and_gradients_match_reference():
    rng = np.random.default_rng(12)
    policy = tfhfp8.Policy(**LAYER_POLICY)
    layer = tfhfp8.layers.Conv2D(3, 3, strides=2, padding="same", use_bias=False,
                                 policy=policy)
    x = rng.normal(size=(2, 5, 5, 2)).astype("float32")
    y, dx, dw, g = _layer_gradients(layer, x, rng)
    xq = tfhfp8.quantize(x, "float8_e4m3").numpy()
    wq = tfhfp8.quantize(layer.kernel, "float8_e4m3").numpy()
    y_ref, dx_ref, dw_ref = _conv_reference(xq, wq, g, 2, policy.accumulation)
    _assert_bits(y, y_ref)
    _assert_bits(dw, dw_ref)
    _assert_bits(dx, dx_ref)
    # The same convolution in FP32 (Keras) differs only by the sums' rounding.
    np.testing.assert_allclose(
        y, keras.ops.conv(xq, wq, strides=2, padding="same").numpy(), rtol=0.01, atol=0.05)


# Integer operands and a 22-bit accumulator: every sum is exact, so each layer's forward,
# dx and dW must equal Keras' own float32 ones bit for bit whatever the order: this checks
# the geometry (patches, pads, strides, dilations, flipped kernels, layouts).
EXACT_SUMS = dict(weights="float8_e4m3", activations="float16", errors="float16",
                  accumulation=tfhfp8.Accumulator(tfhfp8.FloatFormat(8, 21)))


@pytest.mark.parametrize("make, shape", [
    (lambda p: tfhfp8.layers.Conv1D(3, 3, padding="causal", dilation_rate=2, policy=p),
     (2, 9, 2)),
    (lambda p: tfhfp8.layers.Conv2D(3, (3, 2), strides=(2, 1), padding="same",
                                    data_format="channels_first", policy=p), (2, 2, 7, 6)),
    (lambda p: tfhfp8.layers.Conv3D(2, 2, strides=2, policy=p), (1, 5, 4, 4, 2)),
    (lambda p: tfhfp8.layers.DepthwiseConv2D(3, strides=2, depth_multiplier=2,
                                             padding="same", policy=p), (2, 7, 6, 3)),
    (lambda p: tfhfp8.layers.SeparableConv2D(4, 3, dilation_rate=2, depth_multiplier=2,
                                             policy=p), (1, 7, 7, 2)),
    (lambda p: tfhfp8.layers.Conv2D(4, 3, groups=2, strides=2, padding="same", policy=p),
     (2, 6, 5, 4)),
    (lambda p: tfhfp8.layers.Conv1D(6, 2, groups=3, padding="causal", policy=p), (2, 6, 3)),
    (lambda p: tfhfp8.layers.Conv2DTranspose(3, 3, strides=2, padding="same", policy=p),
     (2, 4, 5, 2)),
    (lambda p: tfhfp8.layers.Conv2DTranspose(2, (3, 2), strides=(2, 3), output_padding=(1, 2),
                                             data_format="channels_first", policy=p),
     (1, 2, 3, 4)),
    (lambda p: tfhfp8.layers.Conv2DTranspose(2, 3, dilation_rate=2, padding="same",
                                             policy=p), (1, 5, 5, 2)),
    (lambda p: tfhfp8.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 3),
                                         policy=p), (2, 3, 4)),
], ids=["conv1d", "conv2d", "conv3d", "depthwise", "separable", "grouped_conv2d",
        "grouped_conv1d", "conv2d_transpose", "conv2d_transpose_valid",
        "conv2d_transpose_dilated", "einsum_dense"])
def test_layer_geometry_with_exact_sums(make, shape):
    rng = np.random.default_rng(31)
    emulated, plain = make(tfhfp8.Policy(**EXACT_SUMS)), make("float32")
    x = tf.constant(rng.integers(-4, 5, size=shape).astype("float32"))
    emulated(x), plain(x)
    for w_e, w_p in zip(emulated.trainable_weights, plain.trainable_weights):
        value = rng.integers(-4, 5, size=w_e.shape).astype("float32")
        w_e.assign(value)
        w_p.assign(value)
    results = []
    for layer in (emulated, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            g = tf.constant(np.random.default_rng(32).integers(-4, 5, size=y.shape), tf.float32)
            loss = tf.reduce_sum(y * g)
        grads = tape.gradient(loss, [x] + layer.trainable_weights)
        results.append([y.numpy()] + [v.numpy() for v in grads])
    for got, expected in zip(*results):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fmt", ["float8_e4m3", "mxfp8_e4m3"])
def test_multi_head_attention_geometry_with_exact_sums(fmt):
    # FP8 operands (and small integers): every sum of every GEMM (projections, QK^T,
    # attention x V, their gradients) is exact in 22 bits, so the emulated sums equal
    # the same policy's FP32 sums bit for bit. MXFP8: each GEMM blocks its operands
    # along its own reduction, with or without emulated sums.
    formats = dict(weights=fmt, activations=fmt, errors=fmt)
    make = lambda p: tfhfp8.layers.MultiHeadAttention(num_heads=2, key_dim=3, policy=p)
    emulated = make(tfhfp8.Policy(**formats, accumulation=EXACT_SUMS["accumulation"]))
    plain = make(tfhfp8.Policy(**formats))
    rng = np.random.default_rng(3)
    q = tf.constant(rng.integers(-3, 4, size=(2, 4, 5)).astype("float32"))
    v = tf.constant(rng.integers(-3, 4, size=(2, 3, 5)).astype("float32"))
    emulated(q, v), plain(q, v)
    for w_e, w_p in zip(emulated.trainable_weights, plain.trainable_weights):
        value = rng.integers(-2, 3, size=w_e.shape).astype("float32") / 4
        w_e.assign(value)
        w_p.assign(value)
    results = []
    for layer in (emulated, plain):
        with tf.GradientTape() as tape:
            tape.watch([q, v])
            y = layer(q, v)
            g = tf.constant(np.random.default_rng(4).integers(-4, 5, size=y.shape) / 8,
                            tf.float32)
            loss = tf.reduce_sum(y * g)
        grads = tape.gradient(loss, [q, v] + layer.trainable_weights)
        results.append([y.numpy()] + [t.numpy() for t in grads])
    for got, expected in zip(*results):
        np.testing.assert_array_equal(got, expected)
    # The projections are emulated EinsumDense layers with the same accumulators.
    assert emulated._query_dense.policy.accumulates


BACKENDS = ["tf", "cpp"]


def _remapped(accs, **kinds):
    return {kind: accs[kinds.get(kind, kind)] for kind in accs}


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_transpose_matches_reference(backend, monkeypatch):
    # A transposed convolution is the input gradient of the convolution C it transposes:
    # its forward, dx and dW are C's dx, forward and dW (the reference's orders).
    monkeypatch.setenv("TFHFP8_BACKEND", backend)
    rng = np.random.default_rng(13)
    policy = tfhfp8.Policy(**LAYER_POLICY)
    layer = tfhfp8.layers.Conv2DTranspose(3, 3, strides=2, padding="same", use_bias=False,
                                          policy=policy)
    x = rng.normal(size=(2, 3, 3, 2)).astype("float32")
    y, dx, dw, g = _layer_gradients(layer, x, rng)
    xq = tfhfp8.quantize(x, "float8_e4m3").numpy()
    wq = tfhfp8.quantize(layer.kernel, "float8_e4m3").numpy()
    accs = _remapped(policy.accumulation, forward="input_gradient", input_gradient="forward")
    dx_ref, y_ref, dw_ref = _conv_reference(g, wq, xq, 2, accs)
    _assert_bits(y, y_ref)
    _assert_bits(dx, dx_ref)
    _assert_bits(dw, dw_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_conv2d_matches_reference(backend, monkeypatch):
    monkeypatch.setenv("TFHFP8_BACKEND", backend)
    rng = np.random.default_rng(14)
    policy = tfhfp8.Policy(**LAYER_POLICY)
    layer = tfhfp8.layers.Conv2D(4, 3, strides=2, padding="same", groups=2, use_bias=False,
                                 policy=policy)
    x = rng.normal(size=(1, 5, 5, 4)).astype("float32")
    y, dx, dw, g = _layer_gradients(layer, x, rng)
    xq = tfhfp8.quantize(x, "float8_e4m3").numpy()
    wq = tfhfp8.quantize(layer.kernel, "float8_e4m3").numpy()
    # Each group is a convolution of its own channels (input 2, output 2 per group).
    parts = [_conv_reference(xq[..., 2 * i:2 * i + 2], wq[..., 2 * i:2 * i + 2],
                             g[..., 2 * i:2 * i + 2], 2, policy.accumulation)
             for i in range(2)]
    _assert_bits(y, np.concatenate([p[0] for p in parts], -1))
    _assert_bits(dx, np.concatenate([p[1] for p in parts], -1))
    _assert_bits(dw, np.concatenate([p[2] for p in parts], -1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_einsum_dense_matches_reference(backend, monkeypatch):
    # K runs over the contracted labels in the first operand's order: forward over c,
    # dx (einsum "abde,cde->abc") over (d, e), dW ("abc,abde->cde") over (a, b).
    monkeypatch.setenv("TFHFP8_BACKEND", backend)
    rng = np.random.default_rng(15)
    policy = tfhfp8.Policy(**LAYER_POLICY)
    layer = tfhfp8.layers.EinsumDense("abc,cde->abde", output_shape=(None, 2, 3),
                                      policy=policy)
    x = rng.normal(size=(2, 3, 19)).astype("float32")
    y, dx, dw, g = _layer_gradients(layer, x, rng)
    xq = tfhfp8.quantize(x, "float8_e4m3").numpy().reshape(6, 19)
    wq = tfhfp8.quantize(layer.kernel, "float8_e4m3").numpy().reshape(19, 6)
    g = g.reshape(6, 6)
    accs = policy.accumulation
    _assert_bits(y.reshape(6, 6), reference_matmul(xq, wq, accs["forward"]))
    _assert_bits(dx.reshape(6, 19), reference_matmul(g, wq.T, accs["input_gradient"]))
    _assert_bits(dw.reshape(19, 6), reference_matmul(xq.T, g, accs["weight_gradient"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_products_match_reference(backend, monkeypatch):
    # MultiHeadAttention's two products (its own equations) with their gradients:
    # scores[b, n, t, s] = sum_h query[b, t, n, h] key[b, s, n, h] and
    # context[b, t, n, h] = sum_s attention[b, n, t, s] value[b, s, n, h].
    from tfhfp8 import gemm
    monkeypatch.setenv("TFHFP8_BACKEND", backend)
    layer = tfhfp8.layers.MultiHeadAttention(num_heads=2, key_dim=9, policy="fp8")
    layer(np.ones((1, 2, 4), "float32"), np.ones((1, 3, 4), "float32"))
    spec = layer.attention_spec()
    accs = tfhfp8.Policy(**LAYER_POLICY).accumulation
    rng = np.random.default_rng(16)
    q8 = lambda *shape: tfhfp8.quantize(rng.normal(size=shape).astype("float32") * 4,
                                        "float8_e4m3").numpy()
    b_, t_, s_, n_, h_ = 2, 5, 6, 2, 9
    for equation, first, second, out in [
            (spec.scores_equation, q8(b_, s_, n_, h_), q8(b_, t_, n_, h_), (b_, n_, t_, s_)),
            (spec.combine_equation, q8(b_, n_, t_, s_), q8(b_, s_, n_, h_), (b_, t_, n_, h_))]:
        a, b = tf.constant(first), tf.constant(second)
        dc = q8(*out)
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            c = gemm.layer_einsum(a, b, equation, accs, (None, None, None),
                                  tf.zeros([], tf.int64), gemm.Stats())
            loss = tf.reduce_sum(c * dc)
        da, db = tape.gradient(loss, [a, b])
        for i in range(b_):
            for n in range(n_):
                if equation == spec.scores_equation:  # key, query -> scores
                    key, query, d = first[i, :, n], second[i, :, n], dc[i, n]
                    _assert_bits(c[i, n], reference_matmul(query, key.T, accs["forward"]))
                    _assert_bits(da[i, :, n], reference_matmul(d.T, query,
                                                               accs["input_gradient"]))
                    _assert_bits(db[i, :, n], reference_matmul(d, key, accs["weight_gradient"]))
                else:  # attention, value -> context
                    att, value, d = first[i, n], second[i, :, n], dc[i, :, n]
                    _assert_bits(c[i, :, n], reference_matmul(att, value, accs["forward"]))
                    _assert_bits(da[i, n], reference_matmul(d, value.T, accs["input_gradient"]))
                    _assert_bits(db[i, :, n], reference_matmul(att.T, d,
                                                               accs["weight_gradient"]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_with_block_scaled_formats_matches_reference(backend, monkeypatch):
    # Each GEMM blocks its operands along its own reduction axis (OCP MX), then sums
    # them with its accumulator: forward x (along in) . W (along in), dx dy (along out)
    # . W^T (along out), dW x^T (along tokens) . dy (along tokens).
    import dataclasses
    monkeypatch.setenv("TFHFP8_BACKEND", backend)
    policy = tfhfp8.Policy(**{**LAYER_POLICY, "weights": "mxfp8_e4m3",
                              "activations": "mxfp8_e4m3", "errors": "mxfp8_e5m2"})
    rng = np.random.default_rng(17)
    layer = tfhfp8.layers.Dense(3, use_bias=False, policy=policy)
    x = tf.constant(rng.normal(size=(40, 37)).astype("float32"))
    y = layer(x)
    g = rng.normal(size=y.shape).astype("float32")
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * g)
    dx, dw = tape.gradient(loss, [x, layer.kernel])
    w = layer.kernel.numpy()

    def along(t, fmt, axis):
        return tfhfp8.quantize(t, dataclasses.replace(tfhfp8.formats.get(fmt), axis=axis)).numpy()

    accs = policy.accumulation
    _assert_bits(y, reference_matmul(along(x, "mxfp8_e4m3", 1), along(w, "mxfp8_e4m3", 0),
                                     accs["forward"]))
    _assert_bits(dx, reference_matmul(along(g, "mxfp8_e5m2", 1),
                                      along(w, "mxfp8_e4m3", 1).T, accs["input_gradient"]))
    _assert_bits(dw, reference_matmul(along(x, "mxfp8_e4m3", 0).T,
                                      along(g, "mxfp8_e5m2", 0), accs["weight_gradient"]))


def test_block_scaled_accumulation_is_checked():
    # An FP32 scale (NVFP4's tensor scale, per-tensor scaling) makes products inexact.
    for fmt in ("nvfp4", "e4m3_current"):
        with pytest.raises(ValueError, match="block-scaled"):
            tfhfp8.Policy(weights=fmt, activations=fmt, errors="float8_e5m2",
                          accumulation="float16")
    # A blocked convolution sums its kernel window in FP32: a clear error.
    policy = tfhfp8.Policy(weights="mxfp8_e4m3", activations="mxfp8_e4m3",
                           errors="mxfp8_e5m2", accumulation="float16")
    with pytest.raises(NotImplementedError, match="block-scaled"):
        tfhfp8.layers.Conv2D(2, 3, policy=policy)


# -- the policy ---------------------------------------------------------------------------
def test_policy_accumulation_is_checked_saved_and_shown(tmp_path):
    policy = tfhfp8.Policy("fp8", accumulation="float16_chunk64")
    assert policy.accumulates and tfhfp8.Policy("fp8") != policy
    assert not tfhfp8.Policy("fp8").accumulates  # presets keep FP32 sums
    assert tfhfp8.policy.get(tfhfp8.policy.serialize(policy)) == policy
    assert policy.for_exempt_layer().accumulation["forward"].chunk_size == 64
    # INT32 needs fixed-point operands: exempt (FP16) layers sum in FP32.
    das = tfhfp8.Policy("int16_dfp", accumulation="int32")
    assert not das.for_exempt_layer().accumulates
    with pytest.raises(ValueError, match="activations"):
        tfhfp8.Policy("fp8", accumulation="int32")
    with pytest.raises(ValueError, match="activations"):
        tfhfp8.Policy(weights="float8_e5m2", accumulation="float16")
    with pytest.raises(ValueError, match="backward"):
        tfhfp8.Policy("fp8", accumulation={"backward": "float16"})
    # A lookup sums nothing: Embedding takes the policy and reads its table as without it.
    ids = np.array([[1, 2, 3]])
    embeddings = [tfhfp8.layers.Embedding(10, 3, policy=p, embeddings_initializer="ones")
                  for p in (policy, tfhfp8.Policy("fp8"))]
    np.testing.assert_array_equal(embeddings[0](ids), embeddings[1](ids))

    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((6, 6, 1)),
                              tfhfp8.layers.Conv2D(2, 3, policy=policy),
                              keras.layers.Flatten(),
                              tfhfp8.layers.Dense(3, policy=das)])
    x = rng.normal(size=(2, 6, 6, 1)).astype("float32")
    expected = model.predict(x, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.layers[0].policy == policy and loaded.layers[2].policy == das
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    rows = tfhfp8.summary(loaded, print_fn=lambda line: None)
    assert "sum:float16_chunk64" in rows[0]["formats"] and "sum:int32" in rows[2]["formats"]


def test_quantization_stats_record_swamping_and_overflows():
    rng = np.random.default_rng(1)
    policy = tfhfp8.Policy("int16_dfp", accumulation="int32")
    # Weights of one sign (a random kernel's signs can keep the sums in range).
    model = keras.Sequential([keras.Input((64,)), tfhfp8.layers.Dense(
        2, kernel_initializer="ones", policy=policy)])
    model.compile("sgd", "mse")
    stats = tfhfp8.callbacks.QuantizationStats()
    x = np.full((4, 64), 3.0, "float32")  # mantissas ~2^14, 64 products ~2^28 each
    model.fit(x, rng.normal(size=(4, 2)), epochs=1, verbose=0, callbacks=[stats])
    key = f"{model.layers[0].name}/gemm/forward/int32_overflows"
    assert stats.steps[key][-1] > 0


# -- both backends ----------------------------------------------------------------------------
@pytest.mark.parametrize("acc", [
    tfhfp8.Accumulator("float16", rounding="stochastic", chunk_size=5, outer_format="bfloat16"),
    tfhfp8.Accumulator("bfloat16", rounding="stochastic", products="float8_e5m2",
                       saturate=True),
    tfhfp8.Accumulator(tfhfp8.FloatFormat(5, 3, specials="fn"), rounding="toward_zero",
                       chunk_size=3),
], ids=str)
def test_tf_ops_and_cpp_kernels_agree(acc):
    from tfhfp8.ops import cpp_backend
    rng = np.random.default_rng(21)
    a, b = _adversarial(rng)
    a[1, 0, :2] = 3e38  # a finite sum beyond float32's range (RO32: +-FLT_MAX)
    b[1, :2, 0] = 1.0
    seed = tf.constant(2**63 - 1, tf.int64)  # seed + 1 and seed + 2 wrap around
    tf_c, tf_swamped = tf.function(
        lambda a, b: tf_accumulate.accumulating_matmul(a, b, *acc.kernel_arguments(), seed),
        jit_compile=True)(a, b)
    cpp_c, cpp_swamped = cpp_backend.accumulating_matmul(a, b, *acc.kernel_arguments(), seed)
    _assert_bits(tf_c.numpy(), cpp_c.numpy())
    assert int(tf_swamped) == int(cpp_swamped)


def test_int32_backends_agree():
    from tfhfp8.ops import cpp_backend
    rng = np.random.default_rng(22)
    a = rng.integers(-2**15 + 1, 2**15, size=(2, 3, 70), dtype=np.int32)
    b = rng.integers(-2**15 + 1, 2**15, size=(2, 70, 4), dtype=np.int32)
    for chunk, overflow in ((None, "wrap"), (8, "saturate")):
        tf_c, tf_n = tf.function(lambda a, b: tf_accumulate.int32_matmul(a, b, chunk, overflow),
                                 jit_compile=True)(a, b)
        cpp_c, cpp_n = cpp_backend.int32_matmul(a, b, chunk, overflow)
        _assert_bits(tf_c.numpy(), cpp_c.numpy())
        assert int(tf_n) == int(cpp_n) > 0 or chunk


def test_matmul_uses_the_active_backend(monkeypatch):
    rng = np.random.default_rng(23)
    a, b = _operands(rng, 4, 50, 3, "float8_e4m3")
    results = {}
    for backend in ("tf", "cpp"):
        monkeypatch.setenv("TFHFP8_BACKEND", backend)
        results[backend] = tfhfp8.matmul(a, b, tfhfp8.Accumulator("float16", chunk_size=8),
                          a_format="float8_e4m3", b_format="float8_e4m3").numpy()
    _assert_bits(results["tf"], results["cpp"])
    _assert_bits(results["tf"], reference_matmul(a, b, tfhfp8.Accumulator("float16",
                                                                           chunk_size=8)))


@pytest.mark.parametrize("make, shape", [
    (lambda p, d: tfhfp8.layers.Dense(3, policy=p, dtype=d), (2, 5)),
    (lambda p, d: tfhfp8.layers.Conv1D(3, 2, policy=p, dtype=d), (2, 6, 4)),
    (lambda p, d: tfhfp8.layers.EinsumDense("ab,bc->ac", output_shape=3, policy=p,
                                            dtype=d), (2, 5)),
], ids=["dense", "conv1d", "einsum_dense"])
def test_mixed_float16_layers_take_emulated_sums(make, shape):
    # Keras' "mixed_float16" hands the layer float16 inputs and kernels; the emulated
    # sums run on their float32 values (exact) and the result is float16 again, the
    # float32 layer's result rounded once.
    policy = tfhfp8.Policy(**EXACT_SUMS)
    mixed, plain = make(policy, "mixed_float16"), make(policy, "float32")
    rng = np.random.default_rng(5)
    x = rng.integers(-4, 5, size=shape).astype("float32")
    mixed(x), plain(x)
    for w_m, w_p in zip(mixed.trainable_weights, plain.trainable_weights):
        value = rng.integers(-3, 4, size=w_m.shape).astype("float32")
        w_m.assign(value)
        w_p.assign(value)
    with tf.GradientTape() as tape:
        y = mixed(x)
    assert y.dtype == tf.float16
    np.testing.assert_array_equal(y.numpy(), plain(x).numpy().astype(np.float16))
    grads = tape.gradient(y, mixed.trainable_weights)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in grads)
