"""tfhfp8.quantize as an API: arguments, dtypes, shapes, gradients, backends, XLA."""

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import reference as R
import tfhfp8
from helpers import bits_of, ml_cast, quantize_np
from tfhfp8 import formats

DTYPES = [tf.float16, tf.bfloat16, tf.float32, tf.float64]
FMTS = ["float8_e5m2", "hfp8_fwd", "bfloat16", "float4_e2m1fn", "int16_dfp",
        tfhfp8.DynamicFixedPoint(12, axis=-1)]
ROUNDINGS = ["nearest_even", "stochastic", "toward_zero"]


def _fmt_id(fmt):
    return fmt if isinstance(fmt, str) else repr(fmt)


def test_readme_example(backend):
    y = tfhfp8.quantize(tf.constant([1.0, 0.1, 1000.0]), "hfp8_fwd", saturate=True)
    assert y.dtype == tf.float32
    np.testing.assert_array_equal(y.numpy(), np.float32([1.0, 0.1015625, 30.0]))


# ---------------------------------------------------------------------------------
# Argument errors.

@pytest.mark.parametrize("bad", ["nearest", "RNE", "", None, 1])
def test_invalid_rounding(bad):
    with pytest.raises(ValueError) as info:
        tfhfp8.quantize(tf.constant([1.0]), "float8_e5m2", rounding=bad)
    message = str(info.value)
    assert "rounding" in message
    for option in ROUNDINGS:
        assert option in message


@pytest.mark.parametrize("bad", ["ste", None, "zero"])
def test_invalid_gradient(bad):
    with pytest.raises(ValueError) as info:
        tfhfp8.quantize(tf.constant([1.0]), "float8_e5m2", gradient=bad)
    message = str(info.value)
    assert "gradient" in message
    assert "straight_through" in message and "zero_overflow" in message


@pytest.mark.parametrize("bad", [1, 0, "yes", None, 1.0])
def test_invalid_saturate(bad):
    with pytest.raises(ValueError, match="saturate"):
        tfhfp8.quantize(tf.constant([1.0]), "float8_e5m2", saturate=bad)


def test_unknown_format_lists_names():
    with pytest.raises(ValueError) as info:
        tfhfp8.quantize(tf.constant([1.0]), "float8_e6m1")
    message = str(info.value)
    assert "float8_e6m1" in message
    for name in formats.names():
        assert name in message


@pytest.mark.parametrize("x", [
    tf.constant([1, 2], tf.int32), tf.constant([1, 2], tf.int64), tf.constant([3], tf.uint8),
    tf.constant([True, False]), tf.constant([1 + 2j], tf.complex64),
    tf.constant([1 + 2j], tf.complex128), tf.constant(["a"]), "abc", b"abc",
], ids=lambda x: getattr(getattr(x, "dtype", None), "name", type(x).__name__))
def test_non_float_tensors_raise_type_error(x):
    with pytest.raises(TypeError):
        tfhfp8.quantize(x, "float8_e5m2")


@pytest.mark.parametrize("x", [np.array([1, 2]), np.array([1, 2], np.int32),
                               np.array([True]), np.array([1 + 2j]), np.array(["a"])],
                         ids=lambda x: x.dtype.name)
def test_non_float_numpy_arrays_raise_type_error(x):
    with pytest.raises(TypeError):
        tfhfp8.quantize(x, "float8_e5m2")


def test_integer_tensor_in_tf_function_raises_type_error():
    f = tf.function(lambda t: tfhfp8.quantize(t, "hfp8_fwd"))
    with pytest.raises(TypeError):
        f(tf.constant([1, 2]))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ml_dtypes.bfloat16],
                         ids=lambda d: np.dtype(d).name)
def test_numpy_arrays_keep_their_dtype(dtype, backend):
    """A numpy array is quantized in its own dtype, like the equal tensor."""
    x = np.array([1e-30, 0.1, 1 + 2.0**-9 + 2.0**-40, 3.0, 70000.0]).astype(dtype)
    y = tfhfp8.quantize(x, "bfloat16")
    assert y.dtype == tf.as_dtype(np.dtype(dtype))
    expected = quantize_np(x, "bfloat16")
    assert np.array_equal(bits_of(y.numpy()), bits_of(expected))


def test_python_floats_and_lists(backend):
    y = tfhfp8.quantize([1.0, 0.1, 1000.0], "hfp8_fwd", saturate=True)
    assert y.dtype == tf.float32
    np.testing.assert_array_equal(y.numpy(), np.float32([1.0, 0.1015625, 30.0]))
    y = tfhfp8.quantize(0.1, "float8_e5m2")
    assert y.shape == () and y.numpy() == ml_cast(np.float32(0.1), "float8_e5m2")


def test_variable_input(backend):
    v = tf.Variable([0.1, -3.3, 1e6])
    y = tfhfp8.quantize(v, "float8_e4m3fn", saturate=True)
    np.testing.assert_array_equal(y.numpy(), np.float32([0.1015625, -3.25, 448.0]))


# ---------------------------------------------------------------------------------
# Shapes and dtypes.

@pytest.mark.parametrize("fmt", FMTS, ids=_fmt_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_shape_and_dtype_preserved(fmt, dtype, backend):
    rng = np.random.default_rng(0)
    for shape in [(), (7,), (2, 1, 3, 2)]:
        if shape == () and isinstance(fmt, tfhfp8.DynamicFixedPoint) and fmt.axis is not None:
            continue  # an axis needs a dimension
        x = tf.constant(rng.standard_normal(shape), dtype)
        for rounding in ROUNDINGS:
            y = tfhfp8.quantize(x, fmt, rounding=rounding, seed=1)
            assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("fmt", FMTS, ids=_fmt_id)
def test_empty_tensors(fmt, backend):
    for shape in [(0,), (0, 3), (2, 0, 3), (3, 0)]:
        for dtype in (tf.float32, tf.float64, tf.bfloat16):
            for rounding in ROUNDINGS:
                y = tfhfp8.quantize(tf.zeros(shape, dtype), fmt, rounding=rounding, seed=2)
                assert y.shape == shape and y.dtype == dtype


@pytest.mark.parametrize("fmt", ["float8_e5m2", "hfp8_fwd", "float6_e2m3fn", "float16"])
def test_scalars(fmt, backend):
    for value in (0.1, -2.7, 1e9, -0.0, np.inf, np.nan):
        x = np.float32(value)
        y = quantize_np(np.array(x), fmt)
        assert y.shape == ()
        expected = ml_cast(np.array([x]), fmt)[0]
        assert (np.isnan(y) and np.isnan(expected)) or bits_of(y) == bits_of(expected)


@pytest.mark.parametrize("fmt", FMTS, ids=_fmt_id)
def test_unknown_shape_in_tf_function(fmt, backend):
    f = tf.function(
        lambda t: tfhfp8.quantize(t, fmt, rounding="stochastic", seed=5),
        input_signature=[tf.TensorSpec([None, None], tf.float32)])
    g = tf.function(lambda t: tfhfp8.quantize(t, fmt),
                    input_signature=[tf.TensorSpec([None, None], tf.float32)])
    rng = np.random.default_rng(1)
    for shape in [(3, 4), (5, 1), (0, 2)]:
        x = (rng.standard_normal(shape) * 10).astype(np.float32)
        y = f(tf.constant(x)).numpy()
        assert y.shape == shape
        eager = quantize_np(x, fmt, rounding="stochastic", seed=5)
        assert np.array_equal(bits_of(y), bits_of(eager))
        assert np.array_equal(bits_of(g(tf.constant(x)).numpy()), bits_of(quantize_np(x, fmt)))


# ---------------------------------------------------------------------------------
# Gradients.

def _gradients(x, dy, cases, function):
    """Gradients of quantize(x, *case) w.r.t. x with upstream dy, for every case."""
    def compute(x, dy):
        grads = []
        for fmt, gradient, rounding in cases:
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = tfhfp8.quantize(x, fmt, gradient=gradient, rounding=rounding, seed=3)
            grads.append(tape.gradient(y, x, output_gradients=dy))
        return grads
    if function:
        compute = tf.function(compute)
    return [g.numpy() for g in compute(tf.constant(x), tf.constant(dy))]


@pytest.mark.parametrize("function", [False, True], ids=["eager", "tf_function"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, ml_dtypes.bfloat16],
                         ids=lambda d: np.dtype(d).name)
def test_gradients(dtype, function, backend):
    rng = np.random.default_rng(2)
    for name in ("hfp8_fwd", "float8_e5m2", "float4_e2m1fn"):
        fmt = formats.get(name)
        x = np.concatenate([rng.standard_normal(50) * fmt.max / 2,
                            [fmt.max, -fmt.max, 1.01 * fmt.max, -1.5 * fmt.max, 10 * fmt.max,
                             np.inf, -np.inf, 0.0]]).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        cases = [(name, gradient, rounding) for gradient in ("straight_through", "zero_overflow")
                 for rounding in ("nearest_even", "stochastic")]
        over = np.abs(x.astype(np.float64)) > fmt.max
        assert over.sum() >= 5 and (~over).sum() >= 40
        for (_, gradient, rounding), g in zip(cases, _gradients(x, dy, cases, function)):
            assert g.dtype == x.dtype
            if gradient == "straight_through":
                np.testing.assert_array_equal(g, dy)
            else:
                np.testing.assert_array_equal(g[~over], dy[~over])
                np.testing.assert_array_equal(g[over], np.zeros_like(dy[over]))


def test_gradient_dfp_straight_through(backend):
    x = np.array([[1.0, 3e4, -1e-9], [2.0, 7.0, 0.5]], np.float32)
    dy = np.array([[0.5, -1.0, 2.0], [3.0, 4.0, -5.0]], np.float32)
    cases = [("int16_dfp", "straight_through", "nearest_even"),
             (tfhfp8.DynamicFixedPoint(8, axis=0), "straight_through", "stochastic")]
    for g in _gradients(x, dy, cases, False):
        np.testing.assert_array_equal(g, dy)


# ---------------------------------------------------------------------------------
# Backends and XLA.

def test_backend_info_reports_backend_and_reason(monkeypatch):
    monkeypatch.delenv("TFHFP8_BACKEND", raising=False)
    info = tfhfp8.ops.backend_info()
    assert info["backend"] in ("tf", "cpp")
    assert isinstance(info["reason"], str) and info["reason"]
    if not tf.config.list_logical_devices("GPU"):
        # On CPU the C++ kernels are chosen when they build; else the reason says why.
        assert info["backend"] == "cpp" or "unavailable" in info["reason"]


@pytest.mark.parametrize("forced", ["tf", "cpp"])
def test_backend_info_forced(forced, monkeypatch):
    monkeypatch.setenv("TFHFP8_BACKEND", forced)
    info = tfhfp8.ops.backend_info()
    assert info["backend"] == forced
    assert "TFHFP8_BACKEND" in info["reason"]


def test_backend_env_invalid(monkeypatch):
    monkeypatch.setenv("TFHFP8_BACKEND", "cuda")
    with pytest.raises(ValueError, match="TFHFP8_BACKEND"):
        tfhfp8.quantize(tf.constant([1.0]), "float8_e5m2")


def _xla_cases(x32, x64):
    return [
        (x32, "float8_e5m2", "nearest_even", False),
        (x32, "hfp8_fwd", "stochastic", True),
        (x32, "float6_e3m2fn", "toward_zero", False),
        (x32, "bfloat16", "nearest_even", True),
        (x64, "float8_e4m3fn", "stochastic", False),
        (x64, "float16", "nearest_even", False),
        (x32, "int16_dfp", "nearest_even", False),
        (x64, tfhfp8.DynamicFixedPoint(16, axis=1), "stochastic", True),
        (x32, tfhfp8.DynamicFixedPoint(10, axis=0), "toward_zero", False),
    ]


@pytest.mark.parametrize("env", [None, "tf"], ids=["auto", "forced_tf"])
def test_jit_compile_matches_cpp(env, monkeypatch):
    rng = np.random.default_rng(4)
    x32 = (rng.standard_normal((64, 50)) * np.exp2(rng.integers(-16, 16, (64, 50))))
    x32 = x32.astype(np.float32)
    x32[0, :5] = [np.inf, -np.inf, np.nan, 0.0, -0.0]
    x64 = x32.astype(np.float64) * (1 + 2.0**-30)
    cases = _xla_cases(x32, x64)
    chosen = []

    def body(a, b):
        chosen.append(tfhfp8.ops.backend_info()["backend"])
        inputs = {"f32": a, "f64": b}
        return [tfhfp8.quantize(inputs["f32" if x is x32 else "f64"], fmt, rounding=rounding,
                                saturate=saturate, seed=-5)
                for x, fmt, rounding, saturate in cases]

    if env is None:
        monkeypatch.delenv("TFHFP8_BACKEND", raising=False)
    else:
        monkeypatch.setenv("TFHFP8_BACKEND", env)
    compiled = tf.function(body, jit_compile=True)
    results = [r.numpy() for r in compiled(tf.constant(x32), tf.constant(x64))]
    assert chosen == ["tf"]  # inside XLA the TF-ops backend is chosen

    monkeypatch.setenv("TFHFP8_BACKEND", "cpp")
    for (x, fmt, rounding, saturate), got in zip(cases, results):
        expected = quantize_np(x, fmt, rounding=rounding, saturate=saturate, seed=-5)
        assert np.array_equal(bits_of(got), bits_of(expected)), (fmt, rounding, saturate)


# -- forward-mode differentiation (tf.autodiff.ForwardAccumulator) -------------------------

_FORWARD_X = np.array([1.0, 0.1, -1000.0, 3e-3, 0.0, -7.5], np.float32)
_FORWARD_T = np.array([1.0, 2.0, 3.0, -4.0, 5.0, 6.0], np.float32)


def _jvp(function, x, t, where):
    x, t = tf.constant(x), tf.constant(t)

    def run():
        with tf.autodiff.ForwardAccumulator(x, t) as accumulator:
            y = function(x)
        return y, accumulator.jvp(y, unconnected_gradients="zero")

    if where == "eager":
        return run()
    if where == "function_inside":  # the accumulator is made while tracing
        return tf.function(run)()
    with tf.autodiff.ForwardAccumulator(x, t) as accumulator:  # around a tf.function
        y = tf.function(function)(x)
    return y, accumulator.jvp(y, unconnected_gradients="zero")


@pytest.mark.parametrize("where", ["eager", "function_inside", "function_outside"])
@pytest.mark.parametrize("fmt", ["float8_e4m3b11fnuz", "float8_e5m2", "int8_dfp_axis"])
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
def test_forward_mode_is_straight_through(where, fmt, rounding, backend):
    fmt = tfhfp8.DynamicFixedPoint(8, axis=0) if fmt == "int8_dfp_axis" else fmt
    q = lambda v: tfhfp8.quantize(v, fmt, rounding=rounding, saturate=True, seed=11)
    y, jvp = _jvp(q, _FORWARD_X, _FORWARD_T, where)
    np.testing.assert_array_equal(y.numpy(), q(tf.constant(_FORWARD_X)).numpy())
    np.testing.assert_array_equal(jvp.numpy(), _FORWARD_T)
    # quantize_gradient is the identity forward: its tangent too.
    g = lambda v: tfhfp8.quantize_gradient(v, fmt, rounding=rounding, seed=11)
    y, jvp = _jvp(g, _FORWARD_X, _FORWARD_T, where)
    np.testing.assert_array_equal(y.numpy(), _FORWARD_X)
    np.testing.assert_array_equal(jvp.numpy(), _FORWARD_T)


@pytest.mark.parametrize("where", ["eager", "function_inside", "function_outside"])
def test_forward_mode_zero_overflow_zeroes_the_tangent_beyond_max(where, backend):
    fmt = formats.get("float8_e4m3b11fnuz")  # max 30
    q = lambda v: tfhfp8.quantize(v, fmt, saturate=True, gradient="zero_overflow")
    _, jvp = _jvp(q, _FORWARD_X, _FORWARD_T, where)
    expected = np.where(np.abs(_FORWARD_X) <= fmt.max, _FORWARD_T, 0)
    np.testing.assert_array_equal(jvp.numpy(), expected)
    # ... and agrees with reverse mode.
    x = tf.constant(_FORWARD_X)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = q(x)
    np.testing.assert_array_equal(tape.gradient(y, x, tf.constant(_FORWARD_T)).numpy(),
                                  expected)


def test_forward_mode_through_an_emulated_layer(backend):
    layer = tfhfp8.layers.Dense(3, policy="hfp8", use_bias=False)
    x = tf.constant(np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4))
    layer(x)
    t = tf.ones_like(x)
    w = tfhfp8.quantize(layer.kernel, "float8_e4m3b11fnuz", saturate=True)
    for where in ("eager", "function_inside"):
        _, jvp = _jvp(lambda v: layer(v), x.numpy(), t.numpy(), where)
        # d/dx (Q(x) @ Q(W)) . t = t @ Q(W) (straight through Q on x).
        np.testing.assert_allclose(jvp.numpy(), t.numpy() @ w.numpy(), rtol=1e-6)
