"""Per-tensor scaled FP8 operands (Transformer Engine's delayed scaling) on fused
accumulators: the GEMM multiplies the FP8 elements and applies the two FP32 scales to
the sum, bit for bit against tests/fused_reference.py and ml_dtypes' FP8 casts."""

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import tfhfp8
from tfhfp8.fused_accumulation import HARDWARE

import fused_reference

_TYPES = {"e4m3_delayed": ml_dtypes.float8_e4m3fn, "e5m2_delayed": ml_dtypes.float8_e5m2}


def _elements(x, fmt, scale):
    """The FP8 data of `x` with the dequantizing scale `scale`: `x / scale` cast
    (saturating) to the element type, as Keras' and TE's quantizers compute it."""
    dtype = _TYPES[fmt]
    limit = float(ml_dtypes.finfo(dtype).max)
    quotient = (np.float32(x) / np.float32(scale)).astype(np.float32)
    return np.clip(quotient, -limit, limit).astype(dtype).astype(np.float32)


def _current_scale(x, fmt):
    """Keras' `compute_float8_scale` of `x`'s amax, margin 0, in float32."""
    limit = np.float32(ml_dtypes.finfo(_TYPES[fmt]).max)
    return np.float32(1.0) / (limit / np.float32(np.max(np.abs(x))))


def _expected(a_codes, b_codes, a_scale, b_scale, acc, a_fmt, b_fmt):
    """`sum * (a_scale * b_scale)` in float32, the sum from the fused reference."""
    minimum = [1 - tfhfp8.formats.get(f).element.bias for f in (a_fmt, b_fmt)]
    sums = np.array([[fused_reference.fused_dot(
        [float(v) for v in a_codes[i]], [float(v) for v in b_codes[:, j]], acc.group_size,
        acc.fraction_bits, acc.output, acc.chunk_size, *minimum)
        for j in range(b_codes.shape[1])] for i in range(a_codes.shape[0])], np.float32)
    return sums * (np.float32(a_scale) * np.float32(b_scale))


def _assert_bits(got, expected):
    np.testing.assert_array_equal(np.asarray(got, np.float32).view(np.uint32),
                                  expected.view(np.uint32))


@pytest.mark.parametrize("name", ["nvidia_hopper_fp8", "nvidia_hopper_fp8_promote128",
                                  "nvidia_ada_fp8", "nvidia_blackwell_fp8"])
def test_matmul_multiplies_the_fp8_data_and_scales_the_sum(name):
    acc = tfhfp8.accumulation.get(name)
    rng = np.random.default_rng(len(name))
    a = (rng.standard_normal((3, 300)) * 7.3).astype(np.float32)
    b = (rng.standard_normal((300, 2)) * 0.011).astype(np.float32)
    dc = (rng.standard_normal((3, 2)) * 3e-5).astype(np.float32)
    a_t, b_t = tf.constant(a), tf.constant(b)
    with tf.GradientTape() as tape:
        tape.watch([a_t, b_t])
        c = tfhfp8.matmul(a_t, b_t, acc, a_format="e4m3_delayed", b_format="e4m3_delayed",
                          grad_format="e5m2_delayed")
    da, db = tape.gradient(c, [a_t, b_t], output_gradients=tf.constant(dc))

    sa, sb = _current_scale(a, "e4m3_delayed"), _current_scale(b, "e4m3_delayed")
    qa, qb = _elements(a, "e4m3_delayed", sa), _elements(b, "e4m3_delayed", sb)
    _assert_bits(c, _expected(qa, qb, sa, sb, acc, "e4m3_delayed", "e4m3_delayed"))
    se = _current_scale(dc, "e5m2_delayed")
    qe = _elements(dc, "e5m2_delayed", se)
    _assert_bits(da, _expected(qe, qb.T, se, sb, acc, "e5m2_delayed", "e4m3_delayed"))
    _assert_bits(db, _expected(qa.T, qe, sa, se, acc, "e4m3_delayed", "e5m2_delayed"))


def test_summing_the_dequantized_values_would_differ():
    """The scale is not a power of two: the values' exponents are not the data's plus
    a constant, so summing them would truncate elsewhere (why the scale is carried)."""
    acc = tfhfp8.accumulation.get("nvidia_hopper_fp8")
    rng = np.random.default_rng(5)
    a = (rng.standard_normal((8, 1024)) * 3.0).astype(np.float32)
    b = np.abs(rng.standard_normal((1024, 8))).astype(np.float32)
    sa, sb = _current_scale(a, "e4m3_delayed"), _current_scale(b, "e4m3_delayed")
    qa, qb = _elements(a, "e4m3_delayed", sa), _elements(b, "e4m3_delayed", sb)
    got = tfhfp8.matmul(a, b, acc, a_format="e4m3_delayed", b_format="e4m3_delayed").numpy()
    on_values = np.array([[fused_reference.fused_dot(
        [float(v) for v in qa[i] * sa], [float(v) for v in qb[:, j] * sb], 32, 13, "e8m13")
        for j in range(8)] for i in range(8)], np.float32)
    assert np.any(got != on_values)


def _scales(layer):
    return {role: float(layer.scaling_state[("gemm", role, 0)]["scale"].numpy())
            for role in ("activations", "weights", "errors")}


@pytest.mark.parametrize("preset", ["fp8_hopper", "fp8_hopper_promoted"])
def test_a_dense_layer_sums_its_three_gemms_as_the_preset_says(preset):
    policy = tfhfp8.Policy(preset)
    keras.utils.set_random_seed(1)
    layer = tfhfp8.layers.Dense(160, use_bias=False, policy=policy)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((4, 40)) * 2).astype(np.float32)
    layer(x)
    model = keras.Sequential([keras.Input((40,)), layer])
    model.compile("sgd", "mse")
    model.fit(x, np.zeros((4, 160)), epochs=2, verbose=0)  # scales away from 1
    scales = _scales(layer)
    assert all(s != 1.0 for s in scales.values())
    kernel = layer.kernel.numpy()
    dy = (rng.standard_normal((4, 160)) * 1e-3).astype(np.float32)
    x_t = tf.constant(x)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x_t)
        y = layer(x_t, training=True)
    dx = tape.gradient(y, x_t, output_gradients=tf.constant(dy))
    dw = tape.gradient(y, layer.kernel, output_gradients=tf.constant(dy))

    accs = policy.accumulation
    qx = _elements(x, "e4m3_delayed", scales["activations"])
    qw = _elements(kernel, "e4m3_delayed", scales["weights"])
    qe = _elements(dy, "e5m2_delayed", scales["errors"])
    _assert_bits(y, _expected(qx, qw, scales["activations"], scales["weights"],
                              accs["forward"], "e4m3_delayed", "e4m3_delayed"))
    _assert_bits(dx, _expected(qe, qw.T, scales["errors"], scales["weights"],
                               accs["input_gradient"], "e5m2_delayed", "e4m3_delayed"))
    _assert_bits(dw, _expected(qx.T, qe, scales["activations"], scales["errors"],
                               accs["weight_gradient"], "e4m3_delayed", "e5m2_delayed"))


def test_the_presets_train_save_and_reload(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((12,)), tfhfp8.layers.Dense(16, activation="relu", policy="fp8_hopper"),
        tfhfp8.layers.Dense(3, policy="fp8_hopper_promoted")])
    model.compile("adam", "mse")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 12)).astype("float32"), rng.standard_normal((32, 3))
    history = model.fit(x, y, epochs=4, verbose=0).history["loss"]
    assert history[-1] < history[0]
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert reloaded.layers[0].policy == tfhfp8.Policy("fp8_hopper")
    assert tfhfp8.policy.serialize(reloaded.layers[1].policy) == "fp8_hopper_promoted"


def test_a_scaled_operand_without_its_scale_is_a_clear_error():
    acc = tfhfp8.accumulation.get("nvidia_hopper_fp8")
    with pytest.raises(ValueError, match="e4m3_delayed.*without its scale"):
        fmt = tfhfp8.formats.get("e4m3_delayed")
        tfhfp8.gemm.product(tf.ones([1, 2, 3]), tf.ones([1, 3, 2]), acc, fmt, fmt,
                            tf.zeros([], tf.int64))


def test_fp8_instructions_take_per_tensor_scaled_fp8_and_mx_ones_do_not():
    scaled = tfhfp8.formats.get("e5m2_delayed")
    for name, acc in HARDWARE.items():
        if "float8_e5m2" in acc.input_types:
            assert acc.input_type("b", scaled).name == "float8_e5m2"
    with pytest.raises(ValueError, match="b: nvidia_blackwell_mxfp8 .*e5m2_delayed"):
        HARDWARE["nvidia_blackwell_mxfp8"].input_type("b", scaled)
    with pytest.raises(ValueError, match="activations: nvidia_blackwell_mxfp8 .*e4m3_delayed"):
        tfhfp8.Policy("fp8_delayed", accumulation="nvidia_blackwell_mxfp8")


@pytest.mark.parametrize("layer, shape", [
    (lambda: tfhfp8.layers.Conv2D(4, 3, data_format="channels_first",
                                  policy="fp8_hopper"), (2, 3, 6, 6)),
    (lambda: tfhfp8.layers.DepthwiseConv2D(3, policy="fp8_hopper"), (2, 6, 6, 3)),
    (lambda: tfhfp8.layers.Conv2DTranspose(4, 3, strides=2, policy="fp8_hopper"),
     (2, 5, 5, 3)),
    (lambda: tfhfp8.layers.EinsumDense("abc,cd->abd", (5, 4), policy="fp8_hopper"),
     (2, 5, 6)),
])
def test_every_gemm_layer_trains_with_the_preset(layer, shape):
    layer = layer()
    x = tf.constant(np.random.default_rng(0).standard_normal(shape).astype("float32"))
    layer(x)
    before = [v.numpy() for v in layer.trainable_variables]
    optimizer = keras.optimizers.SGD(0.1)
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(x, training=True)))
        grads = tape.gradient(loss, layer.trainable_variables)
        assert all(np.all(np.isfinite(g)) for g in grads)
        optimizer.apply_gradients(zip(grads, layer.trainable_variables))
    assert all(np.any(v.numpy() != b) for v, b in zip(layer.trainable_variables, before))
    assert any(float(state["scale"].numpy()) != 1.0 for state in layer.scaling_state.values())


def test_attention_scales_each_of_its_two_activations_apart():
    layer = tfhfp8.layers.MultiHeadAttention(2, 4, policy="fp8_hopper")
    query = np.random.default_rng(0).standard_normal((2, 5, 8)).astype("float32")
    value = query * 100.0  # another range: another scale
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(layer(query, value, training=True)))
        grads = tape.gradient(loss, layer.trainable_variables)
        assert all(np.all(np.isfinite(g)) for g in grads)
    scores = [float(layer.scaling_state[("scores", "activations", i)]["scale"].numpy())
              for i in range(2)]
    assert scores[0] != scores[1]
