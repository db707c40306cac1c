"""The C++ kernels of emulated accumulation (Hfp8AccumulatingMatmul, Hfp8Int32Matmul),
bit for bit against an exact sequential reference (accumulate_reference.py), against
apytypes, and across CPU variants; their input validation never crashes."""

import math
import re
import subprocess
import sys
import textwrap
import zlib

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import tfhfp8
from tfhfp8 import Accumulator, FloatFormat
from tfhfp8.ops import cpp_backend

import accumulate_reference as AR
from helpers import assert_same_bits

ROUNDINGS = ("nearest_even", "toward_zero", "stochastic")


def _fp(x, fmt):
    """float32 values of x rounded to the operand format `fmt` (nearest even)."""
    return tfhfp8.quantize(tf.constant(np.asarray(x, np.float32)), fmt).numpy()


def _arguments(acc):
    """The plain kernel arguments of the float accumulator `acc` (or its name)."""
    return tfhfp8.accumulation.get(acc).kernel_arguments()


def _cpp(a, b, acc, seed=0):
    c, swamped = cpp_backend.accumulating_matmul(tf.constant(a[None]), tf.constant(b[None]),
                                                 *_arguments(acc), tf.constant(seed, tf.int64))
    return c.numpy()[0], int(swamped)


def _check(a, b, acc, seed=0, what=""):
    got, got_swamped = _cpp(a, b, acc, seed)
    want, want_swamped = AR.float_matmul(a, b, acc, seed)
    assert_same_bits(got, want, np.zeros_like(want), f"{what} {acc!r}")
    assert got_swamped == want_swamped, (what, got_swamped, want_swamped)
    return got


def _operands(rng, m, k, n, fmt="float8_e4m3fn", scale_a=1.0, scale_b=1.0):
    a = _fp(rng.standard_normal((m, k)) * scale_a, fmt)
    b = _fp(rng.standard_normal((k, n)) * scale_b, fmt)
    return a, b


E5M2 = "float8_e5m2"
NO_SUB = FloatFormat(5, 10, subnormals=False, name="fp16_nosub")
F169 = FloatFormat(6, 9, name="1-6-9")


def _cancellation(rng, m, k, n):
    """Large terms that cancel in pairs, between small ones: the sum is repeatedly
    rebuilt from scratch."""
    a = _fp(rng.standard_normal((m, k)), "float8_e4m3fn")
    big = _fp(rng.choice([-1, 1], (m, k // 2)) * 2.0 ** rng.integers(6, 14, (m, k // 2)),
              "float8_e4m3fn")
    a[:, 0:2 * (k // 2):2] = big
    a[:, 1:2 * (k // 2):2] = -big
    b = np.ones((k, n), np.float32)
    b[1::3] = _fp(rng.uniform(0.5, 2, (len(b[1::3]), n)), "float8_e4m3fn")
    b[0:2 * (k // 2)] = 1.0  # the pairs cancel exactly
    return a, b


# (name, accumulator, operands(rng)) -- every case runs with every rounding.
FLOAT_CASES = [
    ("fp16 random", dict(format="float16"), lambda r: _operands(r, 3, 150, 5)),
    ("fp16 chunk 64, K=300", dict(format="float16", chunk_size=64),
     lambda r: _operands(r, 2, 300, 3)),
    ("bf16 chunk 7 into fp16", dict(format="bfloat16", chunk_size=7, outer_format="float16"),
     lambda r: _operands(r, 2, 50, 3)),
    ("e5m2 overflow to inf", dict(format=E5M2), lambda r: _operands(r, 2, 60, 3, E5M2, 300, 300)),
    ("e5m2 saturate", dict(format=E5M2, saturate=True),
     lambda r: _operands(r, 2, 60, 3, E5M2, 300, 300)),
    ("fnuz accumulator", dict(format="float8_e4m3fnuz"),
     lambda r: _operands(r, 2, 60, 3, "float8_e4m3fn", 4, 4)),
    ("products rounded to e5m2", dict(format="float16", products=E5M2),
     lambda r: _operands(r, 2, 80, 3)),
    ("fp16 subnormal sums", dict(format="float16"),
     lambda r: _operands(r, 2, 80, 3, "float16", 2.0**-13, 2.0**-13)),
    ("bf16 float32-subnormal sums", dict(format="bfloat16"),
     lambda r: _operands(r, 2, 80, 3, FloatFormat(8, 3), 2.0**-68, 2.0**-68)),
    ("no subnormals", dict(format=NO_SUB),
     lambda r: _operands(r, 2, 80, 3, "float16", 2.0**-13, 2.0**-13)),
    ("1-6-9 cancellation", dict(format=F169), lambda r: _cancellation(r, 2, 90, 3)),
    ("fp16 cancellation chunk 10", dict(format="float16", chunk_size=10),
     lambda r: _cancellation(r, 2, 90, 3)),
]


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("name,kwargs,make", FLOAT_CASES, ids=[c[0] for c in FLOAT_CASES])
def test_float_accumulation_matches_the_exact_reference(name, kwargs, make, rounding):
    # zlib.crc32, not hash(): str hashes change per process, and so would the data.
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    a, b = make(rng)
    acc = Accumulator(rounding=rounding, **kwargs)
    c = _check(a, b, acc, seed=11, what=name)
    if "overflow to inf" in name and rounding == "nearest_even":
        assert np.isinf(c).any()  # the case exercises what it says
    if "saturate" in name:
        assert (np.abs(c) == 57344.0).any() and np.isfinite(c).all()


def test_ties_decided_by_the_bits_below_float32():
    """acc + p that float32 rounds onto a tie of the format, while the exact sum is
    just above or below it: one rounding from the exact sum differs from rounding the
    float32 sum (double rounding), and the kernel follows the exact sum."""
    rng = np.random.default_rng(3)
    acc_values = _fp(rng.uniform(1, 1.4, 400), "float16")  # in [1, 2): ulp 2^-10
    # p = midpoint - acc + delta, delta = +-2^-24: in float32 the sum rounds back to the
    # midpoint (ulp 2^-23 there: a tie, to even), the exact sum is off it.
    mid = acc_values.astype(np.float64) + 0.5 + 2.0**-11 + 2.0**-10 * rng.integers(0, 8, 400)
    delta = rng.choice([-1.0, 1.0], 400) * 2.0**-24
    p = (mid - acc_values + delta).astype(np.float32)
    exact_p = p.astype(np.float64) == mid - acc_values + delta
    a = np.stack([acc_values, p], 1)[exact_p]
    b = np.ones((2, 1), np.float32)
    for rounding in ("nearest_even", "toward_zero"):
        acc = Accumulator("float16", rounding=rounding)
        got = _check(a, b, acc, what="ties")[:, 0]
        naive = _fp(a[:, 0] + a[:, 1], "float16") if rounding == "nearest_even" else None
        if naive is not None:  # float32 sum then one rounding: wrong on many of them
            assert (naive != got).sum() > 50, (naive != got).sum()
        assert np.isfinite(got).all()


def test_every_k_from_1_to_10000_and_chunks_that_do_not_divide_it():
    rng = np.random.default_rng(5)
    for k, chunk in [(1, None), (2, 64), (3, 2), (31, None), (64, 64), (65, 64), (1000, 33),
                     (10_000, 64)]:
        a, b = _operands(rng, 1, k, 2)
        _check(a, b, Accumulator("float16", chunk_size=chunk), seed=k, what=f"K={k}")
    a, b = _operands(rng, 1, 10_000, 1)
    c = _check(a, b, Accumulator("float16"), what="K=10000 one chunk")
    c64 = _check(a, b, Accumulator("float16", chunk_size=64), what="K=10000 chunks")
    assert c.shape == c64.shape == (1, 1)


def test_inf_and_nan_terms():
    a = np.array([[1.0, np.inf, 2.0, -np.inf, 1.0], [np.nan, 1.0, 1.0, 1.0, 1.0],
                  [60000.0, 60000.0, -60000.0, 3.0, 0.0]], np.float32)
    b = np.ones((5, 2), np.float32)
    for rounding in ROUNDINGS:
        for saturate in (False, True):
            acc = Accumulator("float16", rounding=rounding, saturate=saturate)
            got = _check(a, b, acc, what="inf/nan")
            assert np.isnan(got[1]).all()  # NaN stays NaN, also when saturating
            assert np.isnan(got[0]).all() != saturate  # inf - inf; saturated: -max


def test_signed_zeros_and_empty_sums():
    a = np.array([[-0.0, -0.0], [-1.0, 1.0], [0.0, -2.0**-30], [1.0, 2.0**-8]], np.float32)
    b = np.ones((2, 1), np.float32)
    got = _check(a, b, Accumulator("float16"), what="zeros")
    # The sum starts at +0, and +0 + -0 is +0; a negative sum that rounds to 0 is -0.
    assert list(np.signbit(got[:, 0])) == [False, False, True, False]
    got = _check(a, b, Accumulator("float8_e4m3fnuz"), what="fnuz zeros")
    assert not np.signbit(got).any()
    # chunk_size >= K: one chunk, so no outer addition (outer_format is not applied).
    acc = Accumulator("float16", chunk_size=5, outer_format=E5M2)
    got = _check(a, b, acc, what="chunk >= K")
    assert got[3, 0] == 1.00390625  # e5m2 would round it to 1
    c, swamped = cpp_backend.accumulating_matmul(tf.zeros([2, 3, 0]), tf.zeros([2, 0, 4]),
                                                 *_arguments("float16"), 0)
    assert c.shape == (2, 3, 4) and not np.any(c.numpy()) and int(swamped) == 0
    c, _ = cpp_backend.accumulating_matmul(tf.zeros([1, 0, 5]), tf.zeros([1, 5, 4]),
                                           *_arguments("float16"), 0)
    assert c.shape == (1, 0, 4)


def test_batches_and_tiles_index_the_random_bits_by_output_element():
    """Several batches, M and N not multiples of the tile: each output's additions use
    index o*K + k with o the flat index over [batch, M, N]."""
    rng = np.random.default_rng(8)
    a = _fp(rng.standard_normal((3, 6, 20)), "float8_e4m3fn")
    b = _fp(rng.standard_normal((3, 20, 35)), "float8_e4m3fn")
    acc = Accumulator("bfloat16", chunk_size=6, rounding="stochastic", products=E5M2)
    # seed + 1 wraps around
    got, swamped = cpp_backend.accumulating_matmul(a, b, *_arguments(acc), 2**63 - 1)
    total = 0
    for batch in range(3):
        want, s = AR.float_matmul(a[batch], b[batch], acc, 2**63 - 1, first_index=batch * 6 * 35)
        assert_same_bits(got.numpy()[batch], want, want, f"batch {batch}")
        total += s
    assert int(swamped) == total


def test_fast_nearest_even_rounding_is_quantize():
    """With K = 1 and b = 1 the kernel returns Q(x) for every float32 x: the fast
    nearest-even rounding of the kernels against quantize's own (any bits)."""
    rng = np.random.default_rng(9)
    bits = np.concatenate([rng.integers(0, 2**32, 60_000, dtype=np.uint64).astype(np.uint32),
                           np.arange(0, 4096, dtype=np.uint32),  # float32 subnormals
                           np.array([0x7F800000, 0x7FC00000, 0x7F7FFFFF, 0x00800000,
                                     0x80000001, 0x477FE000, 0x477FF000], np.uint32)])
    x = bits.view(np.float32)
    x = x[~((x == 0) & np.signbit(x))]  # 0 + (-0) is +0: the sum, not the input
    formats = ["float16", "bfloat16", "float8_e4m3fn", E5M2, "float8_e4m3fnuz", NO_SUB,
               F169, FloatFormat(3, 4, bias=5, specials="finite"), FloatFormat(8, 21),
               FloatFormat(2, 1, specials="fn")]
    for fmt in formats:
        for saturate in (False, True):
            acc = Accumulator(fmt, saturate=saturate)
            c, _ = cpp_backend.accumulating_matmul(
                x[None, :, None], np.ones([1, 1, 1], np.float32), *_arguments(acc), 0)
            want = tfhfp8.quantize(tf.constant(x), fmt, saturate=saturate).numpy()
            assert_same_bits(c.numpy()[0, :, 0], want, x, f"{fmt} saturate={saturate}")


# -- apytypes ------------------------------------------------------------------------

def _apy_matmul(a, b, exp_bits, man_bits):
    apy = pytest.importorskip("apytypes")
    # The operands are exact in apytypes' (4, 3) format (IEEE-like, bias 7).
    A = apy.APyFloatArray.from_float(a.astype(np.float64), 4, 3)
    B = apy.APyFloatArray.from_float(b.astype(np.float64), 4, 3)
    with apy.APyFloatAccumulatorContext(exp_bits=exp_bits, man_bits=man_bits):
        return np.asarray((A @ B).to_numpy(), np.float64)


@pytest.mark.parametrize("fmt,exp_bits,man_bits", [("float16", 5, 10), ("bfloat16", 8, 7),
                                                     (F169, 6, 9)])
def test_agrees_with_apytypes(fmt, exp_bits, man_bits):
    rng = np.random.default_rng(13)
    a, b = _operands(rng, 4, 300, 6, FloatFormat(4, 3))
    got, _ = _cpp(a, b, Accumulator(fmt))
    want = _apy_matmul(a, b, exp_bits, man_bits)
    assert np.array_equal(got.astype(np.float64), want), np.flatnonzero(got != want)[:10]
    # Chunks of 64: apytypes sums each chunk, then the chunk results, in order.
    got, _ = _cpp(a, b, Accumulator(fmt, chunk_size=64))
    parts = [_apy_matmul(a[:, i:i + 64], b[i:i + 64], exp_bits, man_bits)
             for i in range(0, 300, 64)]
    apy = pytest.importorskip("apytypes")
    partial = apy.APyFloatArray.from_float(np.stack(parts, -1), exp_bits, man_bits)
    ones = apy.APyFloatArray.from_float(np.ones((len(parts), 1)), exp_bits, man_bits)
    with apy.APyFloatAccumulatorContext(exp_bits=exp_bits, man_bits=man_bits):
        want = np.stack([np.asarray((partial[i] @ ones).to_numpy())[:, 0]
                         for i in range(4)])
    assert np.array_equal(got.astype(np.float64), want)


# -- INT32 ---------------------------------------------------------------------------

def _int_operands(rng, m, k, n, high):
    return (rng.integers(-high, high + 1, (m, k)).astype(np.int32),
            rng.integers(-high, high + 1, (k, n)).astype(np.int32))


INT_CASES = [
    ("no overflow", 5, 3000, 40, 3000),
    ("full-scale int16", 5, 3000, 40, 32767),
    ("beyond int16", 3, 200, 33, 2**20),
    ("products beyond int32", 2, 50, 3, 2**31 - 1),
    ("odd K", 4, 1, 7, 32767),
]


@pytest.mark.parametrize("overflow", ["wrap", "saturate"])
@pytest.mark.parametrize("chunk", [None, 7, 64])
@pytest.mark.parametrize("name,m,k,n,high", INT_CASES, ids=[c[0] for c in INT_CASES])
def test_int32_matches_exact_integer_arithmetic(name, m, k, n, high, chunk, overflow):
    rng = np.random.default_rng(m * k + n)
    a, b = _int_operands(rng, m, k, n, high)
    if name == "full-scale int16":
        a[0, ::2] = -32768  # outside the pairs' range: that tile takes the exact path
    c, count = cpp_backend.int32_matmul(a[None], b[None], chunk, overflow)
    want, want_count = AR.int32_matmul(a, b, chunk, overflow)
    assert_same_bits(c.numpy()[0], want, want, f"{name} chunk={chunk} {overflow}")
    assert int(count) == want_count
    if name == "full-scale int16" and chunk is None:
        assert want_count > 0
    if name == "no overflow":
        assert want_count == 0


def test_int32_pairs_near_the_overflow_bound():
    """Sums primed just below 2^31 that cross it between the two terms of a pair and
    come back (two overflows, or clamps, where the pair's sum alone shows none)."""
    k = 66
    a = np.full((4, k), 32767, np.int32)
    a[2, 3::4] = -32767
    a[3, 2::2] = rng_signs = np.where(np.arange(32) % 3 == 0, -32767, 32767)
    b = np.full((k, 35), 32767, np.int32)
    b[2::2, :] = -32767  # rows 0, 2, 3: +p then -p after the two priming terms
    b[:, 5] = 32767  # column 5: a steady climb
    assert rng_signs.size == 32
    for chunk in (None, 20):
        for overflow in ("wrap", "saturate"):
            c, count = cpp_backend.int32_matmul(a[None], b[None], chunk, overflow)
            want, want_count = AR.int32_matmul(a, b, chunk, overflow)
            assert_same_bits(c.numpy()[0], want, want, f"{overflow} chunk={chunk}")
            assert int(count) == want_count and want_count > 0


# -- CPU variants --------------------------------------------------------------------

def test_every_cpu_variant_gives_the_same_bits(monkeypatch):
    rng = np.random.default_rng(21)
    a, b = _operands(rng, 5, 130, 37)
    ia, ib = _int_operands(rng, 5, 700, 37, 32767)
    cases = [Accumulator("float16"), Accumulator("float16", chunk_size=64, rounding="toward_zero"),
             Accumulator("bfloat16", rounding="stochastic", products=E5M2, chunk_size=9),
             Accumulator(F169, saturate=True)]

    def run():
        out = [_cpp(a, b, acc, seed=4) for acc in cases]
        for chunk, overflow in [(None, "wrap"), (64, "saturate")]:
            c, n = cpp_backend.int32_matmul(ia[None], ib[None], chunk, overflow)
            out.append((c.numpy()[0], int(n)))
        return out

    monkeypatch.setenv("TFHFP8_CPU_VARIANT", "baseline")
    expected = run()
    for acc, (c, swamped) in zip(cases, expected):  # baseline against the reference
        want, want_swamped = AR.float_matmul(a, b, acc, 4)
        assert_same_bits(c, want, want, f"baseline {acc!r}")
        assert swamped == want_swamped
    for variant in tfhfp8.ops.backend_info()["cpu_variants_supported"]:
        monkeypatch.setenv("TFHFP8_CPU_VARIANT", variant)
        assert tfhfp8.ops.backend_info()["cpu_variant"] == variant
        for (c, n), (want, want_n) in zip(run(), expected):
            assert_same_bits(c, want, want, variant)
            assert n == want_n, variant


# -- validation ----------------------------------------------------------------------

FORMAT = ("exponent_bits=5, mantissa_bits=10, bias=15, specials='ieee', subnormals=True, "
          "outer_exponent_bits=5, outer_mantissa_bits=10, outer_bias=15, outer_specials='ieee',"
          " outer_subnormals=True, products_exponent_bits=5, products_mantissa_bits=2, "
          "products_bias=15, products_specials='ieee', products_subnormals=True, "
          "has_products=False, rounding='nearest_even', saturate=False")


def _float_op(a, b, seed="seed", **attrs):
    base = dict(re.findall(r"(\w+)=('[^']*'|\w+)", FORMAT))
    base.update({key: repr(value) for key, value in attrs.items()})
    base.setdefault("chunk_size", "0")
    return (f"lib.hfp8_accumulating_matmul({a}, {b}, {seed}, "
            + ", ".join(f"{k}={v}" for k, v in base.items()) + ")")


BAD_CALLS = [
    ("K mismatch", _float_op("tf.ones([1, 2, 3])", "tf.ones([1, 4, 2])"),
     r"a's K \(dimension 2\) must equal b's K|Dimensions must be equal"),
    ("batch mismatch", _float_op("tf.ones([2, 2, 3])", "tf.ones([3, 3, 2])"),
     "same batch size|Dimensions must be equal"),
    ("rank 2", _float_op("tf.ones([2, 3])", "tf.ones([1, 3, 2])"), "rank 3|must be rank 3"),
    ("seed vector", _float_op("tf.ones([1, 2, 3])", "tf.ones([1, 3, 2])",
                              seed="tf.constant([1, 2], tf.int64)"), "scalar|rank 0"),
    ("chunk negative", _float_op("tf.ones([1, 2, 3])", "tf.ones([1, 3, 2])", chunk_size=-1),
     r"chunk_size must be >= 0"),
    ("accumulator too wide", _float_op("tf.ones([1, 2, 3])", "tf.ones([1, 3, 2])",
                                       mantissa_bits=22, bias=127, exponent_bits=8),
     r"mantissa_bits must be in \[0, 21\]"),
    ("outer bias", _float_op("tf.ones([1, 2, 3])", "tf.ones([1, 3, 2])", outer_bias=500),
     r"outer_bias must be in \[-\d+, 127\], got 500"),
    ("no normals", _float_op("tf.ones([1, 2, 3])", "tf.ones([1, 3, 2])",
                             products_exponent_bits=1, products_specials="fn",
                             products_mantissa_bits=0), "has no normal numbers"),
    ("int32 K mismatch", "lib.hfp8_int32_matmul(tf.ones([1, 2, 3], tf.int32), "
     "tf.ones([1, 2, 2], tf.int32), chunk_size=0, overflow='wrap')",
     r"must equal b's K|Dimensions must be equal"),
    ("int32 chunk negative", "lib.hfp8_int32_matmul(tf.ones([1, 2, 3], tf.int32), "
     "tf.ones([1, 3, 2], tf.int32), chunk_size=-5, overflow='wrap')",
     r"chunk_size must be >= 0"),
    ("int32 rank 4", "lib.hfp8_int32_matmul(tf.ones([1, 1, 2, 3], tf.int32), "
     "tf.ones([1, 3, 2], tf.int32), chunk_size=0, overflow='saturate')", "rank 3"),
]


@pytest.fixture(scope="module")
def bad_call_results():
    """Every call of BAD_CALLS, eagerly and in a graph, in one subprocess (a crash fails
    the calls it reached instead of killing pytest)."""
    probes = "\n".join(f"    ({name!r}, lambda: {call})," for name, call, _ in BAD_CALLS)
    code = textwrap.dedent("""
        import tensorflow as tf
        from tfhfp8.ops import cpp_backend
        lib, seed = cpp_backend.load(), tf.constant(0, tf.int64)
        probes = [
        {probes}
        ]
        for name, run in probes:
            for mode in ("eager", "graph"):
                print("START", mode, name, flush=True)
                try:
                    tf.function(run)() if mode == "graph" else run()
                except (tf.errors.InvalidArgumentError, ValueError) as error:
                    print("ERROR", mode, name, "|", str(error).replace(chr(10), " "), flush=True)
                else:
                    print("NO ERROR", mode, name, flush=True)
        """).replace("{probes}", probes)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize("name,call,message", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_bad_inputs_are_clear_errors(name, call, message, mode, bad_call_results):
    lines = bad_call_results.stdout.splitlines()
    assert f"START {mode} {name}" in lines, bad_call_results.stderr[-2000:]
    outcome = lines[lines.index(f"START {mode} {name}") + 1:][:1]
    assert outcome, f"the process died on this call ({bad_call_results.returncode})"
    assert outcome[0].startswith(f"ERROR {mode} {name} |"), outcome[0]
    assert re.search(message, outcome[0]), outcome[0]


def test_wrappers_reject_other_accumulators():
    with pytest.raises(ValueError, match="fmt must be a FloatFormat"):
        cpp_backend.accumulating_matmul(tf.ones([1, 2, 2]), tf.ones([1, 2, 2]), "int32", None,
                                        None, "nearest_even", False, None, 0)
    with pytest.raises(ValueError, match="not a float accumulator"):
        tfhfp8.accumulation.get("int32").kernel_arguments()
    assert math.isfinite(float(ml_dtypes.finfo(ml_dtypes.bfloat16).max))


# -- the two backends ----------------------------------------------------------------

def test_cpp_and_tf_ops_backends_agree_bit_for_bit():
    """The C++ kernels and the TF-ops implementation (tf_accumulate, under XLA as
    tfhfp8.matmul runs it): same bits, same swamping and overflow counts, stochastic
    included."""
    from tfhfp8.ops import tf_accumulate

    rng = np.random.default_rng(17)
    a = _fp(rng.standard_normal((2, 5, 150)) * 8, "float8_e4m3fn")
    b = _fp(rng.standard_normal((2, 150, 35)) * 8, "float8_e4m3fn")
    a[0, 0, :4] = [np.inf, 1.0, -np.inf, np.nan]
    a[1, 1, :] = 0.0
    a[1, 2, 1::2] = -a[1, 2, ::2]  # cancellation
    for acc in [Accumulator("float16"), Accumulator("float16", chunk_size=64),
                Accumulator("bfloat16", rounding="stochastic", chunk_size=9,
                            outer_format="float16"),
                Accumulator(E5M2, rounding="toward_zero", saturate=True),
                Accumulator("float16", rounding="stochastic", products=E5M2),
                Accumulator("float8_e4m3fnuz", chunk_size=150)]:
        fn = tf.function(
            lambda x, y, seed: tf_accumulate.accumulating_matmul(x, y, *_arguments(acc), seed),
            jit_compile=True, autograph=False)
        for seed in (0, -3):
            c, swamped = cpp_backend.accumulating_matmul(a, b, *_arguments(acc), seed)
            c_tf, swamped_tf = fn(tf.constant(a), tf.constant(b), tf.constant(seed, tf.int64))
            assert_same_bits(c.numpy(), c_tf.numpy(), c_tf.numpy(), f"{acc!r} seed {seed}")
            assert int(swamped) == int(swamped_tf), acc
    ia, ib = _int_operands(rng, 3, 400, 35, 32767)
    for chunk, overflow in [(None, "wrap"), (64, "saturate")]:
        c, n = cpp_backend.int32_matmul(ia[None], ib[None], chunk, overflow)
        fn = tf.function(lambda x, y: tf_accumulate.int32_matmul(x, y, chunk, overflow),
                         jit_compile=True, autograph=False)
        c_tf, n_tf = fn(tf.constant(ia[None]), tf.constant(ib[None]))
        assert_same_bits(c.numpy(), c_tf.numpy(), c_tf.numpy(), f"int32 {chunk} {overflow}")
        assert int(n) == int(n_tf) and int(n) > 0


def test_contract_edge_cases_on_both_backends():
    """A finite bfloat16 sum beyond float32's range rounds from +-FLT_MAX (toward zero:
    the format's max, stochastic: max or inf); chunk_size >= K is one chunk, with no
    outer addition (-0 stays -0, the outer format is not applied)."""
    from tfhfp8.ops import tf_accumulate

    big = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
    a = np.array([[[big, big, 0.0], [-big, -big, 0.0], [0.0, 0.0, -2.0**-30],
                   [1.0, 2.0**-8, 0.0]]], np.float32)
    b = np.ones((1, 3, 2), np.float32)
    cases = [(Accumulator("bfloat16", rounding="toward_zero"), None),
             (Accumulator("bfloat16", rounding="stochastic"), None),
             (Accumulator("bfloat16", rounding="nearest_even"), None),
             (Accumulator("float16", chunk_size=3, outer_format=E5M2), 3)]
    for acc, _ in cases:
        c, _ = cpp_backend.accumulating_matmul(a, b, *_arguments(acc), 7)
        want, _ = AR.float_matmul(a[0], b[0], acc, 7)
        assert_same_bits(c.numpy()[0], want, want, f"reference {acc!r}")
        c_tf, _ = tf.function(lambda x, y: tf_accumulate.accumulating_matmul(
            x, y, *_arguments(acc), tf.constant(7, tf.int64)), jit_compile=True,
            autograph=False)(a, b)
        assert_same_bits(c.numpy(), c_tf.numpy(), c_tf.numpy(), f"tf-ops {acc!r}")
    c, _ = cpp_backend.accumulating_matmul(a, b, *_arguments(cases[0][0]), 0)
    assert c.numpy()[0, 0, 0] == big and c.numpy()[0, 1, 0] == -big  # toward zero: max
    c, _ = cpp_backend.accumulating_matmul(a, b, *_arguments(cases[3][0]), 0)
    assert np.signbit(c.numpy()[0, 2, 0]) and c.numpy()[0, 3, 0] == 1.00390625
