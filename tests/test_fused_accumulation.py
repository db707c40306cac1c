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
@pytest.mark.parametrize("name", sorted(n for n in HARDWARE if not n.startswith("nvidia_blackwell_mx")))
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


def _float32_bits(rng, shape, low, high):
    """Random FP32 values with biased exponents in [low, high) and all 23 mantissa bits
    random (random signs): what a TF32 instruction truncates."""
    bits = rng.integers(low << 23, high << 23, size=shape).astype(np.uint32)
    return (bits | rng.integers(0, 2, size=shape).astype(np.uint32) << 31).view(np.float32)


@pytest.mark.parametrize("backend", ["cpp", "tf"], indirect=True)
@pytest.mark.parametrize("name", ["nvidia_ampere_tf32", "nvidia_hopper_tf32"])
def test_tf32_instructions_truncate_float32_operands(name, backend):
    acc = tfhfp8.accumulation.get(name)
    rng = np.random.default_rng(4)
    k = 2 * acc.group_size + 3
    a = _float32_bits(rng, (4, k), 1, 255)  # every exponent: up to 2^127, down to 2^-126
    a[0] = _float32_bits(rng, k, 0, 1)      # FP32 subnormals
    a[1, 1::2] = -a[1, ::2][: k // 2]         # pairs that cancel
    b = _float32_bits(rng, (k, 3), 100, 150)
    got = tfhfp8.matmul(tf.constant(a), tf.constant(b), acc).numpy()  # no operand format
    truncated = [x.view(np.uint32) & np.uint32(0xFFFFE000) for x in (a, b)]  # MMA-Sim's
    expected = _reference(*(t.view(np.float32) for t in truncated), acc,
                          "tensorfloat32", "tensorfloat32")
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    assert not np.array_equal(got, tf.linalg.matmul(a, b).numpy())


def test_a_tf32_policy_needs_no_operand_formats():
    policy = tfhfp8.Policy(accumulation="nvidia_ampere_tf32")  # FP32 operands, as on A100
    layer = tfhfp8.layers.Dense(3, policy=policy, use_bias=False)
    x = _float32_bits(np.random.default_rng(5), (2, 9), 120, 135)
    y = layer(x).numpy()
    expected = tfhfp8.matmul(x, layer.kernel, "nvidia_ampere_tf32").numpy()
    np.testing.assert_array_equal(y, expected)
    rows = tfhfp8.summary(keras.Sequential([keras.Input((9,)), layer]), print_fn=lambda _: 0)
    assert rows[0]["note"] == "emulated" and "nvidia_ampere_tf32" in rows[0]["formats"]
    with pytest.raises(ValueError, match="tensorfloat32.*goes alone"):
        FusedAccumulator(4, 24, input_types=("tensorfloat32", "float16"))


def _mx_values(elements, exponents):
    """The float32 values of MX elements [rows, k] with their blocks' scale exponents."""
    k = elements.shape[1]
    return (elements * 2.0 ** np.repeat(exponents, 32, axis=1)[:, :k]).astype(np.float32)


def _mx_operand(name, rows, k, rng, scales):
    """(values, elements, scale exponents) of an MX operand [rows, k]: random elements
    (subnormals included), every block holding one of its element type's top binade
    (so that its scale is the one the quantizer picks), scale exponents from `scales`."""
    fmt = formats.get(name)
    values = fmt.element.values()
    top = values[values >= 2.0 ** fmt.emax_element]
    blocks = -(-k // 32)
    elements = _values(fmt.element, rng, (rows, blocks * 32))
    for row in elements:
        for start in range(0, k, 32):
            row[start + rng.integers(min(32, k - start))] = rng.choice(top)
    elements = elements[:, :k]
    exponents = rng.choice(scales, (rows, blocks))
    return _mx_values(elements, exponents), elements, exponents


@pytest.mark.parametrize("a_type, b_type", [("mxfp8_e4m3", "mxfp8_e5m2"),
                                            ("mxfp4_e2m1", "mxfp6_e3m2"),
                                            ("mxfp6_e2m3", "mxfp8_e4m3")])
@pytest.mark.parametrize("k", [1, 33, 100])
def test_mx_operands_fold_their_block_scales_into_the_products(a_type, b_type, k):
    acc = tfhfp8.accumulation.get("nvidia_blackwell_mxfp8")
    rng = np.random.default_rng(k)
    a, a_elements, a_scales = _mx_operand(a_type, 4, k, rng, np.arange(-30, 31))
    a_scales[0] = -127  # E8M0's least scale: elements down to 2^-136
    a = _mx_values(a_elements, a_scales)
    b, b_elements, b_scales = _mx_operand(b_type, 3, k, rng, np.arange(-30, 31))
    got = tfhfp8.matmul(a, b.T, acc, a_format=a_type, b_format=b_type).numpy()
    element_exponents = [1 - formats.get(t).element.bias for t in (a_type, b_type)]
    expected = np.array([[fused_reference.fused_dot(
        [float(v) for v in a_elements[i]], [float(v) for v in b_elements[j]], 32, 25,
        "float32", None, *element_exponents, [int(e) for e in a_scales[i]],
        [int(e) for e in b_scales[j]]) for j in range(3)] for i in range(4)], np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("k", [1, 33, 64, 100, 200])
def test_mxfp4_sums_partial_sums_of_16_as_kind_mxf4nvf4(k):
    acc = tfhfp8.accumulation.get("nvidia_blackwell_mxfp4")
    rng = np.random.default_rng(k)
    a, a_elements, a_scales = _mx_operand("mxfp4_e2m1", 5, k, rng, np.arange(-20, 21))
    a_scales[0] = -127  # E8M0's least scale
    a_elements[1, :32], a_scales[1, 0] = 0.0, -127  # an all-zero block
    a_scales[2] = 40  # far above b's: b's partial sums lose their low bits
    a = _mx_values(a_elements, a_scales)
    b, b_elements, b_scales = _mx_operand("mxfp4_e2m1", 3, k, rng, np.arange(-20, 21))
    got = tfhfp8.matmul(a, b.T, acc, a_format="mxfp4_e2m1", b_format="mxfp4_e2m1").numpy()
    expected = np.array([[fused_reference.fused_dot(
        [float(v) for v in a_elements[i]], [float(v) for v in b_elements[j]], 64, 35,
        a_scales=[int(e) for e in a_scales[i]], b_scales=[int(e) for e in b_scales[j]],
        partial_sum_size=16, block_size=32) for j in range(3)] for i in range(5)], np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_partial_sums_need_mx_blocks_that_hold_them():
    with pytest.raises(ValueError, match="partial_sum_size needs MX input types"):
        FusedAccumulator(64, 35, input_types=("float8_e4m3fn",), partial_sum_size=16)
    with pytest.raises(ValueError, match="whole blocks"):
        FusedAccumulator(48, 35, input_types=("mxfp4_e2m1",), partial_sum_size=16)
    acc = FusedAccumulator(64, 35, input_types=("mxfp4_e2m1",), partial_sum_size=16)
    assert tfhfp8.accumulation.get(tfhfp8.accumulation.serialize(acc)) == acc


def test_an_mx_policy_sums_as_blackwell_and_reloads(tmp_path):
    policy = tfhfp8.Policy("mxfp8", accumulation="nvidia_blackwell_mxfp8")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((40,)),
                              tfhfp8.layers.Dense(8, policy=policy, use_bias=False)])
    x = np.random.default_rng(0).normal(size=(16, 40)).astype("float32")
    kernel = model.layers[0].kernel
    expected = tfhfp8.matmul(x, kernel, "nvidia_blackwell_mxfp8", a_format="mxfp8_e4m3",
                             b_format="mxfp8_e4m3").numpy()
    np.testing.assert_array_equal(model.predict(x, verbose=0), expected)
    model.compile("sgd", "mse")
    model.fit(x, np.zeros((16, 8)), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_mx_blocks_over_two_axes_need_one_order_in_both_operands():
    policy = tfhfp8.Policy("mxfp8", accumulation="nvidia_blackwell_mxfp8")
    x = np.random.default_rng(0).normal(size=(4, 5, 16)).astype("float32")
    assert tfhfp8.layers.EinsumDense("abc,bcd->ad", 8, policy=policy)(x).shape == (4, 8)
    with pytest.raises(NotImplementedError, match=r"reduction axes \['b', 'c'\]"):
        tfhfp8.layers.EinsumDense("abc,cbd->ad", 8, policy=policy)(x)


@pytest.mark.parametrize("policy, message", [
    (dict(weights="mxfp8_e4m3", activations="mxfp8_e4m3", accumulation="nvidia_hopper_fp8"),
     "nvidia_hopper_fp8 takes operands in float8_e4m3fn.*mxfp8_e4m3"),
    (dict(weights="float8_e4m3fn", activations="float8_e4m3fn",
          accumulation="nvidia_blackwell_mxfp8"), "nvidia_blackwell_mxfp8 takes.*float8_e4m3fn"),
    (dict(weights=tfhfp8.BlockScaled("float8_e4m3fn", 32, scale_rounding="ceil"),
          activations="mxfp8_e4m3", accumulation="nvidia_blackwell_mxfp8"), "ceil"),
    (dict(weights=tfhfp8.BlockScaled("float8_e4m3fn", 16), activations="mxfp8_e4m3",
          accumulation="nvidia_blackwell_mxfp8"), "float8_e4m3fn x 16"),
])
def test_mx_operands_and_instructions_must_match(policy, message):
    with pytest.raises(ValueError, match=message):
        tfhfp8.Policy(**policy)
    with pytest.raises(ValueError, match="MX types go alone"):
        FusedAccumulator(16, 25, input_types=("mxfp8_e4m3",))


def _fused_cases(rng):
    """(accumulator, a [2, 5, K], b [2, K, 7], kernel arguments): named and custom
    accumulators (promotion, FP16 output, MX blocks, partial sums), with inf, NaN, an
    all-zero row and cancellation."""
    cases = []
    for acc in [tfhfp8.accumulation.get(name) for name in (
            "nvidia_hopper_fp8_promote128", "nvidia_volta_fp16", "nvidia_ampere_bf16",
            "nvidia_hopper_fp16", "nvidia_blackwell_mxfp8", "nvidia_blackwell_mxfp4")] + [
            FusedAccumulator(8, 20, "float16", chunk_size=24)]:
        k = 150
        if (acc.name or "").startswith("nvidia_blackwell_mx"):
            a_type, b_type = (("mxfp8_e4m3", "mxfp8_e5m2") if acc.name.endswith("mxfp8")
                              else ("mxfp4_e2m1", "mxfp4_e2m1"))
            a = np.stack([_mx_operand(a_type, 5, k, rng, np.arange(-40, 41))[0]
                          for _ in range(2)])
            b = np.stack([_mx_operand(b_type, 7, k, rng, np.arange(-40, 41))[0].T
                          for _ in range(2)])
        else:
            a_type, b_type = _types(acc) if acc.input_types else ("float16", "float16")
            a = _values(a_type, rng, (2, 5, k)) / (64 if not acc.input_types else 1)
            b = _values(b_type, rng, (2, k, 7)) / (64 if not acc.input_types else 1)
        a[0, 0, :4] = [np.inf, 1.0, -np.inf, np.nan]
        a[1, 1, :] = 0.0
        a[1, 2, 1::2] = -a[1, 2, ::2]
        arguments = acc.kernel_arguments(acc.input_type("a", formats.get(a_type)),
                                         acc.input_type("b", formats.get(b_type)))
        cases.append((acc, a.astype(np.float32), b.astype(np.float32), arguments))
    return cases


def _same_bits(x, y):
    x, y = np.asarray(x), np.asarray(y)
    return np.array_equal(np.isnan(x), np.isnan(y)) and np.array_equal(
        np.where(np.isnan(x), 0, x).view(np.uint32), np.where(np.isnan(y), 0, y).view(np.uint32))


def test_the_cpp_kernel_and_the_tf_ops_agree_on_every_cpu_variant(monkeypatch):
    from tfhfp8.ops import cpp_backend, tf_fused

    cases = _fused_cases(np.random.default_rng(9))
    expected = []
    for acc, a, b, arguments in cases:  # the TF ops under XLA, as tfhfp8.matmul runs them
        run = tf.function(lambda x, y: tf_fused.fused_matmul(x, y, *arguments),
                          jit_compile=True, autograph=False)
        c, swamped = run(tf.constant(a), tf.constant(b))
        expected.append((c.numpy(), int(swamped)))
    for variant in tfhfp8.ops.backend_info()["cpu_variants_supported"]:
        monkeypatch.setenv("TFHFP8_CPU_VARIANT", variant)
        for (acc, a, b, arguments), (want, want_swamped) in zip(cases, expected):
            c, swamped = cpp_backend.fused_matmul(a, b, *arguments)
            assert _same_bits(c.numpy(), want), (variant, str(acc))
            assert int(swamped) == want_swamped, (variant, str(acc))


@pytest.mark.parametrize("attrs, message", [
    (dict(group_size=0), "group_size"), (dict(fraction_bits=41), "fraction_bits"),
    (dict(output_bits=24), "output_bits"), (dict(chunk_size=12), "chunk_size"),
    (dict(a_block_emax=200), "a_block_emax"), (dict(output_min_exponent=1),
                                                "output_min_exponent"),
    (dict(partial_sum_size=4), "partial_sum_size"),  # operands not blocked
    (dict(partial_sum_size=3, block_size=8, a_blocked=True, b_blocked=True),
     "partial_sum_size")])
def test_the_raw_kernel_rejects_bad_attributes(attrs, message):
    from tfhfp8.ops import cpp_backend

    arguments = dict(a_min_exponent=-6, b_min_exponent=-6, group_size=8, fraction_bits=13,
                     output_bits=23, output_min_exponent=-126, output_rounding="toward_zero",
                     chunk_size=0)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=message):
        cpp_backend.load().hfp8_fused_matmul(np.ones((1, 2, 8), np.float32),
                                             np.ones((1, 8, 2), np.float32),
                                             **{**arguments, **attrs})
    with pytest.raises(tf.errors.InvalidArgumentError, match="K"):
        cpp_backend.load().hfp8_fused_matmul(np.ones((1, 2, 8), np.float32),
                                             np.ones((1, 7, 2), np.float32), **arguments)


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
