"""Stochastic rounding: unbiased, right probabilities, reproducible, seeded."""

import hashlib
import math
import os
import pathlib
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf

import reference as R
import tfhfp8
from helpers import bits_of, format_values, mismatches, quantize_np
from tfhfp8 import formats

pytestmark = pytest.mark.arithmetic  # see setup.cfg

N = 10**5
POSITIONS = (2.0**-10, 0.1, 0.25, 0.5, 0.7, 0.9)


def sr(x, fmt, seed, **kwargs):
    return quantize_np(x, fmt, rounding="stochastic", seed=seed, **kwargs)


def points(name, region, dtype=np.float32):
    """Inputs between two neighbours lo < hi of the format at several positions.

    region: "normal" (around 1), "subnormal" (between two subnormals, or two multiples
    of the quantum below min_normal), "tiny" (between 0 and the smallest subnormal),
    "negative" (a normal value, negated), "top" (between the two largest values)."""
    fmt = formats.get(name)
    v = format_values(name)
    if region in ("normal", "negative"):
        i = int(np.searchsorted(v, 1.0)) + 1
    elif region == "subnormal":
        i = int(np.searchsorted(v, fmt.min_subnormal))  # between 1x and 2x the quantum
    elif region == "tiny":
        i = 0
    elif region == "top":
        i = len(v) - 2
    lo, hi = v[i], v[i + 1]
    x = np.array([lo + p * (hi - lo) for p in POSITIONS]).astype(dtype)
    return -x if region == "negative" else x


def _equals(y, value):
    """Elementwise y == value, with NaN equal to NaN and the sign of zero significant."""
    if math.isnan(value):
        return np.isnan(y)
    return (y == value) & (np.signbit(y) == (math.copysign(1.0, value) < 0))


def check_draws(x, y, spec, saturate=False, sigmas=4.0):
    """y: draws of x (1-D). Values in {down, up}; P(up) and mean within `sigmas` SE."""
    down, up, p = R.stochastic(float(x), spec, saturate)
    n = y.size
    y64 = y.astype(np.float64)
    is_down = _equals(y64, down)
    if _equals(np.array([up]), down)[0]:  # e.g. overflow that saturates
        assert np.all(is_down), (x, down, np.unique(y64))
        return
    is_up = _equals(y64, up)
    assert np.all(is_up | is_down), (x, down, up, np.unique(y64[~(is_up | is_down)]))
    p = float(p)
    se_p = math.sqrt(p * (1 - p) / n)
    assert abs(is_up.mean() - p) <= sigmas * se_p, (x, is_up.mean(), p)
    if math.isfinite(up):
        se_mean = abs(up - down) * se_p
        assert abs(y64.mean() - float(x)) <= sigmas * se_mean, (x, y64.mean(), se_mean)


@pytest.mark.parametrize("region", ["normal", "subnormal", "tiny", "negative", "top"])
@pytest.mark.parametrize("name", ["float8_e5m2", "hfp8_fwd", "float4_e2m1fn", "bfloat16"])
def test_unbiased_over_elements(name, region, backend):
    """10^5 copies of x in one tensor: the hash differs per element index."""
    spec = R.Spec.of(formats.get(name))
    for k, x in enumerate(points(name, region)):
        y = sr(np.full(N, x, np.float32), name, seed=1000 + k)
        check_draws(x, y, spec)


@pytest.mark.parametrize("name", ["float8_e5m2", "hfp8_fwd"])
def test_unbiased_float64(name, backend):
    """float64 input whose position between neighbours needs more than 32 bits."""
    spec = R.Spec.of(formats.get(name))
    v = format_values(name)
    for i in (int(np.searchsorted(v, 1.0)), 3):  # normal and subnormal
        lo, hi = v[i], v[i + 1]
        for p in (1 / 3, 2**-40 + 0.5, 1 - 1 / 7):
            x = lo + p * (hi - lo)
            y = sr(np.full(N, x), name, seed=77)
            assert y.dtype == np.float64
            check_draws(x, y, spec)


@pytest.mark.parametrize("name", ["float8_e5m2", "hfp8_fwd"])
def test_unbiased_over_seeds(name, monkeypatch):
    """The same elements over many seeds (each element index sees every seed).

    C++ backend only (one call per seed): the TF backend gives the same bits for every
    seed (test_same_seed_same_bits_across_backends)."""
    monkeypatch.setenv("TFHFP8_BACKEND", "cpp")
    spec = R.Spec.of(formats.get(name))
    n = 1000
    x = np.concatenate([points(name, "normal"), points(name, "subnormal")])
    xt = tf.constant(x)
    y = np.stack([tfhfp8.quantize(xt, name, rounding="stochastic", seed=k * 7919 - 3 * 10**6)
                  for k in range(n)])
    for i, xi in enumerate(x):
        check_draws(xi, y[:, i], spec)


def test_exact_values_unchanged(backend):
    for name in ("float8_e5m2", "hfp8_fwd", "float6_e2m3fn"):
        v = format_values(name).astype(np.float32)
        x = np.concatenate([v, -v])
        y = sr(x, name, seed=5)
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("name", ["float8_e5m2", "float8_e4m3fn", "hfp8_fwd", "float4_e2m1fn"])
def test_specials_and_saturation(name, backend):
    fmt = formats.get(name)
    spec = R.Spec.of(fmt)
    v = format_values(name)
    mx = v[-1]
    virtual = float(spec.decode_unbounded(spec.max_code + 1))
    between = np.float32(mx + 0.5 * (virtual - mx))  # rounds up with probability 1/2
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32)
    for saturate in (False, True):
        y = sr(x, name, seed=9, saturate=saturate)
        expected = R.round_array(x, spec, saturate=saturate).astype(np.float32)
        assert not mismatches(y, expected).any(), (y, expected)
        y = sr(np.full(N, between), name, seed=10, saturate=saturate)
        check_draws(between, y, spec, saturate)
        y = sr(np.full(1000, -between), name, seed=11, saturate=saturate)
        if saturate:
            assert np.all(y == -mx)
    # Far beyond the range with saturate=True: always +-max.
    y = sr(np.array([4 * virtual, -1e30, np.inf], np.float32), name, seed=1, saturate=True)
    np.testing.assert_array_equal(y, np.float32([mx, -mx, mx]))


# ---------------------------------------------------------------------------------
# Reproducibility.

def _random_inputs(dtype, n=50_000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))
    x = x.astype(dtype)
    x[:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e-30, 3e5]
    return x


SEEDS = [0, 1, -1, 2**31, 2**63 - 1, -(2**63), 123456789123]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, "bfloat16"])
@pytest.mark.parametrize("fmt", ["float8_e5m2", "hfp8_fwd", "bfloat16", "float6_e3m2fn",
                                 tfhfp8.FloatFormat(3, 1, bias=9, subnormals=False)],
                         ids=str)
def test_same_seed_same_bits_across_backends(fmt, dtype, monkeypatch):
    if dtype == "bfloat16":
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
    x = _random_inputs(dtype)
    for seed in SEEDS:
        for saturate in (False, True):
            monkeypatch.setenv("TFHFP8_BACKEND", "tf")
            a = sr(x, fmt, seed, saturate=saturate)
            monkeypatch.setenv("TFHFP8_BACKEND", "cpp")
            b = sr(x, fmt, seed, saturate=saturate)
            assert np.array_equal(bits_of(a), bits_of(b)), (fmt, seed, saturate)


def test_same_seed_same_bits_repeated(backend):
    x = _random_inputs(np.float32, n=5000)
    a = sr(x, "float8_e5m2", 42)
    b = sr(x, "float8_e5m2", 42)
    assert np.array_equal(bits_of(a), bits_of(b))
    c = sr(x, "float8_e5m2", tf.constant(42, tf.int32))
    assert np.array_equal(bits_of(a), bits_of(c))
    f = tf.function(lambda t: tfhfp8.quantize(t, "float8_e5m2", rounding="stochastic", seed=42))
    assert np.array_equal(bits_of(a), bits_of(f(tf.constant(x)).numpy()))


def test_seed_is_taken_modulo_2_64(backend):
    x = np.full(5000, 1.1, np.float32)
    assert np.array_equal(sr(x, "float8_e5m2", 2**64 - 1), sr(x, "float8_e5m2", -1))
    assert np.array_equal(sr(x, "float8_e5m2", 2**64 + 5), sr(x, "float8_e5m2", 5))


def test_different_seeds_differ(backend):
    x = np.full(10_000, 1.125, np.float32)  # a tie of e5m2: P(up) = 1/2
    results = [sr(x, "float8_e5m2", seed) for seed in (0, 1, 2, 2**32, -1)]
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            differ = np.mean(results[i] != results[j])
            assert 0.4 < differ < 0.6, (i, j, differ)  # independent: about half


def test_seed_none_differs_between_calls(backend):
    x = tf.constant(np.full(10_000, 1.125, np.float32))
    a = tfhfp8.quantize(x, "float8_e5m2", rounding="stochastic").numpy()
    b = tfhfp8.quantize(x, "float8_e5m2", rounding="stochastic").numpy()
    assert 0.4 < np.mean(a != b) < 0.6

    f = tf.function(lambda t: tfhfp8.quantize(t, "float8_e5m2", rounding="stochastic"))
    c, d = f(x).numpy(), f(x).numpy()
    assert 0.4 < np.mean(c != d) < 0.6
    assert 0.4 < np.mean(c != a) < 0.6


def test_seed_must_be_integer():
    x = tf.constant([1.1])
    for bad in (1.5, "3", True):
        with pytest.raises(TypeError, match="seed"):
            tfhfp8.quantize(x, "float8_e5m2", rounding="stochastic", seed=bad)
    with pytest.raises(TypeError, match="seed"):
        tfhfp8.quantize(x, "float8_e5m2", rounding="stochastic", seed=tf.constant(1.0))


_THREAD_SCRIPT = textwrap.dedent("""
    import hashlib, os, sys
    import numpy as np
    import tensorflow as tf
    threads = int(sys.argv[1])
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    import tfhfp8
    rng = np.random.default_rng(5)
    x32 = (rng.standard_normal(1 << 18) * 2.0 ** rng.integers(-12, 12, 1 << 18)).astype(np.float32)
    x64 = rng.standard_normal(1 << 17)
    cases = [(x32, "float8_e5m2"), (x32, "hfp8_fwd"), (x64, "bfloat16"),
             (x32, tfhfp8.DynamicFixedPoint(16)),
             (x32.reshape(512, 512), tfhfp8.DynamicFixedPoint(16, axis=1)),
             (x64.reshape(256, 512), tfhfp8.DynamicFixedPoint(12, axis=0))]
    for x, fmt in cases:
        y = tfhfp8.quantize(tf.constant(x), fmt, rounding="stochastic", seed=1234).numpy()
        print(hashlib.sha256(y.tobytes()).hexdigest())
    print("threads", tf.config.threading.get_intra_op_parallelism_threads())
""")


def _run_thread_script(threads, backend_name):
    root = pathlib.Path(tfhfp8.__file__).resolve().parent.parent
    env = dict(os.environ, TFHFP8_BACKEND=backend_name, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    env.pop("TF_NUM_INTRAOP_THREADS", None)  # threads=0: TensorFlow's own default
    return subprocess.Popen([sys.executable, "-c", _THREAD_SCRIPT, str(threads)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _digests_here(backend_name):
    """Runs the script in this process (default thread count) with a backend."""
    lines = []
    old = os.environ.get("TFHFP8_BACKEND")
    os.environ["TFHFP8_BACKEND"] = backend_name
    try:
        code = _THREAD_SCRIPT.replace("threads = int(sys.argv[1])", "threads = 0")
        code = code.replace("print(", "emit(")
        namespace = {"emit": lambda *args: lines.append(" ".join(map(str, args)))}
        exec(compile(code, "<thread-script>", "exec"), namespace)
    finally:
        if old is None:
            del os.environ["TFHFP8_BACKEND"]
        else:
            os.environ["TFHFP8_BACKEND"] = old
    return lines[:-1]


def test_same_bits_across_thread_counts():
    """The C++ kernels shard over TF's intra-op threads; the counter-based hash makes
    that invisible. Compared: C++ on 1 thread (a separate process: the thread count is
    fixed at start-up), C++ on the default pool here (one thread per core), and the
    single-graph TF backend."""
    proc = _run_thread_script(1, "cpp")
    try:
        here_cpp = _digests_here("cpp")
        here_tf = _digests_here("tf")
    finally:
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    lines = out.strip().splitlines()
    assert lines[-1] == "threads 1"
    one_thread = lines[:-1]
    assert one_thread == here_cpp == here_tf
    assert len(set(here_tf)) == len(here_tf) == 6  # the cases really differ


GOOD_SEEDS = [7, np.int8(7), np.uint16(7), np.int64(7), np.array(7), np.array(7, np.uint8),
              tf.constant(7), tf.constant(7, tf.uint8), tf.constant(7, tf.int16),
              tf.constant(7, tf.uint64), tf.Variable(7, dtype=tf.int64)]


@pytest.mark.parametrize("seed", GOOD_SEEDS, ids=lambda s: type(s).__name__ + str(
    getattr(s, "dtype", "")))
def test_every_integer_seed_type_is_the_same_seed(seed, backend):
    x = tf.constant(np.linspace(-3, 3, 64, dtype=np.float32).reshape(8, 8))
    expected = tfhfp8.quantize(x, "float8_e5m2", rounding="stochastic", seed=7)
    y = tfhfp8.quantize(x, "float8_e5m2", rounding="stochastic", seed=seed)
    np.testing.assert_array_equal(bits_of(y.numpy()), bits_of(expected.numpy()))


NON_SCALAR_SEEDS = [tf.constant([1, 2]), tf.constant([[3]]), np.array([1, 2]),
                    tf.zeros([0], tf.int64), tf.constant([5], tf.uint8)]


@pytest.mark.parametrize("seed", NON_SCALAR_SEEDS, ids=lambda s: str(list(s.shape)))
@pytest.mark.parametrize("function", ["quantize", "quantize_gradient"])
def test_non_scalar_seeds_are_a_value_error(seed, function, backend):
    # A [2] seed used to broadcast against a [4, 2] input on the TF backend.
    x = tf.ones([4, 2])
    with pytest.raises(ValueError, match=r"seed must be a scalar \(shape \[\]\), got shape"):
        getattr(tfhfp8, function)(x, "float8_e5m2", rounding="stochastic", seed=seed)
    with pytest.raises(ValueError, match="seed must be a scalar"):
        tf.function(lambda t: getattr(tfhfp8, function)(
            t, "float8_e5m2", rounding="stochastic", seed=seed))(x)


@pytest.mark.parametrize("seed", [1.0, np.float32(2), True, np.bool_(True), "7", b"7", [1],
                                  (1,), tf.constant(1.0), tf.constant(True),
                                  tf.constant("7"), object()],
                         ids=lambda s: type(s).__name__ + str(getattr(s, "dtype", "")))
@pytest.mark.parametrize("rounding", ["stochastic", "nearest_even"])
def test_non_integer_seeds_are_a_type_error(seed, rounding, backend):
    with pytest.raises(TypeError, match="seed must be"):
        tfhfp8.quantize(tf.ones([4]), "float8_e5m2", rounding=rounding, seed=seed)
    with pytest.raises(TypeError, match="seed must be"):
        tfhfp8.quantize_gradient(tf.ones([4]), "float8_e5m2", rounding=rounding, seed=seed)


def test_a_seed_of_unknown_shape_is_checked_when_the_graph_runs(backend):
    f = tf.function(lambda t, s: tfhfp8.quantize(t, "float8_e5m2", rounding="stochastic",
                                                 seed=s),
                    input_signature=[tf.TensorSpec([4], tf.float32),
                                     tf.TensorSpec(None, tf.int64)])
    x = tf.constant([0.3, 0.7, -1.1, 2.9])
    np.testing.assert_array_equal(
        f(x, tf.constant(7, tf.int64)).numpy(),
        tfhfp8.quantize(x, "float8_e5m2", rounding="stochastic", seed=7).numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[2\] is not compatible "
                                                             r"with expected shape \[\]"):
        f(x, tf.constant([1, 2], tf.int64))
