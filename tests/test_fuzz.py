"""Bad input, swept over the public API: a correct result or a clear ValueError/TypeError.

Never a C++ crash, a hang, a generic internal error or a silent wrong answer. The
probes that could crash the process (the raw kernels, threads) run in a subprocess, so
that a crash fails a test instead of killing pytest. Kept fast (well under a minute).
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfhfp8
from helpers import bits_of
from tfhfp8 import formats

_ERRORS = (ValueError, TypeError)


def _clear_error(call, error=_ERRORS, match=None):
    """`call()` raises `error` with a message of a few words at least (not a crash)."""
    with pytest.raises(error, match=match) as info:
        call()
    assert len(str(info.value).split()) >= 3, repr(info.value)
    return info.value


# -- tfhfp8.quantize / quantize_gradient ------------------------------------------------------

_NOT_FLOAT = [
    tf.constant([1, 2], tf.int32), tf.constant([1], tf.int64), tf.constant([1], tf.uint8),
    tf.constant([1 + 2j], tf.complex64), tf.constant(["a"]), tf.constant([True]),
    np.array([1, 2]), np.array([1 + 1j]), np.array(["x"]), np.array([True]),
    None, "1.0", b"1", [1.0, "a"], [[1.0], [2.0, 3.0]], {"x": 1.0}, object(),
    tf.ragged.constant([[1.0], [2.0, 3.0]]), tf.sparse.from_dense(tf.ones([2, 2])),
]


@pytest.mark.parametrize("x", _NOT_FLOAT, ids=lambda v: type(v).__name__ + str(
    getattr(v, "dtype", "")))
def test_non_float_inputs_are_type_errors(x, backend):
    _clear_error(lambda: tfhfp8.quantize(x, "float8_e5m2"), TypeError)
    _clear_error(lambda: tfhfp8.quantize_gradient(x, "float8_e5m2"), TypeError)


@pytest.mark.parametrize("kwargs", [
    dict(fmt=None), dict(fmt=3), dict(fmt=""), dict(fmt="FLOAT8_E5M2"), dict(fmt=["hfp8"]),
    dict(fmt={"exponent_bits": 4}), dict(fmt=tfhfp8.Policy("hfp8")),
    dict(rounding="up"), dict(rounding=None), dict(rounding=["stochastic"]),
    dict(saturate="yes"), dict(saturate=1), dict(saturate=None),
    dict(seed=1.5), dict(seed="1"), dict(seed=tf.constant([1, 2])), dict(seed=[1]),
])
def test_bad_arguments_are_clear_errors_up_front(kwargs, backend):
    kwargs = {"fmt": "float8_e5m2", "rounding": "stochastic", **kwargs}
    fmt = kwargs.pop("fmt")
    x = tf.ones([4, 2])
    _clear_error(lambda: tfhfp8.quantize(x, fmt, **kwargs))
    # quantize_gradient checks them before any backward pass runs.
    _clear_error(lambda: tfhfp8.quantize_gradient(x, fmt, **kwargs))


def test_bad_gradient_mode(backend):
    _clear_error(lambda: tfhfp8.quantize(tf.ones([2]), "float8_e5m2", gradient="sideways"),
                 ValueError, "gradient must be one of")


_SPECIALS = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-40, 3e38,
                      -3e38, 1.0, -1.5, 65504.0, 6e-8, 1e-30, 57344.0, 61440.0], np.float32)


@pytest.mark.parametrize("fmt", ["float8_e5m2", "float8_e4m3fn", "float8_e4m3b11fnuz",
                                 "float8_e5m2fnuz", "float16", "bfloat16", "float4_e2m1fn",
                                 tfhfp8.DynamicFixedPoint(8), tfhfp8.DynamicFixedPoint(4, -1)],
                         ids=str)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("saturate", [False, True])
def test_specials_empty_and_scalars_agree_on_both_backends(fmt, dtype, saturate, monkeypatch):
    def run(x, **kwargs):
        results = []
        for backend in ("tf", "cpp"):
            monkeypatch.setenv("TFHFP8_BACKEND", backend)
            y = tfhfp8.quantize(x, fmt, saturate=saturate, **kwargs)
            assert y.dtype == x.dtype and y.shape == x.shape
            results.append(y)
        return results

    x = tf.cast(tf.constant(_SPECIALS[None]), dtype)
    for rounding in ("nearest_even", "stochastic", "toward_zero"):
        a, b = run(x, rounding=rounding, seed=3)
        np.testing.assert_array_equal(bits_of(a.numpy()), bits_of(b.numpy()))
    nan_in = np.isnan(x.numpy().astype(np.float64))
    if saturate or getattr(formats.get(fmt), "has_nan", True):
        assert np.isnan(a.numpy().astype(np.float64))[nan_in].all()  # NaN stays NaN
    if isinstance(fmt, str) and formats.get(fmt).has_negative_zero:
        negative_zero = (x.numpy().astype(np.float64) == 0) & np.signbit(x.numpy())
        assert np.signbit(a.numpy()[negative_zero]).all()  # -0 stays -0
    for shape in ([], [0], [3, 0, 2]):
        x = tf.zeros(shape, dtype) + tf.constant(1.7, dtype)
        if not shape and getattr(fmt, "axis", None) is not None:
            _clear_error(lambda: run(x), ValueError, "out of range for a tensor of rank 0")
            continue
        a, b = run(x)
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        assert a.shape == shape


@pytest.mark.parametrize("fmt", ["float8_e5m2", tfhfp8.DynamicFixedPoint(8),
                                 tfhfp8.DynamicFixedPoint(8, axis=2)], ids=str)
def test_unknown_shapes_in_tf_function_match_eager(fmt, backend):
    x = tf.constant(np.random.default_rng(0).normal(size=(3, 4, 5)).astype("float32"))
    eager = tfhfp8.quantize(x, fmt, rounding="stochastic", seed=9)
    dims = tf.function(lambda t: tfhfp8.quantize(t, fmt, rounding="stochastic", seed=9),
                       input_signature=[tf.TensorSpec([None, None, None], tf.float32)])
    np.testing.assert_array_equal(dims(x).numpy(), eager.numpy())
    rank = tf.function(lambda t: tfhfp8.quantize(t, fmt, rounding="stochastic", seed=9),
                       input_signature=[tf.TensorSpec(None, tf.float32)])
    if isinstance(fmt, tfhfp8.DynamicFixedPoint) and fmt.axis is not None:
        _clear_error(lambda: rank(x), ValueError, "known rank")
    else:
        np.testing.assert_array_equal(rank(x).numpy(), eager.numpy())


@pytest.mark.parametrize("fmt", ["float8_e5m2", tfhfp8.DynamicFixedPoint(8),
                                 tfhfp8.DynamicFixedPoint(6, axis=-2)], ids=str)
def test_tensors_of_rank_above_8_round_like_their_rank_3_view(fmt, backend):
    # TensorFlow's select supports at most rank 8: the TF-ops backend (and the shared
    # exponents) raised UnimplementedError on rank 9 and more.
    values = np.random.default_rng(1).normal(size=2 * 3 * 4).astype("float32") * 100
    high = values.reshape([1, 2, 1, 1, 1, 1, 1, 1, 3, 4])
    for rounding in ("nearest_even", "stochastic"):
        y = tfhfp8.quantize(high, fmt, rounding=rounding, seed=5).numpy()
        view = tfhfp8.quantize(values.reshape(2, 3, 4), fmt, rounding=rounding,
                               seed=5).numpy()
        np.testing.assert_array_equal(y.reshape(2, 3, 4), view)
    _clear_error(lambda: tfhfp8.quantize(high, tfhfp8.DynamicFixedPoint(8, axis=10)),
                 ValueError, "out of range")


# -- formats, policies -------------------------------------------------------------------------

@pytest.mark.parametrize("identifier", [None, 3, 2.5, "", "x", "FLOAT8_E5M2", [], {},
                                        {"class_name": "FloatFormat"}, object()],
                         ids=lambda v: "object" if type(v) is object else repr(v))
def test_formats_get_bad_identifiers(identifier):
    _clear_error(lambda: formats.get(identifier))


@pytest.mark.parametrize("kwargs", [
    dict(exponent_bits=0, mantissa_bits=2), dict(exponent_bits=-1, mantissa_bits=2),
    dict(exponent_bits=12, mantissa_bits=2), dict(exponent_bits=4.0, mantissa_bits=3),
    dict(exponent_bits=True, mantissa_bits=3), dict(exponent_bits="4", mantissa_bits=3),
    dict(exponent_bits=4, mantissa_bits=-1), dict(exponent_bits=4, mantissa_bits=60),
    dict(exponent_bits=4, mantissa_bits=3, bias=1000), dict(exponent_bits=4, mantissa_bits=3,
                                                            bias=7.5),
    dict(exponent_bits=4, mantissa_bits=3, specials="weird"),
    dict(exponent_bits=4, mantissa_bits=3, subnormals="no"),
    dict(exponent_bits=1, mantissa_bits=0),
])
def test_float_format_bad_parameters(kwargs):
    _clear_error(lambda: tfhfp8.FloatFormat(**kwargs))


@pytest.mark.parametrize("kwargs", [dict(bits=0), dict(bits=1), dict(bits=64), dict(bits=8.0),
                                    dict(bits=True), dict(bits="8"), dict(bits=8, axis="x"),
                                    dict(bits=8, axis=1.5), dict(bits=8, axis=99)])
def test_dynamic_fixed_point_bad_parameters(kwargs):
    _clear_error(lambda: tfhfp8.DynamicFixedPoint(**kwargs))


@pytest.mark.parametrize("args, kwargs", [
    (("hfp9",), {}), (("",), {}), ((None,), {}), ((3,), {}),
    (("x",), dict(weights=3)), (("x",), dict(weights="float8_e5m2", rounding=["stochastic"])),
    (("x",), dict(weights="float8_e5m2", rounding={"weights": 3})),
    (("x",), dict(weights="float8_e5m2", rounding={"bias": "stochastic"})),
    (("x",), dict(weights="float8_e5m2", saturate=1)),
    (("x",), dict(weights="float8_e5m2", exempt_first_last="yes")),
    (("x",), dict(weights="float8_e5m2", exempt_format=5)),
    (("x",), dict(weights="float8_e5m2", loss_scaling=3)),
    (("x",), dict(weights="float8_e5m2", loss_scaling="sometimes")),
])
def test_policy_bad_arguments(args, kwargs):
    _clear_error(lambda: tfhfp8.Policy(*args, **kwargs))


def test_policy_get_of_a_partial_preset_config_is_the_preset():
    # {"name": "hfp8"} used to give a policy named hfp8 that emulated nothing.
    assert tfhfp8.policy.get({"name": "hfp8"}) == tfhfp8.Policy("hfp8")
    partial = tfhfp8.policy.get({"name": "fp8", "errors": None})
    assert partial.errors is None and partial.weights == tfhfp8.Policy("fp8").weights
    for bad in (3, "", "x", [], object()):
        _clear_error(lambda: tfhfp8.policy.get(bad))


# -- models: quantize_model, summary, recalibrate_batchnorm ------------------------------------

def _model():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense_a"),
                             keras.layers.BatchNormalization(), keras.layers.Dense(2)])


def test_quantize_model_and_summary_bad_arguments():
    model = _model()
    for bad in ("not a model", None, 3, keras.layers.Dense(3)):
        _clear_error(lambda: tfhfp8.quantize_model(bad, "hfp8"), TypeError)
        _clear_error(lambda: tfhfp8.summary(bad), TypeError)
    _clear_error(lambda: tfhfp8.quantize_model(keras.Sequential([keras.layers.Dense(3)])),
                 ValueError, "not built")
    for policy in ("hfp9", 3, [], {"name": "x", "bogus": 1}):
        _clear_error(lambda: tfhfp8.quantize_model(model, policy))
    for exempt in (3, [3], {"dense_a": 1}):
        _clear_error(lambda: tfhfp8.quantize_model(model, "hfp8", exempt=exempt), TypeError,
                     "exempt must be None or a list of layer names")
    _clear_error(lambda: tfhfp8.quantize_model(model, "hfp8", exempt=["nope"]), ValueError,
                 "no layers named")
    # One name (a string, not its characters).
    converted = tfhfp8.quantize_model(model, "hfp8", exempt="dense_a")
    assert type(converted.layers[0]) is keras.layers.Dense
    assert isinstance(converted.layers[2], tfhfp8.layers.Dense)
    _clear_error(lambda: tfhfp8.summary(model, print_fn="stdout"), TypeError, "print_fn")


_X = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")


@pytest.mark.parametrize("kwargs, data", [
    (dict(mode="fast"), _X), (dict(momentum="a"), _X), (dict(momentum=1.5), _X),
    (dict(momentum=float("nan")), _X), (dict(momentum=True), _X), (dict(steps=1.5), _X),
    (dict(steps=True), _X), (dict(steps=0), _X), (dict(batch_size=0), _X),
    ({}, "str"), ({}, 3), ({}, _X[0]), ({}, _X.astype("complex64")), ({}, _X.astype("U3")),
    ({}, np.zeros((16, 5), "float32")), ({}, _X[:, :, None]), ({}, _X[:0]),
    ({}, tf.data.Dataset.from_tensor_slices(_X)), ({}, iter([])), ({}, None),
    ({}, np.where(_X > 1, np.nan, _X)), ({}, np.where(_X > 1, -np.inf, _X)),
])
def test_recalibrate_batchnorm_bad_input_changes_nothing(kwargs, data):
    model = _model()
    before = [v.numpy().copy() for v in model.weights]
    _clear_error(lambda: tfhfp8.recalibrate_batchnorm(model, data, verbose=0, **kwargs))
    for v, value in zip(model.weights, before):
        np.testing.assert_array_equal(v.numpy(), value)


# -- crash-prone probes and the command line, in subprocesses ----------------------------------

_CRASH_PROBES = textwrap.dedent("""
    import threading
    import numpy as np, tensorflow as tf, tfhfp8
    from tfhfp8.ops import cpp_backend

    lib = cpp_backend.load()
    x, seed = tf.ones([4, 6]), tf.constant(1, tf.int64)
    fixed = dict(bits=8, rounding="nearest_even", saturate=True)
    floating = dict(exponent_bits=5, mantissa_bits=2, bias=15, specials="ieee",
                    subnormals=True, rounding="stochastic", saturate=True)
    probes = {
        "inner 0": lambda: lib.hfp8_quantize_fixed(
            x, tf.zeros([4], tf.int32), tf.constant(0, tf.int64), seed, **fixed),
        "inner < 0": lambda: lib.hfp8_quantize_fixed(
            x, tf.zeros([4], tf.int32), tf.constant(-6, tf.int64), seed, **fixed),
        "inner overflows": lambda: lib.hfp8_quantize_fixed(
            x, tf.zeros([4], tf.int32), tf.constant(2**62, tf.int64), seed, **fixed),
        "exponent of rank 2": lambda: lib.hfp8_quantize_fixed(
            x, tf.zeros([2, 2], tf.int32), tf.constant(6, tf.int64), seed, **fixed),
        "seed of shape [2]": lambda: lib.hfp8_quantize_float(
            x, tf.constant([1, 2], tf.int64), **floating),
        "bias out of range": lambda: lib.hfp8_quantize_float(
            x, seed, **dict(floating, exponent_bits=8, mantissa_bits=23, bias=128)),
        "dfp bits 0": lambda: lib.hfp8_quantize_dfp(x, seed, bits=0, rounding="nearest_even",
                                                    saturate=True),
    }
    for name, probe in probes.items():
        try:
            probe()
            print("ACCEPTED", name)
        except tf.errors.InvalidArgumentError:
            print("INVALID_ARGUMENT", name)

    # Threads: one kernel call per thread, each equal to the single-threaded answer.
    data = np.random.default_rng(0).normal(size=(64, 257)).astype("float32")
    expected = tfhfp8.quantize(data, "float8_e5m2", rounding="stochastic", seed=7).numpy()
    results = [None] * 8

    def work(i):
        results[i] = tfhfp8.quantize(data, "float8_e5m2", rounding="stochastic",
                                     seed=7).numpy()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("THREADS", all(np.array_equal(r, expected) for r in results))
""")


def test_raw_kernels_reject_bad_inputs_without_crashing():
    result = subprocess.run([sys.executable, "-c", _CRASH_PROBES], capture_output=True,
                            text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])  # no signal
    lines = result.stdout.splitlines()
    assert [line for line in lines if line.startswith("ACCEPTED")] == []
    assert sum(line.startswith("INVALID_ARGUMENT") for line in lines) == 7, lines
    assert "THREADS True" in lines


def test_command_line_bad_values():
    # (test_cli.py covers every flag; this is the type error of a flag value.)
    argv, message = ["train", "--epochs=abc"], "--epochs"
    result = subprocess.run([sys.executable, "-c", "from tfhfp8.cli import run; run()", *argv],
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode not in (0, None) and result.returncode > 0  # no signal
    assert message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
