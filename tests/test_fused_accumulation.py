"""Fused (block-FMA) accumulators, bit for bit against tests/fused_reference.py (Python
fractions, written from the definition), on random and adversarial inputs."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfhfp8
from tfhfp8 import formats
from tfhfp8.fused_accumulation import HARDWARE, FusedAccumulator

import fused_reference



def _values(fmt, rng, shape):
    """Random finite values of `fmt` (zeros and subnormals included), random signs."""
    values = formats.get(fmt).values()
    x = rng.choice(values, size=shape) * rng.choice([-1.0, 1.0], size=shape)
    return x.astype(np.float32)


def _reference(a, b, acc, a_type, b_type):
    out = np.empty((a.shape[0], b.shape[1]), np.float32)
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = fused_reference.fused_dot(
                [float(v) for v in a[i]], [float(v) for v in b[:, j]], acc.group_size,
                acc.fraction_bits, acc.output, acc.chunk_size,
                1 - formats.get(a_type).bias, 1 - formats.get(b_type).bias)
    return out


def _check(a, b, acc, a_type, b_type):
    got = tfhfp8.matmul(tf.constant(a), tf.constant(b), acc, a_format=a_type,
                        b_format=b_type).numpy()
    expected = _reference(a, b, acc, a_type, b_type)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def _types(acc):
    return acc.input_types[0], acc.input_types[-1]


@pytest.mark.arithmetic
@pytest.mark.parametrize("name", sorted(HARDWARE))
@pytest.mark.parametrize("k", [1, 7, 32, 33, 130])
def test_named_accumulators_match_the_reference_on_random_inputs(name, k):
    acc = tfhfp8.accumulation.get(name)
    a_type, b_type = _types(acc)
    rng = np.random.default_rng(k)
    _check(_values(a_type, rng, (3, k)), _values(b_type, rng, (k, 2)), acc, a_type, b_type)


@pytest.mark.parametrize("name", ["nvidia_hopper_fp8", "nvidia_hopper_fp8_promote128",
                                  "nvidia_ampere_fp16", "nvidia_volta_fp16"])
def test_cancellation_subnormals_zeros_and_wide_ranges(name):
    acc = tfhfp8.accumulation.get(name)
    a_type, b_type = _types(acc)
    fmt = formats.get(a_type)
    rng = np.random.default_rng(1)
    k = 3 * acc.group_size + 5
    big, tiny = fmt.max, fmt.min_subnormal
    rows = [
        np.tile([big, -big, tiny, 3 * tiny], k)[:k],                  # cancellation
        np.where(rng.random(k) < 0.5, big, tiny) * rng.choice([-1, 1], k),  # wide range
        np.full(k, tiny),                                              # subnormals
        np.r_[np.zeros(acc.group_size), rng.choice(fmt.values()[1:], k - acc.group_size)],
    ]
    a = np.array(rows, np.float32)
    b = _values(b_type, rng, (k, 3))
    b[:, 0] = 1.0
    _check(a, b, acc, a_type, b_type)


def test_nan_and_inf_give_what_their_exact_sum_gives():
    # On the kernel itself: tfhfp8.matmul rounds its operands saturating (inf -> max).
    acc = tfhfp8.accumulation.get("nvidia_hopper_fp16")
    a = np.ones((1, 4, 40), np.float32)
    a[0, 0, 3], a[0, 1, 3], a[0, 1, 20], a[0, 2, 5] = np.inf, np.inf, -np.inf, np.nan
    a[0, 3, 39] = 65504.0  # 65504 + 39 in the last group: the FP32 sum stays finite
    fp16 = formats.get("float16")
    got, _ = tfhfp8.ops.fused_matmul(a, np.ones((1, 40, 1), np.float32),
                                     *acc.kernel_arguments(fp16, fp16))
    got = got.numpy()[0, :, 0]
    assert got[0] == np.inf and math.isnan(got[1]) and math.isnan(got[2])
    assert got[3] == fused_reference.fused_dot([float(v) for v in a[0, 3]], [1.0] * 40, 16, 25,
                                               a_min_exponent=-14,
                                               b_min_exponent=-14)


def test_long_dot_products_and_the_deepseek_promotion():
    rng = np.random.default_rng(2)
    a = _values("float8_e4m3fn", rng, (1, 4096))
    b = np.abs(_values("float8_e4m3fn", rng, (4096, 1)))
    a = np.abs(a)  # positive terms: truncation only loses, as in DeepSeek's measurement
    for name in ("nvidia_hopper_fp8", "nvidia_hopper_fp8_promote128"):
        _check(a, b, tfhfp8.accumulation.get(name), "float8_e4m3fn", "float8_e4m3fn")
    exact = float(np.dot(a[0].astype(np.float64), b[:, 0].astype(np.float64)))
    fast = float(tfhfp8.matmul(a, b, "nvidia_hopper_fp8", a_format="float8_e4m3fn",
                               b_format="float8_e4m3fn")[0, 0])
    promoted = float(tfhfp8.matmul(a, b, "nvidia_hopper_fp8_promote128",
                                   a_format="float8_e4m3fn", b_format="float8_e4m3fn")[0, 0])
    assert abs(promoted - exact) < abs(fast - exact)


@pytest.mark.parametrize("output", ["float32", "e8m13", "float16"])
def test_custom_accumulators_and_outputs(output):
    acc = FusedAccumulator(8, 20, output, chunk_size=24)
    rng = np.random.default_rng(3)
    _check(_values("float16", rng, (2, 50)) / 64, _values("float16", rng, (50, 2)) / 64,
           acc, "float16", "float16")


def test_a_layer_trains_with_a_hardware_accumulator_and_reloads(tmp_path):
    policy = tfhfp8.Policy("fp8", accumulation="nvidia_hopper_fp8_promote128")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((20,)), tfhfp8.layers.Dense(4, policy=policy)])
    model.compile("sgd", "mse")
    x, y = np.random.default_rng(0).normal(size=(16, 20)).astype("float32"), np.zeros((16, 4))
    model.fit(x, y, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert reloaded.layers[0].policy.accumulation["forward"].name == (
        "nvidia_hopper_fp8_promote128")


def test_operands_the_instruction_does_not_take_are_clear_errors():
    with pytest.raises(ValueError, match="nvidia_hopper_fp8.*float8_e4m3b11fnuz"):
        tfhfp8.Policy("hfp8", accumulation="nvidia_hopper_fp8")
    with pytest.raises(ValueError, match="a_format.*nvidia_hopper_fp8"):
        tfhfp8.matmul(tf.ones([2, 3]), tf.ones([3, 2]), "nvidia_hopper_fp8",
                      a_format="float16", b_format="float8_e4m3fn")


@pytest.mark.parametrize("kwargs, message", [
    (dict(group_size=0, fraction_bits=13), "group_size"),
    (dict(group_size=8, fraction_bits=0), "fraction_bits"),
    (dict(group_size=8, fraction_bits=13, output="bfloat16"), "output must be one of"),
    (dict(group_size=8, fraction_bits=13, chunk_size=12), "multiple of group_size"),
    (dict(group_size=8, fraction_bits=13, input_types=("int8",)), "input_types"),
])
def test_bad_arguments_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedAccumulator(**kwargs)


def test_products_lost_to_the_alignment_are_counted():
    a = np.array([[[256.0] + [2.0 ** -6] * 31 + [1.0]]], np.float32)  # K = 33: 2 groups
    e4m3 = formats.get("float8_e4m3fn")
    acc = tfhfp8.accumulation.get("nvidia_hopper_fp8")
    c, swamped = tfhfp8.ops.fused_matmul(a, np.ones((1, 33, 1), np.float32),
                                         *acc.kernel_arguments(e4m3, e4m3))
    assert float(c[0, 0, 0]) == 257.0 and int(swamped) == 31


def test_bfloat16_subnormal_operands_and_results_are_kept():
    # bfloat16 shares float32's range: subnormal operands and float32-subnormal sums,
    # which TF's CPU kernels would flush to zero in a cast.
    acc = tfhfp8.accumulation.get("nvidia_hopper_bf16")
    a = np.array([[2.0 ** -133, 2.0 ** -130], [2.0 ** -120, -(2.0 ** -126)]], np.float32)
    b = np.array([[2.0 ** -10], [1.0]], np.float32)
    _check(a, b, acc, "bfloat16", "bfloat16")
    got = tfhfp8.matmul(a, b, acc, a_format="bfloat16", b_format="bfloat16").numpy()
    assert got[0, 0] == np.float32(2.0 ** -143 + 2.0 ** -130)
