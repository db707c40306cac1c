"""Emulated Keras layers against an independent reference of the training semantics.

For a layer with input `x`, kernel `W` and upstream gradient `dy`, and policy formats
`Q_a, Q_w, Q_e, Q_g`:

    y  = op(Q_a(x), Q_w(W)) + b                 (bias in FP32)
    dx = op_input_grad(Q_e(dy), Q_w(W))
    dW = Q_g(op_kernel_grad(Q_a(x), Q_e(dy)))

The reference shares no code with the library: the roundings are ml_dtypes casts in
NumPy (clipped to +-max first, since the policies saturate) and a NumPy dynamic
fixed-point quantizer written here; the products are NumPy einsums or `tf.nn` ops in
float64. The library accumulates in FP32, so each result is compared with a bound
proportional to the sum of the magnitudes of the products that make it (the same
product on absolute values), and a value rounded by `Q_g` must lie between the
roundings of the two ends of that interval (and be a value of the format).
"""

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import keras
import tfhfp8
from tfhfp8 import layers as tl

RTOL = 1e-5  # FP32 accumulation vs float64, relative to the sum of |terms|


# -- the reference quantizers ---------------------------------------------------------
def float_quantizer(dtype):
    dtype = np.dtype(dtype)
    fmax = float(ml_dtypes.finfo(dtype).max)

    def q(x):
        x = np.asarray(x)
        # From float32 when the value is one (what the library sees), else from float64.
        src = x.astype(np.float32) if x.dtype == np.float32 else x.astype(np.float64)
        return np.clip(src, -fmax, fmax).astype(dtype).astype(np.float64)

    q.name = dtype.name
    return q


def dfp_quantizer(bits=16):
    """Dynamic fixed point, one exponent per tensor, round half to even (Das et al.)."""
    top = 2 ** (bits - 1)

    def q(x):
        x = np.asarray(x, np.float64)
        largest = np.max(np.abs(x))
        if largest == 0:
            return x.copy()
        _, e = np.frexp(largest)  # largest = f * 2^e, f in [0.5, 1)
        shared = (e - 1) - (bits - 2)  # floor(log2(max|x|)) - 14
        if np.round(largest / 2.0 ** shared) >= top:  # max rounds up to 2^15
            shared += 1
        mantissas = np.clip(np.round(x / 2.0 ** shared), -(top - 1), top - 1)
        return mantissas * 2.0 ** shared

    q.name = f"int{bits}_dfp"
    return q


def identity(x):
    return np.asarray(x, np.float64)


E4M3B11 = float_quantizer(ml_dtypes.float8_e4m3b11fnuz)
E5M2 = float_quantizer(ml_dtypes.float8_e5m2)
F16 = float_quantizer(np.float16)
BF16 = float_quantizer(ml_dtypes.bfloat16)
DFP16 = dfp_quantizer(16)

# name -> (policy built with round-to-nearest-even everywhere, (Q_a, Q_w, Q_e, Q_g))
POLICIES = {
    "hfp8": (lambda: tfhfp8.Policy("hfp8", rounding="nearest_even"),
             (E4M3B11, E4M3B11, E5M2, F16)),
    "int16_dfp": (lambda: tfhfp8.Policy("int16_dfp", rounding="nearest_even"),
                  (DFP16, DFP16, DFP16, identity)),
}


def test_reference_quantizers():
    """The reference quantizers themselves, on hand-checked values."""
    np.testing.assert_array_equal(E4M3B11(np.float32([1.0, 0.1, 1000.0, -31.0, 2.0**-14])),
                                  [1.0, 0.1015625, 30.0, -30.0, 0.0])
    np.testing.assert_array_equal(E5M2(np.float32([1e6, 0.3, -1e9])), [57344.0, 0.3125, -57344.0])
    # max 3.0: floor(log2 3) = 1, E_s = -13, grid 2^-13; 3.0 + 2^-14 is a tie -> even.
    x = np.float32([3.0, 1.0 + 2.0**-14, 2.0**-15, -1.0 - 3 * 2.0**-14])
    np.testing.assert_array_equal(DFP16(x), [3.0, 1.0, 0.0, -1.0 - 2 * 2.0**-13])
    # max (2^15 - 0.5) * 2^-15 rounds to 2^15: the exponent goes up by one.
    m = np.float32((2.0**15 - 0.5) * 2.0**-15)
    assert DFP16(np.float32([m]))[0] == 1.0
    # Then the grid is 2^-14: 2^-15 and 3 * 2^-15 are ties, to even multiples.
    np.testing.assert_array_equal(DFP16(np.float32([m, 2.0**-15, 3 * 2.0**-15])),
                                  [1.0, 0.0, 2.0**-13])


# -- the reference products -------------------------------------------------------------
def einsum_op(equation):
    """(y, dA, dB) of a bilinear einsum `a,b->y` in float64 (every index in two terms)."""
    inputs, out = equation.split("->")
    left, right = inputs.split(",")

    def op(a, b, g=None):
        y = np.einsum(equation, a, b)
        if g is None:
            return y
        return (y, np.einsum(f"{out},{right}->{left}", g, b),
                np.einsum(f"{left},{out}->{right}", a, g))

    return op


def tf_op(fn):
    """(y, dA, dB) of a bilinear `tf.nn` op evaluated in float64."""

    def op(a, b, g=None):
        a, b = tf.constant(a, tf.float64), tf.constant(b, tf.float64)
        with tf.GradientTape() as tape:
            tape.watch([a, b])
            y = fn(a, b)
        if g is None:
            return y.numpy()
        da, db = tape.gradient(y, [a, b], output_gradients=tf.constant(g, tf.float64))
        return y.numpy(), da.numpy(), db.numpy()

    return op


def assert_within(actual, exact, bound, what):
    actual = np.asarray(actual, np.float64)
    assert actual.shape == exact.shape, (what, actual.shape, exact.shape)
    err = np.abs(actual - exact)
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} elements off; worst |err|={err.max():.3g}, "
        f"at {np.unravel_index(np.argmax(err - bound), err.shape)}: actual "
        f"{actual.flat[np.argmax(err - bound)]!r}, exact {exact.flat[np.argmax(err - bound)]!r}")


def assert_rounded_within(actual, exact, bound, q, what):
    """`actual` is a value of `q` that rounding some point of [exact-bound, exact+bound] gives."""
    actual = np.asarray(actual, np.float64)
    assert actual.shape == exact.shape, (what, actual.shape, exact.shape)
    np.testing.assert_array_equal(q(actual.astype(np.float32)), actual,
                                  err_msg=f"{what}: not values of {q.name}")
    lo, hi = q(exact - bound), q(exact + bound)
    bad = (actual < lo) | (actual > hi)
    assert not bad.any(), (
        f"{what}: {bad.sum()} of {bad.size} elements are not {q.name}-roundings of the exact "
        f"value; e.g. actual {actual[bad][:3]}, exact {exact[bad][:3]}")


def check_product(actual, op, operands, q=None, what="", bias=None):
    """actual == [q](op(*operands) [+ bias]) up to FP32 accumulation.

    `op` is multilinear in its operands, so `op(|operands|)` is the sum of the
    magnitudes of the terms of each result: the FP32 rounding error is bounded by it.
    """
    exact = op(*operands)
    bound = RTOL * op(*[np.abs(o) for o in operands])
    if bias is not None:
        exact = exact + bias
        bound = bound + RTOL * np.abs(bias)
    bound = bound + 1e-30
    if q is None or q is identity:
        assert_within(actual, exact, bound, what)
    else:
        assert_rounded_within(actual, exact, bound, q, what)
    return exact, bound


# -- the layer cases --------------------------------------------------------------------
def _conv_nd(rank, strides, padding, dilations=1):
    fn = {1: tf.nn.conv1d, 2: tf.nn.conv2d, 3: tf.nn.conv3d}[rank]
    if rank == 1:
        return lambda a, b: fn(a, b, strides, padding, dilations=dilations)
    s = [1, *([strides] * rank), 1]
    d = [1, *([dilations] * rank), 1]
    return lambda a, b: fn(a, b, s, padding, dilations=d)


def _causal_conv1d(kernel_size, dilation):
    pad = (kernel_size - 1) * dilation

    def fn(a, b):
        a = tf.pad(a, [[0, 0], [pad, 0], [0, 0]])
        # tf.nn.convolution: the CPU backprop kernels take no dilation directly.
        return tf.nn.convolution(a, b, 1, "VALID", dilations=dilation)

    return fn


def _depthwise(strides, padding, dilation):
    return lambda a, b: tf.nn.depthwise_conv2d(
        a, b, [1, strides, strides, 1], padding, dilations=[dilation, dilation])


def _transpose_2d(out_shape, strides, padding):
    return lambda a, b: tf.nn.conv2d_transpose(
        a, b, out_shape, [1, strides, strides, 1], padding)


# name -> (tfhfp8 class, Keras class, kwargs, input shape, reference op factory(output shape))
CASES = {
    "Dense": (tl.Dense, keras.layers.Dense, dict(units=7), (5, 12),
              lambda shape: einsum_op("bi,io->bo")),
    "Dense3D": (tl.Dense, keras.layers.Dense, dict(units=5), (2, 3, 9),
                lambda shape: einsum_op("bti,io->bto")),
    "EinsumDense": (tl.EinsumDense, keras.layers.EinsumDense,
                    dict(equation="abc,cde->abde", output_shape=(None, 3, 4), bias_axes="de"),
                    (2, 5, 8), lambda shape: einsum_op("abc,cde->abde")),
    "Conv1D": (tl.Conv1D, keras.layers.Conv1D,
               dict(filters=6, kernel_size=3, padding="causal", dilation_rate=2), (2, 11, 5),
               lambda shape: tf_op(_causal_conv1d(3, 2))),
    "Conv2D": (tl.Conv2D, keras.layers.Conv2D,
               dict(filters=6, kernel_size=3, strides=2, padding="same"), (2, 9, 9, 4),
               lambda shape: tf_op(_conv_nd(2, 2, "SAME"))),
    "Conv3D": (tl.Conv3D, keras.layers.Conv3D,
               dict(filters=4, kernel_size=2, padding="valid"), (2, 5, 4, 5, 3),
               lambda shape: tf_op(_conv_nd(3, 1, "VALID"))),
    "DepthwiseConv2D": (tl.DepthwiseConv2D, keras.layers.DepthwiseConv2D,
                        dict(kernel_size=3, depth_multiplier=2, dilation_rate=2), (2, 9, 8, 3),
                        lambda shape: tf_op(_depthwise(1, "VALID", 2))),
    "Conv2DTranspose": (tl.Conv2DTranspose, keras.layers.Conv2DTranspose,
                        dict(filters=5, kernel_size=3, strides=2, padding="same"), (2, 5, 4, 3),
                        lambda shape: tf_op(_transpose_2d(shape, 2, "SAME"))),
}


def random_input(rng, shape, outliers=True):
    """Normal values, plus saturating (|x| > 30), large and tiny ones."""
    x = rng.normal(0.0, 2.0, size=shape).astype(np.float32)
    if outliers:
        flat = x.reshape(-1)
        idx = rng.choice(flat.size, size=4, replace=False)
        flat[idx] = [45.0, -100.0, 3e-4, -2e-5]
    return x


def random_grad(rng, shape):
    g = rng.normal(0.0, 1.0, size=shape).astype(np.float32)
    flat = g.reshape(-1)
    idx = rng.choice(flat.size, size=3, replace=False)
    flat[idx] = [70.0, 1e-6, -4e-5]  # a larger one (coarse DFP grid) and E5M2 subnormals
    return g


def make_layer(case, policy, seed=0):
    """(layer, x, kernel values, bias values) with weights set to seeded random values."""
    cls, _, kwargs, shape, _ = CASES[case]
    rng = np.random.default_rng(seed)
    x = random_input(rng, shape)
    layer = cls(**kwargs, policy=policy)
    layer(x)  # build
    kernel = rng.normal(0.0, 0.5, size=tuple(layer.kernel.shape)).astype(np.float32)
    kernel.reshape(-1)[:2] = [-40.0, 2e-5]  # saturates in 1-4-3; underflows
    layer.kernel.assign(kernel)
    bias = rng.normal(0.0, 0.3, size=tuple(layer.bias.shape)).astype(np.float32)
    layer.bias.assign(bias)
    return layer, x, kernel, bias, rng


def run_layer(layer, x, dy, variables):
    """Forward output and gradients of `sum(y * dy)` w.r.t. x and `variables`."""
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt)
    grads = tape.gradient(y, [xt, *variables], output_gradients=tf.constant(dy))
    return y.numpy(), [g.numpy() if not isinstance(g, tf.IndexedSlices)
                       else tf.convert_to_tensor(g).numpy() for g in grads]


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("case", list(CASES))
def test_single_gemm_layer_semantics(case, policy_name):
    make_policy, (qa, qw, qe, qg) = POLICIES[policy_name]
    layer, x, kernel, bias, rng = make_layer(case, make_policy())
    y_shape = tuple(layer(x).shape)
    dy = random_grad(rng, y_shape)
    y, (dx, dw, db) = run_layer(layer, x, dy, [layer.kernel, layer.bias])
    op = CASES[case][4](y_shape)

    a, w, g = qa(x), qw(kernel), qe(dy)
    assert not np.array_equal(a, x) and not np.array_equal(w, kernel)
    assert not np.array_equal(g, dy)
    b = np.broadcast_to(bias.astype(np.float64), y_shape)  # bias on the trailing axes
    _, bound = check_product(y, op, (a, w), what=f"{case} y", bias=b)
    check_product(dx, lambda p, r, e: op(p, r, e)[1], (a, w, g), what=f"{case} dx")
    check_product(dw, lambda p, r, e: op(p, r, e)[2], (a, w, g), q=qg, what=f"{case} dW")
    # The bias gradient is the FP32 sum of the raw dy.
    reduce_axes = tuple(range(dy.ndim - bias.ndim))
    assert_within(db, dy.astype(np.float64).sum(axis=reduce_axes).reshape(bias.shape),
                  RTOL * np.abs(dy).astype(np.float64).sum(axis=reduce_axes).reshape(bias.shape),
                  f"{case} db")

    # The emulation really happens: the FP32 Keras layer with the same weights differs
    # by far more than FP32 rounding.
    y32 = keras_twin(layer, case, x)(x).numpy()
    assert np.sum(np.abs(y32 - y) > 10 * bound) > y.size // 4


def keras_twin(layer, case, x):
    """The plain Keras layer with the configuration and weights of `layer`."""
    config = layer.get_config()
    config.pop("policy")
    twin = CASES[case][1].from_config(config)
    twin(x)
    twin.set_weights(layer.get_weights())
    return twin


@pytest.mark.parametrize("case", list(CASES) + ["SeparableConv2D", "Embedding"])
def test_float32_policy_reproduces_keras(case):
    if case == "SeparableConv2D":
        rng = np.random.default_rng(1)
        x = random_input(rng, (2, 7, 7, 3))
        layer = tl.SeparableConv2D(5, 3, depth_multiplier=2, padding="same", policy="float32")
        keras_cls = keras.layers.SeparableConv2D
    elif case == "Embedding":
        rng = np.random.default_rng(1)
        x = rng.integers(0, 20, size=(3, 6))
        layer = tl.Embedding(20, 4, policy="float32")
        keras_cls = keras.layers.Embedding
    else:
        layer, x, *_ , rng = make_layer(case, "float32")
        keras_cls = CASES[case][1]
    layer(x)
    weights = [rng.normal(size=w.shape).astype(np.float32) for w in layer.get_weights()]
    layer.set_weights(weights)
    config = layer.get_config()
    assert config.pop("policy") == "float32"
    twin = keras_cls.from_config(config)
    twin(x)
    twin.set_weights(weights)

    y_shape = tuple(layer(x).shape)
    dy = rng.normal(size=y_shape).astype(np.float32)
    if case == "Embedding":
        y1, g1 = run_embedding(layer, x, dy)
        y2, g2 = run_embedding(twin, x, dy)
        np.testing.assert_array_equal(y1, y2)
        np.testing.assert_array_equal(g1, g2)
        return
    y1, g1 = run_layer(layer, x, dy, layer.trainable_weights)
    y2, g2 = run_layer(twin, x, dy, twin.trainable_weights)
    np.testing.assert_array_equal(y1, y2)
    assert len(g1) == len(g2)
    for a, b in zip(g1, g2):
        np.testing.assert_array_equal(a, b)


# -- SeparableConv2D: two GEMMs -------------------------------------------------------------
def _f32(fn, *args):
    return fn(*[tf.constant(np.asarray(a, np.float32)) for a in args]).numpy()


@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_separable_conv2d_semantics(policy_name):
    """Depthwise then pointwise, each a GEMM; the intermediate is an activation of the
    pointwise product (forward) and its gradient an error of the depthwise one.

    The intermediate tensors are FP32-accumulated by definition, so the reference
    computes them with the plain `tf.nn` op in float32 before quantizing them; the
    products that are not quantized afterwards are float64.
    """
    make_policy, (qa, qw, qe, qg) = POLICIES[policy_name]
    rng = np.random.default_rng(3)
    x = random_input(rng, (2, 8, 7, 3))
    layer = tl.SeparableConv2D(5, 3, depth_multiplier=2, padding="same", policy=make_policy())
    layer(x)
    wd = rng.normal(0.0, 0.5, size=layer.depthwise_kernel.shape).astype(np.float32)
    wp = rng.normal(0.0, 0.5, size=layer.pointwise_kernel.shape).astype(np.float32)
    bias = rng.normal(0.0, 0.3, size=layer.bias.shape).astype(np.float32)
    layer.set_weights([wd, wp, bias])
    y_shape = tuple(layer(x).shape)
    dy = random_grad(rng, y_shape)
    y, (dx, dwd, dwp) = run_layer(layer, x, dy, [layer.depthwise_kernel, layer.pointwise_kernel])

    depthwise = lambda a, b: tf.nn.depthwise_conv2d(a, b, [1, 1, 1, 1], "SAME")
    pointwise = lambda a, b: tf.nn.conv2d(a, b, [1, 1, 1, 1], "VALID")
    qx, qwd, qwp = qa(x), qw(wd), qw(wp)

    # Forward: the intermediate in FP32 (checked against float64), quantized as activation.
    mid32 = _f32(depthwise, qx, qwd)
    check_product(mid32, tf_op(depthwise), (qx, qwd), what="intermediate (sanity)")
    qmid = qa(mid32)
    assert not np.array_equal(qmid, mid32)
    check_product(y, tf_op(pointwise), (qmid, qwp), what="y",
                  bias=np.broadcast_to(bias.astype(np.float64), y_shape))

    # Backward of the pointwise GEMM.
    g = qe(dy)
    check_product(dwp, lambda p, r, e: tf_op(pointwise)(p, r, e)[2], (qmid, qwp, g), q=qg,
                  what="dW_pw")
    mid_t = tf.constant(qmid.astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(mid_t)
        out = pointwise(mid_t, tf.constant(qwp.astype(np.float32)))
    dmid32 = tape.gradient(out, mid_t, output_gradients=tf.constant(g.astype(np.float32))).numpy()
    check_product(dmid32, lambda p, r, e: tf_op(pointwise)(p, r, e)[1], (qmid, qwp, g),
                  what="intermediate gradient (sanity)")
    g1 = qe(dmid32)  # the error of the depthwise GEMM
    assert not np.array_equal(g1, dmid32)

    # Backward of the depthwise GEMM.
    check_product(dx, lambda p, r, e: tf_op(depthwise)(p, r, e)[1], (qx, qwd, g1), what="dx")
    check_product(dwd, lambda p, r, e: tf_op(depthwise)(p, r, e)[2], (qx, qwd, g1), q=qg,
                  what="dW_dw")


# -- Embedding: weights only ----------------------------------------------------------------
def run_embedding(layer, ids, dy):
    with tf.GradientTape() as tape:
        y = layer(ids)
    grad = tape.gradient(y, layer.embeddings, output_gradients=tf.constant(dy))
    return y.numpy(), tf.convert_to_tensor(grad).numpy()


@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_embedding_semantics(policy_name):
    make_policy, (qa, qw, qe, qg) = POLICIES[policy_name]
    rng = np.random.default_rng(4)
    layer = tl.Embedding(16, 6, policy=make_policy())
    ids = rng.integers(0, 16, size=(3, 7))
    ids[0, :3] = 5  # repeated rows: their gradients add up
    layer(ids)
    table = random_input(rng, (16, 6))
    layer.embeddings.assign(table)
    dy = random_grad(rng, (3, 7, 6))
    y, dtable = run_embedding(layer, ids, dy)

    qtable = qw(table)
    assert not np.array_equal(qtable, table)
    np.testing.assert_array_equal(y, qtable[ids])  # quantized table rows, exactly
    # No GEMM: dy itself is not quantized; the table gradient is Q_g(scatter-add of dy).
    exact = np.zeros((16, 6))
    bound = np.zeros((16, 6))
    np.add.at(exact, ids.reshape(-1), dy.reshape(-1, 6).astype(np.float64))
    np.add.at(bound, ids.reshape(-1), np.abs(dy.reshape(-1, 6)).astype(np.float64))
    if qg is identity:
        assert_within(dtable, exact, RTOL * bound + 1e-30, "dtable")
    else:
        assert_rounded_within(dtable, exact, RTOL * bound + 1e-30, qg, "dtable")
        assert not np.array_equal(dtable, exact)


# -- MultiHeadAttention ------------------------------------------------------------------------
MHA_POLICIES = {
    "hfp8": (lambda: tfhfp8.Policy("hfp8", rounding="nearest_even"), E4M3B11, E4M3B11),
    "bfloat16": (lambda: tfhfp8.Policy("bfloat16"), BF16, BF16),
}


def _softmax(s, mask):
    s = np.where(mask, s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def mha_reference(layer, query, value, qa, qw, causal, quantize_attention=True):
    """The attention layer in NumPy with every GEMM's operands quantized.

    Intermediate tensors are stored as float32, as the library's are, before they
    are quantized as activations of the next product. Returns the output, its
    accumulation bound, and the (quantized) input of the output projection.
    """
    f32 = lambda t: np.asarray(t, np.float64).astype(np.float32)
    qatt = qa if quantize_attention else (lambda t: np.asarray(t, np.float64))

    def project(x, dense, equation):
        kernel, bias = (v.numpy() for v in dense.weights)
        return np.einsum(equation, qa(x), qw(kernel)) + bias

    q = f32(project(query, layer.query_dense, "abc,cde->abde"))
    k = f32(project(value, layer.key_dense, "abc,cde->abde"))
    v = f32(project(value, layer.value_dense, "abc,cde->abde"))
    key_dim = q.shape[-1]
    q = f32(q.astype(np.float64) * np.float32(1.0 / np.sqrt(key_dim)))
    scores = np.einsum("aecd,abcd->acbe", qatt(k), qatt(q))
    t, s = q.shape[1], k.shape[1]
    mask = np.tril(np.ones((t, s), bool)) if causal else np.ones((t, s), bool)
    probs = f32(_softmax(scores, mask))
    context = f32(np.einsum("acbe,aecd->abcd", qatt(probs), qatt(v)))
    kernel, bias = (w.numpy() for w in layer.output_dense.weights)
    a, w = qa(context), qw(kernel)
    exact = np.einsum("abcd,cde->abe", a, w) + bias
    bound = RTOL * (np.einsum("abcd,cde->abe", np.abs(a), np.abs(w)) + np.abs(bias)) + 1e-30
    return exact, bound, a


def make_mha(policy, seed, causal):
    rng = np.random.default_rng(seed)
    layer = tl.MultiHeadAttention(num_heads=2, key_dim=4, policy=policy)
    t = 5
    s = t if causal else 6
    query = random_input(rng, (2, t, 8), outliers=False)
    value = query if causal else random_input(rng, (2, s, 8), outliers=False)
    layer(query, value)
    layer.set_weights([rng.normal(0.0, 0.5, size=w.shape).astype(np.float32)
                       for w in layer.get_weights()])
    return layer, query, value


@pytest.mark.parametrize("causal", [False, True], ids=["cross", "causal"])
@pytest.mark.parametrize("policy_name", list(MHA_POLICIES))
def test_multi_head_attention_forward(policy_name, causal):
    make_policy, qa, qw = MHA_POLICIES[policy_name]
    layer, query, value = make_mha(make_policy(), 5, causal)
    for name in ("query_dense", "key_dense", "value_dense", "output_dense"):
        projection = getattr(layer, name)
        assert isinstance(projection, tl.EinsumDense), (name, type(projection))
        assert projection.policy == layer.policy
    y = layer(query, value, use_causal_mask=causal).numpy()
    exact, bound, _ = mha_reference(layer, query, value, qa, qw, causal)
    assert_within(y, exact, bound, f"MHA {policy_name}")
    # The emulation happens: the plain Keras layer with the same weights differs.
    plain = keras_mha_twin(layer, query, value)(query, value, use_causal_mask=causal).numpy()
    assert np.max(np.abs(plain - y)) > 1e-3 * np.max(np.abs(plain))


def test_multi_head_attention_combines_causal_and_explicit_masks():
    """`_compute_attention` (Keras' override point) called with an explicit mask and
    use_causal_mask=True applies both, through the emulated products: bit for bit
    the result of the merged mask, and not that of the explicit mask alone."""
    layer, query, value = make_mha(tfhfp8.Policy("hfp8", rounding="nearest_even"), 10, True)
    rng = np.random.default_rng(11)
    q, k, v = (rng.normal(size=(1, 5, 2, 4)).astype(np.float32) for _ in range(3))
    explicit = np.ones((1, 5, 5), bool)
    explicit[:, 3, 1] = False
    merged = explicit & np.tril(np.ones((5, 5), bool))
    out_both, scores_both = layer._compute_attention(q, k, v, attention_mask=explicit,
                                                     use_causal_mask=True)
    out_merged, _ = layer._compute_attention(q, k, v, attention_mask=merged)
    out_explicit, _ = layer._compute_attention(q, k, v, attention_mask=explicit)
    np.testing.assert_array_equal(out_both.numpy(), out_merged.numpy())
    assert np.all(scores_both.numpy()[:, :, ~merged[0]] == 0)
    assert np.max(np.abs(out_both.numpy() - out_explicit.numpy())) > 1e-2
    # The emulation happens: the products of Keras' own layer differ.
    twin = keras_mha_twin(layer, query, value)
    plain, _ = twin._compute_attention(q, k, v, attention_mask=merged,
                                       return_attention_scores=True)
    assert np.max(np.abs(plain.numpy() - out_both.numpy())) > 1e-3


def test_multi_head_attention_quantizes_attention_products():
    """The reference with FP32 operands of QK^T and attention.V does not match."""
    layer, query, value = make_mha(tfhfp8.Policy("hfp8", rounding="nearest_even"), 6, False)
    y = layer(query, value).numpy()
    exact, bound, _ = mha_reference(layer, query, value, E4M3B11, E4M3B11, False)
    assert_within(y, exact, bound, "MHA")
    unquantized, _, _ = mha_reference(layer, query, value, E4M3B11, E4M3B11, False,
                                      quantize_attention=False)
    assert np.max(np.abs(unquantized - y)) > 100 * np.max(bound)


def keras_mha_twin(layer, query, value):
    config = layer.get_config()
    config.pop("policy")
    twin = keras.layers.MultiHeadAttention.from_config(config)
    twin(query, value)
    twin.set_weights(layer.get_weights())
    return twin


def test_multi_head_attention_float32_matches_keras():
    layer, query, value = make_mha("float32", 7, False)
    twin = keras_mha_twin(layer, query, value)
    # Keras' explicit (non-fused) path is taken when the scores are returned.
    out, scores = twin(query, value, return_attention_scores=True)
    out2, scores2 = layer(query, value, return_attention_scores=True)
    np.testing.assert_array_equal(out2.numpy(), out.numpy())
    np.testing.assert_array_equal(scores2.numpy(), scores.numpy())
    # The fused path Keras takes otherwise rounds differently, within FP32 accuracy.
    np.testing.assert_allclose(layer(query, value).numpy(), twin(query, value).numpy(),
                               rtol=1e-5, atol=1e-6)


def test_multi_head_attention_backward_is_quantized():
    """hfp8: the output projection's kernel gradient is Q_g(einsum(Q_a(ctx), Q_e(dy))),
    and every projection's kernel gradient is a float16 value."""
    layer, query, value = make_mha(tfhfp8.Policy("hfp8", rounding="nearest_even"), 8, False)
    rng = np.random.default_rng(9)
    dy = random_grad(rng, (2, 5, 8))
    with tf.GradientTape() as tape:
        y = layer(query, value)
    weights = layer.trainable_weights
    grads = [g.numpy() for g in
             tape.gradient(y, weights, output_gradients=tf.constant(dy))]
    for weight, grad in zip(weights, grads):
        if weight.path.endswith("kernel"):
            np.testing.assert_array_equal(F16(grad), grad, err_msg=weight.path)
    _, _, context = mha_reference(layer, query, value, E4M3B11, E4M3B11, False)
    index = [w is layer.output_dense.kernel for w in weights].index(True)
    g = E5M2(dy)
    check_product(grads[index], lambda p, r: np.einsum("abcd,abe->cde", p, r), (context, g),
                  q=F16, what="dW of the output projection")
