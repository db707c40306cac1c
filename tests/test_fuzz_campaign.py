"""A seeded random campaign over what the hand-written probes (test_fuzz.py,
test_probes.py) do not reach: random shapes, dtypes, formats, roundings and backends for
`quantize`, random block formats (eager, XLA and C++), per-tensor scaling at every
magnitude, `matmul` with random accumulators against the exact references, random
policy arguments and random command-line flags.

Each test draws `TFHFP8_FUZZ_CASES` cases (default: a CI-sized handful, the whole file
in well under a minute) from `TFHFP8_FUZZ_SEED` (default 0); a failure names its case.
The long campaign:

    TFHFP8_FUZZ_CASES=2000 TFHFP8_FUZZ_SEED=1 .venv/bin/python -m pytest \\
        tests/test_fuzz_campaign.py -p no:randomly -x

Oracles: the two backends (and XLA) agree bit for bit; ml_dtypes' casts for the named
formats; tests/accumulate_reference.py (exact rationals) for float accumulators;
float64 products for the INT32 accumulator (exact when no sum overflows); the numpy
reference of per-tensor scaling (helpers.current_scaling_reference); and, for bad
arguments, a ValueError or TypeError of a few words, never another exception.
"""

import os

import accumulate_reference
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from helpers import FLOAT_NAMES, bits_of, current_scaling_reference, ml_cast

import tfhfp8
from tfhfp8 import formats

SEED = int(os.environ.get("TFHFP8_FUZZ_SEED", "0"))
LONG = int(os.environ.get("TFHFP8_FUZZ_CASES", "0"))


def _cases(ci_cases):
    """(case index, its generator) for each case of a test."""
    for i in range(LONG or ci_cases):
        yield i, np.random.default_rng([SEED, i, ci_cases])


def _run_on(backend, function, monkeypatch):
    monkeypatch.setenv("TFHFP8_BACKEND", backend)
    try:
        return ("ok", function())
    except (ValueError, TypeError) as error:
        assert len(str(error).split()) >= 3, repr(error)
        return ("error", type(error))


def _values(rng, shape, dtype):
    """Random signs and magnitudes over float32's range and beyond (subnormals, huge),
    with zeros, infinities and NaN sprinkled in."""
    size = int(np.prod(shape))
    exponents = rng.integers(-155, 131, size=size)
    x = rng.uniform(1, 2, size) * np.exp2(exponents.astype(np.float64))
    x *= rng.choice([-1.0, 1.0], size)
    special = rng.random(size) < 0.05
    x[special] = rng.choice([0.0, -0.0, np.inf, -np.inf, np.nan], special.sum())
    with np.errstate(over="ignore"):
        return x.astype(dtype).reshape(shape)


def _shape(rng, max_rank=4, max_dim=7):
    return tuple(int(d) for d in rng.integers(0, max_dim + 1, size=rng.integers(0, max_rank + 1)))


def _random_float_format(rng):
    if rng.random() < 0.5:
        return formats.get(str(rng.choice(FLOAT_NAMES)))
    e, m = int(rng.integers(2, 9)), int(rng.integers(0, 11))
    default = 2 ** (e - 1) - 1
    try:
        return tfhfp8.FloatFormat(e, m, bias=int(default + rng.integers(-3, 4)),
                                  specials=str(rng.choice(["ieee", "fn", "fnuz", "finite"])),
                                  subnormals=bool(rng.random() < 0.8))
    except ValueError:  # a combination the format rejects (clearly: test_fuzz.py)
        return tfhfp8.FloatFormat(e, m)


# -- quantize ----------------------------------------------------------------------------
def test_random_float_formats_agree_on_both_backends_and_with_ml_dtypes(monkeypatch):
    for i, rng in _cases(40):
        fmt = _random_float_format(rng)
        dtype = str(rng.choice(["float16", "bfloat16", "float32", "float64"]))
        x = _values(rng, _shape(rng), np.float32 if dtype == "bfloat16" else dtype)
        x = tf.cast(tf.constant(x), dtype)
        kwargs = dict(rounding=str(rng.choice(["nearest_even", "toward_zero", "stochastic"])),
                      saturate=bool(rng.random() < 0.5), seed=int(rng.integers(0, 2**62)))
        case = f"case {i}: {fmt!r} {dtype} {x.shape} {kwargs}"
        results = [_run_on(b, lambda: tfhfp8.quantize(x, fmt, **kwargs), monkeypatch)
                   for b in ("tf", "cpp")]
        assert results[0][0] == results[1][0], case
        if results[0][0] == "error":
            assert results[0][1] is results[1][1], case
            continue
        (_, tf_y), (_, cpp_y) = results
        assert tf_y.dtype == x.dtype and tf_y.shape == x.shape, case
        np.testing.assert_array_equal(bits_of(tf_y.numpy()), bits_of(cpp_y.numpy()), case)
        if (fmt.name in FLOAT_NAMES and dtype == "float32" and not kwargs["saturate"]
                and kwargs["rounding"] == "nearest_even"):
            expected = ml_cast(x.numpy(), fmt.name)
            got = tf_y.numpy()
            same = (bits_of(got) == bits_of(expected)) | (np.isnan(got) & np.isnan(expected))
            assert same.all(), case
        if kwargs["rounding"] == "toward_zero":
            finite = np.isfinite(tf_y.numpy().astype(np.float64)) & ~np.isnan(
                x.numpy().astype(np.float64))  # a NaN of a format without NaN: finite
            assert (np.abs(tf_y.numpy().astype(np.float64))[finite]
                    <= np.abs(x.numpy().astype(np.float64))[finite]).all(), case


_BLOCK_NAMES = [n for n in formats.names() if isinstance(formats.get(n), tfhfp8.BlockScaled)]


def _random_block_format(rng, rank):
    if rng.random() < 0.4:
        return formats.get(str(rng.choice(_BLOCK_NAMES)))
    element = str(rng.choice(["float8_e4m3fn", "float8_e5m2", "float6_e3m2fn",
                              "float6_e2m3fn", "float4_e2m1fn", "int8"]))
    axis = int(rng.integers(-rank, rank)) if rank else -1
    block_size = int(rng.integers(1, 40))
    if rng.random() < 0.5:
        return tfhfp8.BlockScaled(element, block_size, axis=axis,
                                  scale_rounding=str(rng.choice(["floor", "ceil"])))
    if element == "int8":
        element = "float4_e2m1fn"
    return tfhfp8.BlockScaled(element, block_size, scale="float8_e4m3fn", axis=axis,
                              tensor_scale=bool(rng.random() < 0.5),
                              scale_rounding=str(rng.choice(["nearest_even", "floor"])))


def test_random_block_formats_agree_eagerly_under_xla_and_in_cpp(monkeypatch):
    for i, rng in _cases(12):
        shape = _shape(rng, max_rank=3, max_dim=40)
        fmt = _random_block_format(rng, len(shape))
        x = tf.constant(_values(rng, shape, np.float32))
        finite = np.isfinite(x.numpy()).all()
        kwargs = dict(rounding=str(rng.choice(["nearest_even", "toward_zero", "stochastic"])),
                      saturate=bool(rng.random() < 0.5), seed=int(rng.integers(0, 2**62)))
        if rng.random() < 0.5:  # ordinary magnitudes as well as the extremes
            x = tf.constant(np.nan_to_num(x.numpy() * 0 + rng.normal(size=shape) * 10,
                                          nan=0.0).astype(np.float32))
            finite = True
        case = f"case {i}: {fmt!r} {shape} {kwargs}"

        def eager():
            return tfhfp8.quantize(x, fmt, **kwargs)

        def compiled():
            return tf.function(eager, jit_compile=True)()

        results = [_run_on("tf", eager, monkeypatch), _run_on("cpp", eager, monkeypatch)]
        if i % 4 == 0:  # an XLA compilation per case costs seconds
            results.append(_run_on("tf", compiled, monkeypatch))
        kinds = {r[0] for r in results}
        assert len(kinds) == 1, (case, results)
        if kinds == {"error"}:
            continue
        first = results[0][1].numpy()
        for _, y in results[1:]:
            np.testing.assert_array_equal(bits_of(y.numpy()), bits_of(first), case)
        if finite:
            assert not np.isnan(first).any(), case


@pytest.mark.parametrize("name, element, maximum", [
    ("e4m3_current", ml_dtypes.float8_e4m3fn, 448.0),
    ("e5m2_current", ml_dtypes.float8_e5m2, 57344.0)])
def test_per_tensor_scaling_at_every_magnitude_matches_the_reference(monkeypatch, name,
                                                                      element, maximum):
    base = formats.get(name)
    for i, rng in _cases(12):
        margin = int(rng.choice([0, 0, 1, 5, 64]))
        fmt = tfhfp8.BlockScaled(base.element, None, scale="float32", margin=margin)
        shape = _shape(rng, max_rank=3, max_dim=9)
        top = float(rng.uniform(-149, 128))
        spread = float(rng.uniform(0, 40))
        size = int(np.prod(shape))
        x = (rng.choice([-1.0, 1.0], size) * np.exp2(top - rng.uniform(0, spread, size)))
        with np.errstate(over="ignore"):
            x = x.astype(np.float32).reshape(shape)
        x[~np.isfinite(x)] = np.float32(3e38)
        expected = current_scaling_reference(x, element, maximum, margin)
        for backend in ("tf", "cpp"):
            monkeypatch.setenv("TFHFP8_BACKEND", backend)
            y = tfhfp8.quantize(x, fmt).numpy()
            case = f"case {i}: {name} margin {margin} 2^{top:.1f} spread {spread:.1f} {backend}"
            assert not np.isnan(y).any(), case
            np.testing.assert_array_equal(bits_of(y), bits_of(expected), case)


# -- matmul with accumulators ------------------------------------------------------------------
def _random_accumulator(rng, k):
    fmt = rng.choice(["float16", "bfloat16", "e5m7", "e4m10"])
    fmt = {"e5m7": tfhfp8.FloatFormat(5, 7), "e4m10": tfhfp8.FloatFormat(4, 10)}.get(fmt, fmt)
    chunk = None if rng.random() < 0.3 else int(rng.integers(1, k + 4))
    return tfhfp8.Accumulator(fmt, chunk_size=chunk,
                              rounding=str(rng.choice(["nearest_even", "toward_zero"])),
                              saturate=bool(rng.random() < 0.5))


def _operand(rng, shape):
    return (rng.normal(size=shape) * np.exp2(rng.integers(-6, 7, size=shape))).astype(
        np.float32)


def test_matmul_with_random_float_accumulators_matches_the_exact_reference(monkeypatch):
    for i, rng in _cases(8):
        m, k, n = (int(v) for v in rng.integers([0, 0, 0], [4, 20, 4]))
        acc = _random_accumulator(rng, k)
        operand = str(rng.choice(["float8_e4m3", "float8_e5m2"]))
        transpose_a, transpose_b = (bool(v) for v in rng.random(2) < 0.5)
        a, b = _operand(rng, (m, k)), _operand(rng, (k, n))
        a_in = a.T.copy() if transpose_a else a
        b_in = b.T.copy() if transpose_b else b
        case = f"case {i}: {m}x{k}x{n} {acc!r} {operand} transposes {transpose_a, transpose_b}"
        results = []
        for backend in ("tf", "cpp"):
            monkeypatch.setenv("TFHFP8_BACKEND", backend)
            results.append(tfhfp8.matmul(a_in, b_in, acc, transpose_a=transpose_a,
                                         transpose_b=transpose_b, a_format=operand,
                                         b_format=operand).numpy())
        np.testing.assert_array_equal(bits_of(results[0]), bits_of(results[1]), case)
        qa = tfhfp8.quantize(a, operand, saturate=True).numpy()
        qb = tfhfp8.quantize(b, operand, saturate=True).numpy()
        expected, _ = accumulate_reference.float_matmul(qa, qb, acc)
        expected = np.asarray(expected, np.float32).reshape(m, n)
        np.testing.assert_array_equal(bits_of(results[0]), bits_of(expected), case)


def test_matmul_with_the_int32_accumulator_is_the_exact_product(monkeypatch):
    for i, rng in _cases(8):
        batch = tuple(int(v) for v in rng.integers(1, 3, size=rng.integers(0, 2)))
        m, k, n = (int(v) for v in rng.integers([0, 0, 0], [5, 60, 5]))
        bits = int(rng.integers(2, 9))
        fmt = tfhfp8.DynamicFixedPoint(bits)
        chunk = None if rng.random() < 0.5 else int(rng.integers(1, k + 3))
        acc = tfhfp8.Accumulator("int32", chunk_size=chunk)
        a, b = _operand(rng, batch + (m, k)), _operand(rng, batch + (k, n))
        case = f"case {i}: {batch} {m}x{k}x{n} {fmt!r} chunk {chunk}"
        results = []
        for backend in ("tf", "cpp"):
            monkeypatch.setenv("TFHFP8_BACKEND", backend)
            results.append(tfhfp8.matmul(a, b, acc, a_format=fmt, b_format=fmt).numpy())
        np.testing.assert_array_equal(bits_of(results[0]), bits_of(results[1]), case)
        qa = tfhfp8.quantize(a, fmt, saturate=True).numpy().astype(np.float64)
        qb = tfhfp8.quantize(b, fmt, saturate=True).numpy().astype(np.float64)
        # |mantissas| < 2^8 and K < 60: every sum fits 24 bits, exact in float32.
        expected = np.matmul(qa, qb).astype(np.float32) + np.float32(0)  # -0 -> +0
        np.testing.assert_array_equal(results[0] + np.float32(0), expected, case)


# -- policies and the command line -------------------------------------------------------------
_ROLE_VALUES = [None, "float32", "float8_e5m2", "hfp8_fwd", "int16_dfp", "mxfp8_e4m3",
                "e4m3_delayed", "nvfp4", "bfloat16", "float9", "", 3, 2.5, [], {"x": 1},
                tfhfp8.FloatFormat(3, 2), tfhfp8.DynamicFixedPoint(12, axis=0)]
_ROLES = ("weights", "activations", "errors", "weight_gradients", "master_weights",
          "optimizer_states")
_OTHER_ARGUMENTS = {
    "rounding": ["stochastic", "nearest_even", "kahan", "up", {"errors": "stochastic"},
                 {"bias": "stochastic"}, 3],
    "saturate": [True, False, 1, "yes"],
    "exempt_first_last": [True, False, "no"],
    "accumulation": [None, "float16", "float16_chunk64", "int32", "float32", "float7",
                     {"forward": "float16"}, {"sideways": "float16"}, 5],
    "loss_scaling": [None, "adaptive", "absmax", "sometimes", 3],
}


def test_random_policy_arguments_are_valid_or_clear_errors():
    for i, rng in _cases(60):
        kwargs = {}
        for role in rng.choice(_ROLES, size=rng.integers(0, 4), replace=False):
            kwargs[str(role)] = _ROLE_VALUES[rng.integers(len(_ROLE_VALUES))]
        for name in rng.choice(list(_OTHER_ARGUMENTS), size=rng.integers(0, 3),
                               replace=False):
            values = _OTHER_ARGUMENTS[str(name)]
            kwargs[str(name)] = values[rng.integers(len(values))]
        preset = str(rng.choice(tfhfp8.policy.presets() + ["custom"]))
        case = f"case {i}: Policy({preset!r}, **{kwargs})"
        try:
            policy = tfhfp8.Policy(preset, **kwargs)
        except (ValueError, TypeError) as error:
            assert len(str(error).split()) >= 3, (case, error)
            continue
        except NotImplementedError as error:  # documented for combinations not emulated
            assert len(str(error).split()) >= 3, (case, error)
            continue
        again = tfhfp8.policy.get(tfhfp8.policy.serialize(policy))
        assert again == policy, case


def _cli_flags():
    from tfhfp8 import cli  # noqa: F401 (defines the flags)

    return sorted(flags.FLAGS.flags_by_module_dict()["tfhfp8.cli"], key=lambda f: f.name)


_FLAG_VALUES = ["", "0", "-1", "3", "64", "2.5", "abc", "nan", "inf", "1e309", "float32",
                "hfp8", "float32,hfp9", "digits", "x.keras", "out.h5", "float8_e5m2",
                "cosine", "adaptive", "true"]


def test_random_command_line_flags_parse_or_name_the_flag():
    names = [flag.name for flag in _cli_flags()]
    try:
        for i, rng in _cases(80):
            args = []
            for name in rng.choice(names, size=rng.integers(1, 4), replace=False):
                args.append(f"--{name}={_FLAG_VALUES[rng.integers(len(_FLAG_VALUES))]}")
            case = f"case {i}: tfhfp8 train {' '.join(args)}"
            flags.FLAGS.unparse_flags()
            try:
                flags.FLAGS(["tfhfp8", "train", *args])
            except flags.Error as error:
                named = [a.split("=")[0][2:] for a in args]
                assert any(name in str(error) for name in named), (case, str(error))
    finally:
        flags.FLAGS.unparse_flags()
