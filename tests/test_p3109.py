"""IEEE P3109 formats, every rounding direction and few-bit stochastic rounding, bit for
bit against gfloat (Graphcore's reference implementation of P3109 rounding), through
`tfhfp8.quantize` on both backends, under XLA, with `noise=` and with seeded draws.

Inputs (p3109_reference.py): every value of the format (a sample of bfloat16's), every
midpoint and its float32 neighbours, fractions of a few gaps, random values, values below
the smallest subnormal and above max, +-0, +-inf and NaN; for the r-bit roundings also
inputs placed at the threshold of their own random bits (the r-bit fraction of the gap,
plus the bits, just reaching 2^r).
"""

import json
import math

import gfloat
import gfloat.formats as gf
import keras
import numpy as np
import p3109_reference as ref
import pytest
import tensorflow as tf
from helpers import assert_same_bits

import tfhfp8
from tfhfp8 import formats
from tfhfp8.formats import roundings

# The 8-bit formats gfloat lists (p3109_k8p1ue is not a tfhfp8 format: its smallest
# normal, 2^-127, is no float32 normal), a few narrower ones, and formats outside P3109.
P3109_8BIT = [info.name for info in gf.p3109_binary8_formats if info.name in formats.names()]
NARROW = ["p3109_k3p1se", "p3109_k3p2sf", "p3109_k4p2se", "p3109_k4p4uf", "p3109_k5p3ue",
          "p3109_k6p4sf"]
FORMAT_NAMES = P3109_8BIT + NARROW + list(ref.OTHERS)
RANDOM_BITS = (1, 2, 4, 8, 16, 23)
R_ROUNDINGS = [f"{variant}_r{r}" for variant in roundings.STOCHASTIC_VARIANTS
               for r in RANDOM_BITS]


def r_bit_cases():
    """(format, rounding, overflow): every pair with one overflow each, turning through
    the three so that each format and each rounding meets all of them (the full cross
    product would triple the run time; the directed roundings get it)."""
    return [pytest.param(name, rounding, roundings.OVERFLOWS[(i + j) % 3],
                         id=f"{name}-{rounding}-{roundings.OVERFLOWS[(i + j) % 3]}")
            for i, name in enumerate(FORMAT_NAMES) for j, rounding in enumerate(R_ROUNDINGS)]


# -- bit for bit ----------------------------------------------------------------------
@pytest.fixture(params=["tf", "cpp"])
def on_backend(request):
    """Runs the test body with tfhfp8.quantize forced onto one backend."""
    with tfhfp8.ops.forced_backend(request.param):
        yield request.param


@pytest.mark.arithmetic
@pytest.mark.parametrize("overflow", roundings.OVERFLOWS)
@pytest.mark.parametrize("rounding", roundings.DIRECTED)
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_directed_roundings_match_gfloat(on_backend, name, rounding, overflow):
    x = ref.signed_inputs(name)
    got = tfhfp8.quantize(x, name, rounding=rounding, saturate=overflow).numpy()
    assert_same_bits(got, ref.expected(name, x, rounding, overflow), x,
                     f"{name} {rounding} {overflow} ({on_backend})")


@pytest.mark.arithmetic
@pytest.mark.parametrize("name, rounding, overflow", r_bit_cases())
def test_r_bit_roundings_with_noise_match_gfloat(name, rounding, overflow):
    # noise= always rounds with the TF-ops backend: one backend to test.
    r = roundings.parse(rounding).random_bits
    rng = np.random.default_rng(ref.seed_of(name, rounding))
    x, bits = ref.r_bit_inputs(name, rounding, lambda n: rng.integers(0, 2 ** r, n))
    dtype = np.uint8 if r <= 8 else np.int32  # any integer dtype holds the bits
    got = tfhfp8.quantize(x, name, rounding=rounding, saturate=overflow,
                          noise=bits.astype(dtype)).numpy()
    assert_same_bits(got, ref.expected(name, x, rounding, overflow, bits), x,
                     f"{name} {rounding} {overflow} noise")


@pytest.mark.arithmetic
@pytest.mark.parametrize("name, rounding, overflow", r_bit_cases())
def test_r_bit_roundings_with_seed_match_gfloat(on_backend, name, rounding, overflow):
    r = roundings.parse(rounding).random_bits
    seed = ref.seed_of(name, rounding, overflow) - (1 << 31)  # negative seeds too
    x, bits = ref.r_bit_inputs(name, rounding, lambda n: ref.hash_bits(n, seed, r))
    got = tfhfp8.quantize(x, name, rounding=rounding, saturate=overflow, seed=seed).numpy()
    assert_same_bits(got, ref.expected(name, x, rounding, overflow, bits), x,
                     f"{name} {rounding} {overflow} seed={seed} ({on_backend})")


@pytest.mark.arithmetic
@pytest.mark.parametrize("rounding", [f"{variant}_r{r}" for r in (1, 8, 16, 23)
                                      for variant in roundings.STOCHASTIC_VARIANTS])
@pytest.mark.parametrize("name", ["bfloat16", "p3109_k8p3se", "p3109_k4p4uf"])
def test_float64_inputs_match_gfloat(on_backend, name, rounding):
    """float64 rounds in a float64 container (its own code path): seeded and with noise."""
    r = roundings.parse(rounding).random_bits
    seed = ref.seed_of(name, rounding, "float64")
    overflow = roundings.OVERFLOWS[seed % 3]
    x, bits = ref.r_bit_inputs(
        name, rounding, lambda n: ref.hash_bits(n, seed, r, np.float64), np.float64)
    got = tfhfp8.quantize(x, name, rounding=rounding, saturate=overflow, seed=seed).numpy()
    assert_same_bits(got, ref.expected(name, x, rounding, overflow, bits), x,
                     f"{name} {rounding} {overflow} seed={seed} ({on_backend})")
    noise = (bits * 5 + 3) % (1 << r)
    got = tfhfp8.quantize(x, name, rounding=rounding, saturate=overflow, noise=noise).numpy()
    assert_same_bits(got, ref.expected(name, x, rounding, overflow, noise), x,
                     f"{name} {rounding} {overflow} noise")


@pytest.mark.arithmetic
@pytest.mark.parametrize("name, rounding, overflow", [
    ("p3109_k8p3se", "toward_negative", "sat_propagate"),
    ("p3109_k8p4ue", "stochastic_odd_r4", "ovf_inf"),
    ("float8_e4m3fn", "stochastic_fast_r8", "sat_finite"),
    ("p3109_k5p3ue", "stochastic_r2", "sat_propagate"),
])
def test_xla_compiled_matches_gfloat(name, rounding, overflow):
    parsed = roundings.parse(rounding)
    r = parsed.random_bits
    if r is None:
        x, bits = ref.signed_inputs(name), None
        function = tf.function(lambda x: tfhfp8.quantize(
            x, name, rounding=rounding, saturate=overflow), jit_compile=True)
        got = function(x)
    else:
        seed = ref.seed_of(name, rounding)
        x, bits = ref.r_bit_inputs(name, rounding, lambda n: ref.hash_bits(n, seed, r))
        function = tf.function(lambda x, seed: tfhfp8.quantize(
            x, name, rounding=rounding, saturate=overflow, seed=seed), jit_compile=True)
        got = function(x, tf.constant(seed, tf.int64))
        want = ref.expected(name, x, rounding, overflow, bits)
        assert_same_bits(got.numpy(), want, x, "seed")
        noise = (bits + 1) % (1 << r)  # other bits, through a traced noise tensor
        function = tf.function(lambda x, noise: tfhfp8.quantize(
            x, name, rounding=rounding, saturate=overflow, noise=noise), jit_compile=True)
        got, bits = function(x, tf.constant(noise, tf.int32)), noise
    assert_same_bits(got.numpy(), ref.expected(name, x, rounding, overflow, bits), x, "jit")


def test_random_bits_argument_spells_the_rounding():
    x = ref.signed_inputs("p3109_k8p3se")
    with tfhfp8.ops.forced_backend("tf"):
        by_name = tfhfp8.quantize(x, "p3109_k8p3se", rounding="stochastic_odd_r4", seed=5)
        by_bits = tfhfp8.quantize(x, "p3109_k8p3se", rounding="stochastic_odd",
                                  random_bits=4, seed=5)
        other_seed = tfhfp8.quantize(x, "p3109_k8p3se", rounding="stochastic_odd_r4", seed=6)
    assert_same_bits(by_bits.numpy(), by_name.numpy(), x, "random_bits=4")
    assert not np.array_equal(by_name.numpy(), other_seed.numpy())  # the seed matters


@pytest.mark.arithmetic
@pytest.mark.parametrize("name", ["p3109_k8p3se", "p3109_k8p1se", "p3109_k8p4uf",
                                  "float8_e4m3fn"])
def test_gfloat_round_ndarray_is_round_float(name):
    """The oracle above is gfloat's vectorised rounding: it must be its scalar one."""
    rng = np.random.default_rng(ref.seed_of(name))
    x = ref.signed_inputs(name)
    if not ref.gfloat_info(name).is_signed:
        x = x[~np.signbit(x)]  # gfloat rounds no negatives to unsigned formats
    x = rng.choice(x, 120, replace=False)
    info = ref.gfloat_info(name)
    for rounding in roundings.DIRECTED + ("stochastic_r2", "stochastic_odd_r3",
                                          "stochastic_fast_r8", "stochastic_r23"):
        parsed = roundings.parse(rounding)
        r = parsed.random_bits or 0
        bits = rng.integers(0, 2 ** r, len(x)) if r else np.zeros(len(x), np.int64)
        for sat in (False, True):
            vector = ref.expected(name, x, rounding, "sat_finite" if sat else "ovf_inf",
                                  bits if r else None)
            mode = ref.GF_MODE[parsed.mode]
            scalar = np.array([gfloat.round_float(info, float(v), mode, sat, int(b), r)
                               for v, b in zip(x, bits)], np.float32)
            assert_same_bits(vector, scalar, x, f"{name} {rounding} sat={sat}")


# -- the formats ----------------------------------------------------------------------
P3109_NAMES = [n for n in formats.names() if n.startswith("p3109_")]


def test_named_p3109_formats_are_gfloats():
    expected_names = {f"p3109_k{k}p{p}{s}{d}" for k in range(3, 9) for s in "su"
                      for d in "ef" for p in range(1, k + (s == "u"))}
    expected_names -= {"p3109_k8p1ue", "p3109_k8p1uf"}  # min normal 2^-127
    assert set(P3109_NAMES) == expected_names
    for name in P3109_NAMES:
        fmt, info = formats.get(name), ref.gfloat_info(name)
        assert info.name == name
        codes = [gfloat.decode_float(info, code).fval for code in range(2 ** info.k)]
        finite = sorted({v for v in codes if math.isfinite(v) and v >= 0})
        assert fmt.values().tolist() == finite, name
        assert (fmt.bits, fmt.bias, fmt.signed) == (info.k, info.bias, info.is_signed), name
        assert (fmt.has_inf, fmt.has_nan) == (info.num_infs > 0, info.num_nans > 0), name
        assert fmt.min_subnormal == info.smallest_subnormal and fmt.max == info.max, name


@pytest.mark.parametrize("kwargs, parameter", [
    ({"k": 2, "precision": 1}, "k"), ({"k": 9, "precision": 3}, "k"),
    ({"k": 8.0, "precision": 3}, "k"), ({"k": True, "precision": 1}, "k"),
    ({"k": 8, "precision": 0}, "precision"), ({"k": 8, "precision": 8}, "precision"),
    ({"k": 6, "precision": 7, "signed": False}, "precision"),
    ({"k": 8, "precision": 3.0}, "precision"),
    ({"k": 8, "precision": 3, "domain": "Extended"}, "domain"),
    ({"k": 8, "precision": 3, "domain": None}, "domain"),
    ({"k": 8, "precision": 3, "signed": "no"}, "signed"),
    ({"k": 8, "precision": 1, "signed": False}, "precision=1"),  # min normal 2^-127
])
def test_p3109_bad_arguments(kwargs, parameter):
    with pytest.raises(ValueError, match=parameter):
        tfhfp8.FloatFormat.p3109(**kwargs)


@pytest.mark.parametrize("name", ["p3109_k8p3se", "p3109_k8p4uf", "p3109_k5p3ue",
                                  "p3109_k3p1sf"])
def test_serialization_round_trip(name):
    fmt = formats.get(name)
    assert fmt == tfhfp8.FloatFormat.p3109(*ref.p3109_args(name))
    assert formats.serialize(fmt) == name and formats.get(formats.serialize(fmt)) == fmt
    config = json.loads(json.dumps(fmt.get_config()))
    assert ("signed" in config) == (not fmt.signed)  # signed configs stay as they were
    restored = tfhfp8.FloatFormat.from_config(config)
    assert restored == fmt and restored.signed == fmt.signed and restored.name == name
    keras_config = json.loads(json.dumps(keras.saving.serialize_keras_object(fmt)))
    assert keras.saving.deserialize_keras_object(keras_config) == fmt
    # An unnamed equal format serializes as its config and comes back equal.
    unnamed = tfhfp8.FloatFormat(**{**fmt.get_config(), "name": None})
    assert formats.get(json.loads(json.dumps(formats.serialize(unnamed)))) == fmt


# -- bad arguments of quantize --------------------------------------------------------
X = tf.constant([0.3, -1.7, 2.5])


@pytest.mark.parametrize("random_bits", [0, 24, -1, True, 1.5, "8"])
def test_random_bits_out_of_range(random_bits):
    with pytest.raises(ValueError, match=r"random_bits.*\[1, 23\]"):
        tfhfp8.quantize(X, "p3109_k8p3se", rounding="stochastic", random_bits=random_bits)


@pytest.mark.parametrize("rounding", ["nearest_even", "toward_zero", "stochastic_r8"])
def test_random_bits_with_a_rounding_of_no_variable_bits(rounding):
    with pytest.raises(ValueError, match=f"random_bits.*{rounding}"):
        tfhfp8.quantize(X, "p3109_k8p3se", rounding=rounding, random_bits=8)


@pytest.mark.parametrize("name", ["stochastic_r0", "stochastic_r24", "stochastic_odd",
                                  "stochastic_fast_r", "stochastic_even_r8", "Stochastic_r8"])
def test_bad_r_bit_rounding_names(name):
    with pytest.raises(ValueError, match="rounding.*stochastic_r<r>"):
        tfhfp8.quantize(X, "p3109_k8p3se", rounding=name, seed=1)


@pytest.mark.parametrize("noise, error, match", [
    ([0, 1, 16], ValueError, r"noise values.*\[0, 2\^4\)"),
    ([0, -1, 3], ValueError, r"noise values.*\[0, 2\^4\)"),
    ([0, 1], ValueError, "noise must have x's shape"),
    ([[0, 1, 2]], ValueError, "noise must have x's shape"),
    ([0.0, 1.0, 2.0], TypeError, "noise must be an integer tensor"),
])
def test_bad_noise(noise, error, match):
    with pytest.raises(error, match=match):
        tfhfp8.quantize(X, "p3109_k8p3se", rounding="stochastic_r4", noise=noise)


def test_noise_out_of_range_in_a_traced_function():
    function = tf.function(lambda noise: tfhfp8.quantize(
        X, "p3109_k8p3se", rounding="stochastic_r4", noise=noise))
    np.testing.assert_array_equal(function(tf.constant([0, 15, 3])).shape, [3])
    with pytest.raises(tf.errors.InvalidArgumentError, match="noise values"):
        function(tf.constant([0, 16, 3]))


@pytest.mark.parametrize("rounding", ["stochastic", "nearest_even", "toward_positive"])
def test_noise_needs_random_bits(rounding):
    with pytest.raises(ValueError, match=f"noise.*{rounding}"):
        tfhfp8.quantize(X, "p3109_k8p3se", rounding=rounding, noise=[0, 1, 2])


@pytest.mark.parametrize("saturate", ["bogus", "sat_inf", "SAT_FINITE", 2])
def test_bad_saturate_lists_the_overflows(saturate):
    with pytest.raises(ValueError, match="saturate") as info:
        tfhfp8.quantize(X, "p3109_k8p3se", saturate=saturate)
    assert all(name in str(info.value) for name in roundings.OVERFLOWS)


# -- a policy -------------------------------------------------------------------------
def test_policy_with_p3109_and_r_bit_stochastic_errors_trains():
    policy = tfhfp8.Policy(weights="p3109_k8p4se", activations="p3109_k8p4se",
                           errors="p3109_k8p3se", rounding={"errors": "stochastic_r8"})
    restored = tfhfp8.Policy.from_config(json.loads(json.dumps(policy.get_config())))
    assert restored.errors == formats.get("p3109_k8p3se")
    assert restored.rounding["errors"] == "stochastic_r8"
    layer = tfhfp8.layers.Dense(3, policy=policy, use_bias=False)
    x = tf.eye(4)  # one-hot rows: the kernel gradient is the rounded error itself
    layer(x)
    kernel = np.float32(np.arange(12).reshape(4, 3) / 7)
    layer.kernel.assign(kernel)
    errors = np.float32(np.linspace(0.11, 0.97, 12).reshape(4, 3))  # none representable
    with tf.GradientTape() as tape:
        y = layer(x)
        loss = tf.reduce_sum(y * errors)
    weights = ref.expected("p3109_k8p4se", kernel.ravel(), "nearest_even", "sat_finite")
    np.testing.assert_array_equal(y.numpy().ravel(), weights)
    gradient = tape.gradient(loss, layer.kernel).numpy()
    down, up = (ref.expected("p3109_k8p3se", errors.ravel(), rounding, "sat_finite")
                for rounding in ("toward_zero", "toward_positive"))
    assert np.all(down != up)
    assert np.all((gradient.ravel() == down) | (gradient.ravel() == up))
    keras.optimizers.SGD(0.5).apply_gradients([(tf.constant(gradient), layer.kernel)])
    np.testing.assert_array_equal(layer.kernel.numpy(), kernel - np.float32(0.5) * gradient)
