"""What an adversarial campaign of 225 probes found (issue 24, point 3), one test each:
silent wrong answers against independent references, unclear errors made clear, and no
command overwriting a file unasked. (The CLI's own tests are in test_cli.py.)"""

import os
import subprocess
import sys
import zipfile

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from helpers import bits_of, current_scaling_reference

import tfhfp8
from tfhfp8 import experiment

E4M3 = "float8_e4m3"
DFP8 = tfhfp8.DynamicFixedPoint(8)


# -- silent wrong (a): an empty reduction is +0 ------------------------------------------
def test_cpp_kernels_write_zeros_when_k_is_zero():
    from tfhfp8.ops import cpp_backend

    cpp_backend.load()
    for _ in range(3):  # stale memory differs from call to call
        c, overflows = cpp_backend.int32_matmul(tf.zeros([1, 2, 0], tf.int32),
                                                tf.zeros([1, 0, 3], tf.int32), 0, "wrap")
        np.testing.assert_array_equal(bits_of(c.numpy()), np.zeros([1, 2, 3], np.uint32))
        assert int(overflows) == 0
        c, _ = cpp_backend.accumulating_matmul(
            tf.zeros([1, 2, 0]), tf.zeros([1, 0, 3]),
            *tfhfp8.accumulation.get("float16").kernel_arguments(), tf.constant(0, tf.int64))
        np.testing.assert_array_equal(bits_of(c.numpy()), np.zeros([1, 2, 3], np.uint32))


@pytest.mark.parametrize("accumulator, fmt", [("float16", E4M3), ("int32", DFP8),
                                              ("float32", None)])
def test_matmul_of_an_empty_reduction_is_plus_zero_on_both_backends(backend, accumulator,
                                                                     fmt):
    c = tfhfp8.matmul(tf.zeros([2, 0]), tf.zeros([0, 3]), accumulator, a_format=fmt,
                      b_format=fmt)
    np.testing.assert_array_equal(bits_of(c.numpy()), np.zeros([2, 3], np.uint32))
    # Empty everywhere (found by tests/test_fuzz_campaign.py: M = K = 0 with a 2-D b
    # folded a's rows into one).
    for a_shape, b_shape, c_shape in (([0, 0], [0, 1], [0, 1]), ([3, 0, 0], [0, 2], [3, 0, 2]),
                                      ([2, 1, 0], [2, 0, 4], [2, 1, 4]),
                                      ([0, 2, 0], [0, 0, 4], [0, 2, 4])):
        c = tfhfp8.matmul(tf.zeros(a_shape), tf.zeros(b_shape), accumulator, a_format=fmt,
                          b_format=fmt)
        assert c.shape == c_shape
        np.testing.assert_array_equal(bits_of(c.numpy()), np.zeros(c_shape, np.uint32))


# -- silent wrong (b): block-scaled operands blocked along K -----------------------------
def _mxfp8_e4m3_along(x, axis):
    """OCP MX (E4M3 elements, E8M0 floor scales, 32-element blocks) along `axis`, in
    numpy: scale 2^(floor(log2 amax) - 8), elements saturated at 448, rounded to
    nearest even by ml_dtypes."""
    moved = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    out = np.empty_like(moved)
    for start in range(0, moved.shape[-1], 32):
        block = moved[..., start:start + 32]
        amax = np.max(np.abs(block), axis=-1, keepdims=True)
        exponent = np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 8
        scale = 2.0 ** np.clip(exponent, -127, 127)
        elements = np.clip(block / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
        out[..., start:start + 32] = elements.astype(np.float64) * scale
    return np.moveaxis(out, -1, axis).astype(np.float32)


def test_matmul_blocks_b_along_k_as_in_the_issue():
    a = np.ones((1, 32), np.float32)
    b = np.ones((32, 2), np.float32)
    b[:, 0], b[:, 1] = 1000, 1e-3
    c = tfhfp8.matmul(a, b, b_format="mxfp8_e4m3").numpy()
    np.testing.assert_array_equal(c, [[28672, 0.03125]])
    c = tfhfp8.matmul(a, b.T.copy(), b_format="mxfp8_e4m3", transpose_b=True).numpy()
    np.testing.assert_array_equal(c, [[28672, 0.03125]])


@pytest.mark.parametrize("transpose", [False, True])
def test_matmul_block_formats_along_k_match_a_numpy_reference(backend, transpose):
    rng = np.random.default_rng(3)
    k, n = 70, 5  # a last block of 6
    values = (rng.normal(size=(2, k, n)) * np.exp2(rng.integers(-20, 20, size=(2, k, n))))
    values = values.astype(np.float32)  # [batch, K, N]
    expected = _mxfp8_e4m3_along(values, axis=1)
    eye = np.broadcast_to(np.eye(k, dtype=np.float32), (2, k, k))
    # b = values: c = eye @ Q(b) = Q(b), b blocked along K (its axis -2).
    b = np.swapaxes(values, 1, 2).copy() if transpose else values
    # (Values, not bits: a sum of products with +0 terms turns -0 into +0.)
    c = tfhfp8.matmul(eye, b, b_format="mxfp8_e4m3", transpose_b=transpose).numpy()
    np.testing.assert_array_equal(c, expected)
    # a = values^T [batch, N, K]: c = Q(a) @ eye, a blocked along K (its last axis).
    a = values if transpose else np.swapaxes(values, 1, 2).copy()
    c = tfhfp8.matmul(a, eye, a_format="mxfp8_e4m3", transpose_a=transpose).numpy()
    np.testing.assert_array_equal(c, np.swapaxes(expected, 1, 2))


# -- silent wrong (c): delayed scales must be usable --------------------------------------
@pytest.mark.parametrize("scale", [0.0, -0.0, float("nan"), float("inf"), -1.0, 1e-40,
                                   np.float32(0), tf.constant(-2.0)],
                         ids=lambda s: repr(s)[:20])
def test_delayed_scaling_rejects_unusable_scales_up_front(scale):
    x = tf.Variable([1.0, 2.0])
    with pytest.raises(ValueError, match="scale must be a finite float32 of at least"):
        tfhfp8.quantize(x, "e4m3_delayed", scale=scale)


def test_delayed_scaling_checks_a_traced_scale_when_it_runs():
    quantize = tf.function(lambda x, s: tfhfp8.quantize(x, "e4m3_delayed", scale=s))
    x = tf.constant([1.0, 2.0])
    np.testing.assert_array_equal(quantize(x, tf.constant(0.5)).numpy(), [1.0, 2.0])
    for bad in (0.0, float("nan"), float("inf"), -1.0):
        with pytest.raises(tf.errors.InvalidArgumentError,
                           match="scale must be a finite float32 of at least"):
            quantize(x, tf.constant(bad))


# -- silent wrong (d): current scaling of tiny tensors ------------------------------------
@pytest.mark.parametrize("name, element, maximum", [
    ("e4m3_current", ml_dtypes.float8_e4m3fn, 448.0),
    ("e5m2_current", ml_dtypes.float8_e5m2, 57344.0)])
@pytest.mark.parametrize("amax", [1e-30, 5e-36, 1e-37, 1e-39, 3e-45])
@pytest.mark.arithmetic
def test_current_scaling_of_tiny_tensors_matches_the_reference(backend, name, element,
                                                                maximum, amax):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 256)).astype(np.float32)
    x = (x / np.max(np.abs(x)) * np.float32(amax)).astype(np.float32)  # subnormals too
    y = tfhfp8.quantize(x, name).numpy()
    assert not np.isnan(y).any()
    expected = current_scaling_reference(x, element, maximum)
    np.testing.assert_array_equal(bits_of(y), bits_of(expected))
    # Close to the input, as Transformer Engine's reference: within half a step of the
    # element (E5M2: 2^-3 relative; its subnormals and E4M3's: below amax * 2^-16),
    # and the scale never below 2^-126 (steps of at most 2^-135 for E4M3, 2^-142 E5M2).
    np.testing.assert_allclose(y, x, rtol=0.13, atol=max(amax * 2.0**-16, 2.0**-135))
    compiled = tf.function(lambda t: tfhfp8.quantize(t, name), jit_compile=True)
    np.testing.assert_array_equal(bits_of(compiled(x).numpy()), bits_of(expected))
    stochastic = tfhfp8.quantize(x, name, rounding="stochastic", seed=1).numpy()
    assert not np.isnan(stochastic).any()


def test_current_scaling_of_ordinary_tensors_is_unchanged(backend):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(32, 48)) * 3).astype(np.float32)
    x[0, :3] = [np.nan, np.inf, 0]
    expected = current_scaling_reference(x[1:], ml_dtypes.float8_e4m3fn, 448.0)
    np.testing.assert_array_equal(bits_of(tfhfp8.quantize(x[1:], "e4m3_current").numpy()),
                                  bits_of(expected))
    assert np.isnan(tfhfp8.quantize(x, "e4m3_current").numpy()[0, 0])


# -- unclear errors: matmul ---------------------------------------------------------------
def test_chunk_size_beyond_int32_is_a_clear_error():
    for chunk in (2**31, 2**40):
        with pytest.raises(ValueError, match="chunk_size"):
            tfhfp8.Accumulator("float16", chunk_size=chunk)
    assert tfhfp8.Accumulator("float16", chunk_size=2**31 - 1).chunk_size == 2**31 - 1


@pytest.mark.parametrize("accumulator, fmt", [("float16", E4M3), ("int32", DFP8),
                                              ("float32", None)])
def test_matmul_shape_errors_name_the_users_shapes(accumulator, fmt):
    def call(a, b, **kwargs):
        return tfhfp8.matmul(tf.ones(a), tf.ones(b), accumulator, a_format=fmt,
                             b_format=fmt, **kwargs)

    with pytest.raises(ValueError, match=r"\[2, 4\].*\[5, 3\]"):
        call([2, 4], [5, 3])
    with pytest.raises(ValueError, match=r"\[7, 2, 4\].*\[7, 3, 5\].*transpose_b"):
        call([7, 2, 4], [7, 3, 5], transpose_b=False)
    for a, b in (([4], [4, 3]), ([2, 4], [4]), ([], [4, 3])):
        with pytest.raises(ValueError, match="rank"):
            call(a, b)
    with pytest.raises(ValueError, match=r"batch.*\[2, 1, 4\].*\[3, 4, 1\]"):
        call([2, 1, 4], [3, 4, 1])


def test_matmul_shape_mismatch_in_a_traced_function_names_the_users_shapes():
    product = tf.function(lambda a, b: tfhfp8.matmul(a, b, "float16", a_format=E4M3,
                                                     b_format=E4M3),
                          input_signature=[tf.TensorSpec([None, None]),
                                           tf.TensorSpec([None, None])])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"K.*\[2 4\].*\[5 3\]"):
        product(tf.ones([2, 4]), tf.ones([5, 3]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_matmul_takes_other_float_dtypes_as_float32(dtype):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 40)), rng.normal(size=(40, 2))
    a16, b16 = tf.cast(a, dtype), tf.cast(b, dtype)
    expected = tfhfp8.matmul(tf.cast(a16, tf.float32), tf.cast(b16, tf.float32), "float16",
                             a_format=E4M3, b_format=E4M3)
    with tf.GradientTape() as tape:
        tape.watch(a16)
        c = tfhfp8.matmul(a16, b16, "float16", a_format=E4M3, b_format=E4M3)
    assert c.dtype == tf.float32
    np.testing.assert_array_equal(c.numpy(), expected.numpy())
    assert tape.gradient(c, a16).dtype == a16.dtype


@pytest.mark.parametrize("value", [tf.ones([2, 2], tf.int32), tf.ones([2, 2], tf.complex64),
                                   tf.ones([2, 2], tf.bool), np.ones([2, 2], np.int64),
                                   "ab"],
                         ids=lambda v: str(getattr(v, "dtype", type(v).__name__)))
def test_matmul_rejects_non_float_operands_naming_the_dtype(value):
    for a, b in ((value, tf.ones([2, 2])), (tf.ones([2, 2]), value)):
        with pytest.raises(TypeError, match=r"float16, bfloat16, float32 or float64"):
            tfhfp8.matmul(a, b)


def test_forced_cpp_backend_does_not_apply_inside_xla(monkeypatch):
    monkeypatch.setenv("TFHFP8_BACKEND", "cpp")
    rng = np.random.default_rng(4)
    x = rng.normal(size=(8, 16)).astype(np.float32)
    w = rng.normal(size=(16, 4)).astype(np.float32)
    seen = []

    def probe(t):
        seen.append(tfhfp8.ops.backend_info()["backend"])  # while tracing
        return t + 1

    tf.function(probe, jit_compile=True)(tf.ones([1]))
    assert seen == ["tf"]

    def step(x, w):
        return (tfhfp8.quantize(x, "hfp8_fwd", rounding="stochastic", seed=3),
                tfhfp8.matmul(x, w, "float16_chunk64", a_format=E4M3, b_format=E4M3))

    compiled = tf.function(step, jit_compile=True)
    for got, expected in zip(compiled(x, w), step(x, w)):
        np.testing.assert_array_equal(bits_of(got.numpy()), bits_of(expected.numpy()))


# -- unclear errors: the optimizer, conversion, files -------------------------------------
def test_low_precision_optimizer_steps_plain_tf_variables():
    variable = tf.Variable([1.0, 2.0, 3.0])
    reference = keras.Variable([1.0, 2.0, 3.0])
    for target in (variable, reference):
        optimizer = tfhfp8.optimizers.LowPrecisionOptimizer(keras.optimizers.SGD(0.1),
                                                   policy="hfp8")
        optimizer.apply_gradients([(tf.constant([0.5, 0.5, 0.5]), target)])
    np.testing.assert_array_equal(variable.numpy(), reference.numpy())
    assert not np.array_equal(variable.numpy(), [1.0, 2.0, 3.0])


def test_conv_model_with_block_formats_and_accumulation_is_not_implemented():
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
    with pytest.raises(NotImplementedError, match="block-scaled"):
        tfhfp8.quantize_model(model, tfhfp8.Policy("mxfp8", accumulation="float16"))


def _saved_model(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    path = tmp_path / "model.keras"
    model.save(path)
    weights = tmp_path / "model.weights.h5"
    model.save_weights(weights)
    return model, path, weights


def _truncated(path):
    damaged = path.with_name("damaged_" + path.name)
    data = path.read_bytes()
    damaged.write_bytes(data[:len(data) // 2])
    return damaged


def test_loading_a_damaged_file_says_so_and_names_it(tmp_path):
    model, path, weights = _saved_model(tmp_path)
    assert experiment.load_model_file(path, "--model").count_params() == model.count_params()
    for damaged in (_truncated(path), _truncated(weights)):
        with pytest.raises(ValueError, match=rf"--model: .*{damaged.name}.* damaged"):
            experiment.load_model_file(damaged, "--model")
    with pytest.raises(ValueError, match="weights"):
        experiment.load_model_file(weights, "--model")  # a weights file is not a model
    with pytest.raises(ValueError, match="no such file"):
        experiment.load_model_file(tmp_path / "missing.keras", "--model")


# -- unclear errors: the main job -----------------------------------------------------------
def test_train_checks_that_replicas_divide_the_batch():
    with pytest.raises(ValueError, match=r"batch_size.*64.*replicas.*3"):
        experiment.train_policies("mlp", "digits", ["float32"], batch_size=64, replicas=3)


def test_train_says_which_datasets_a_model_takes():
    with pytest.raises(ValueError, match=r"transformer_classifier.*rotten_tomatoes"):
        experiment.train_policies("transformer_classifier", "digits", ["float32"])
    with pytest.raises(ValueError, match=r"small_cnn.*digits"):
        experiment.train_policies("small_cnn", "rotten_tomatoes", ["float32"])


# -- the command line: short usage errors, no overwriting -----------------------------------
def _cli(*args, cwd=None):
    command = [sys.executable, "-c", "from tfhfp8.cli import run; run()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})


def _lines(stderr):
    return [line for line in stderr.splitlines() if line.strip()
            and "cuda" not in line.lower() and not line.startswith(("WARNING: All log",
                                                                     "I0000", "E0000"))]


def test_usage_errors_are_one_line():
    for args in (("fly",), ("ptq",)):
        result = _cli(*args)
        assert result.returncode not in (0, None) and result.returncode > 0
        lines = _lines(result.stderr)
        assert len(lines) <= 2, result.stderr
        assert "tfhfp8" in lines[0] and ("Usage" in lines[0] or "--model" in lines[0])


def test_commands_refuse_to_overwrite_files_unless_asked(tmp_path, command_in_process):
    _cli = command_in_process
    _, path, _ = _saved_model(tmp_path)
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(16, 4)).astype("float32"))
    output = tmp_path / "out.keras"
    output.write_bytes(b"precious")
    result = _cli("ptq", f"--model={path}", f"--data={data}", f"--output={output}",
                  "--calibration_steps=1", "--batch_size=8")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "--overwrite" in result.stderr and str(output) in result.stderr
    assert output.read_bytes() == b"precious"
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    (out_dir / "curves.png").write_bytes(b"precious")
    result = _cli("train", "--model=mlp", "--dataset=digits", "--policies=float32",
                  "--epochs=1", f"--output_dir={out_dir}")
    assert result.returncode == 1 and "--overwrite" in result.stderr, result.stderr[-2000:]
    assert (out_dir / "curves.png").read_bytes() == b"precious"
    result = _cli("ptq", f"--model={path}", f"--data={data}", f"--output={output}",
                  "--calibration_steps=1", "--batch_size=8", "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert zipfile.is_zipfile(output)
