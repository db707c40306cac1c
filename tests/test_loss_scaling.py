"""Per-layer loss scaling, enhanced dynamic loss scaling, statistics and checkpoints."""

import glob
import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import tfhfp8
from tfhfp8 import loss_scaling, loss_scaling_spec
from tfhfp8.loss_scaling_spec import LossScalingSpec

E5M2 = tfhfp8.formats.get("float8_e5m2")


def _dense_stack(policy, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((64,))] + [
        keras.layers.Dense(units) for units in (64, 64, 32)])
    return model, tfhfp8.quantize_model(model, policy, exempt=[] if policy else None)


def _kernel_grads(model, x, upstream):
    with tf.GradientTape() as tape:
        y = model(x)
    grads = tape.gradient(y, model.trainable_variables, output_gradients=upstream)
    return [g.numpy() for g, v in zip(grads, model.trainable_variables) if "kernel" in v.path]


def _cosine(a, b):
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


def _adaptive_scale_numpy(g, w, fmt, n, underflow_rate=1e-3, max_scale=2.0**24):
    """Adaptive loss scaling (Zhao et al. 2019), independently: the power-of-two scale of
    one layer whose backward product sums `n` terms (SPEC section 3)."""
    g, w = g.astype(np.float64), w.astype(np.float64)
    sigma = math.sqrt((g.var() + g.mean() ** 2) * (w.var() + w.mean() ** 2)) * math.sqrt(0.5 * n)
    erfinv = _erfinv(underflow_rate)
    a_low = max(1.0, fmt.min_subnormal / (math.sqrt(2) * erfinv * sigma))
    a_up = (fmt.max / n) / (np.abs(g).max() * np.abs(w).max())
    a = min(a_low, a_up, max_scale)
    return 2.0 ** math.floor(math.log2(max(a, 1.0)))


def _erfinv(y):
    x = 0.0  # Newton on math.erf: independent of TensorFlow's erfinv
    for _ in range(50):
        x -= (math.erf(x) - y) / (2 / math.sqrt(math.pi) * math.exp(-x * x))
    return x


@pytest.fixture(scope="module")
def tiny_gradients():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 64)).astype("float32")
    upstream = (rng.normal(size=(256, 32)) * 1e-7).astype("float32")
    return x, upstream


def test_without_scaling_tiny_errors_vanish(tiny_gradients):
    x, upstream = tiny_gradients
    _, emulated = _dense_stack(tfhfp8.Policy(errors="float8_e5m2"))
    for grad in _kernel_grads(emulated, x, upstream):
        assert np.mean(grad == 0) > 0.99


def test_adaptive_scaling_keeps_tiny_errors(tiny_gradients):
    x, upstream = tiny_gradients
    fp32, emulated = _dense_stack(tfhfp8.Policy(errors="float8_e5m2", loss_scaling="adaptive"))
    for layer in emulated.layers:
        layer.enable_error_stats()
    reference = _kernel_grads(fp32, x, upstream)
    for grad, ref in zip(_kernel_grads(emulated, x, upstream), reference):
        assert _cosine(grad, ref) >= 0.99
    for layer in emulated.layers:
        state = layer.error_state["gemm"]
        scale = float(state["scale"].numpy())
        assert scale > 1 and math.log2(scale) == int(math.log2(scale))
        assert float(state["underflow"].numpy()) <= 1e-2
    # The last layer sees the upstream gradient itself: its scale is the formula's.
    last = emulated.layers[-1]
    expected = _adaptive_scale_numpy(upstream, last.kernel.numpy(), E5M2, n=last.units)
    assert float(last.error_state["gemm"]["scale"].numpy()) == expected


@pytest.mark.parametrize("magnitude", [3e4, 1e2])
def test_adaptive_scale_never_overflows(magnitude):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 64)).astype("float32")
    upstream = rng.uniform(-magnitude, magnitude, size=(64, 32)).astype("float32")
    policy = tfhfp8.Policy(errors="float8_e5m2", loss_scaling="adaptive", saturate=False)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), tfhfp8.layers.Dense(32, policy=policy)])
    (grad,) = _kernel_grads(model, x, upstream)
    scale = float(model.layers[0].error_state["gemm"]["scale"].numpy())
    assert np.all(np.isfinite(grad))
    assert scale * np.abs(upstream).max() <= E5M2.max
    assert scale == _adaptive_scale_numpy(upstream, model.layers[0].kernel.numpy(), E5M2, n=32)
    if magnitude > 1e4:
        assert scale == 1.0


@pytest.mark.parametrize("kind", ["dense", "conv2d"])
def test_adaptive_scale_uses_the_backward_fan_in(kind):
    # Zhao et al.'s reference code (kumasento/gradient-scaling, AdaLossChainer.get_fan_in)
    # bounds the scale with the fan-in of the input-gradient product: the units of a
    # Dense layer, filters * kh * kw of a convolution (not the forward in * kh * kw).
    rng = np.random.default_rng(3)
    policy = tfhfp8.Policy(errors="float8_e5m2", loss_scaling="adaptive")
    keras.utils.set_random_seed(0)
    if kind == "dense":
        layer = tfhfp8.layers.Dense(128, policy=policy)
        x = rng.normal(size=(32, 8)).astype("float32")
        upstream = (rng.normal(size=(32, 128)) * 1e-7).astype("float32")
        backward, forward = 128, 8
    else:
        layer = tfhfp8.layers.Conv2D(64, (3, 2), policy=policy)
        x = rng.normal(size=(4, 9, 9, 2)).astype("float32")
        upstream = (rng.normal(size=(4, 7, 8, 64)) * 1e-7).astype("float32")
        backward, forward = 64 * 3 * 2, 2 * 3 * 2
    with tf.GradientTape() as tape:
        tape.watch(x_tensor := tf.constant(x))
        y = layer(x_tensor)
    tape.gradient(y, layer.kernel, output_gradients=upstream)
    kernel = layer.kernel.numpy()
    expected = _adaptive_scale_numpy(upstream, kernel, E5M2, n=backward)
    assert expected != _adaptive_scale_numpy(upstream, kernel, E5M2, n=forward)  # telling
    assert float(layer.error_state["gemm"]["scale"].numpy()) == expected
    assert layer.backward_fan_in(layer.kernel) == backward


def test_backward_fan_in_of_other_kernels():
    policy = tfhfp8.Policy(errors="float8_e5m2")
    transposed = tfhfp8.layers.Conv2DTranspose(6, (3, 2), policy=policy)
    transposed.build((None, 5, 5, 4))  # kernel (3, 2, 6, 4): dx sums 6 * 3 * 2 terms
    assert transposed.backward_fan_in(transposed.kernel) == 36
    einsum = tfhfp8.layers.EinsumDense("abc,cde->abde", output_shape=(None, 3, 5),
                                       policy=policy)
    einsum.build((None, 7, 4))  # kernel (c, d, e) = (4, 3, 5): dx sums d * e terms
    assert einsum.backward_fan_in(einsum.kernel) == 15
    depthwise = tfhfp8.layers.DepthwiseConv2D(3, depth_multiplier=2, policy=policy)
    depthwise.build((None, 5, 5, 4))  # kernel (3, 3, 4, 2)
    assert depthwise.backward_fan_in(depthwise.kernel) == 18


def test_every_keeps_the_scale_between_refreshes(tiny_gradients):
    x, upstream = tiny_gradients
    policy = tfhfp8.Policy(errors="float8_e5m2", loss_scaling=loss_scaling.Adaptive(every=3))
    _, emulated = _dense_stack(policy)
    last = emulated.layers[-1].error_state["gemm"]
    scales = []
    for factor in (1.0, 1e3, 1e3, 1e3):
        _kernel_grads(emulated, x, upstream * factor)
        scales.append(float(last["scale"].numpy()))
    assert scales[1] == scales[2] == scales[0]  # steps 2 and 3 reuse step 1's scale
    assert scales[3] < scales[0]  # step 4 refreshes for 1000x larger gradients
    assert int(last["step"].numpy()) == 4


def test_absmax_scale_and_history():
    layer_scale = lambda rule, g: float(rule.compute(tf.constant(g), None, E5M2, state, 1))
    state = {}
    g = np.array([1e-3, -4e-3], "float32")
    expected = 2.0 ** math.floor(math.log2(E5M2.max / 4e-3))
    assert layer_scale(loss_scaling.AbsMax(), g) == expected
    delayed = loss_scaling.AbsMax(history=2)
    layer = keras.layers.Layer()
    state = delayed.create_state(layer, "gemm")
    assert layer_scale(delayed, g) == expected  # no history yet: the current amax
    assert layer_scale(delayed, g * 100) == expected  # from the previous step's amax
    assert layer_scale(delayed, g) == 2.0 ** math.floor(math.log2(E5M2.max / 0.4))


def test_loss_scaling_on_policy_serializes():
    policy = tfhfp8.Policy("hfp8", loss_scaling=loss_scaling.Adaptive(underflow_rate=1e-4, every=2))
    restored = tfhfp8.Policy.from_config(json.loads(json.dumps(policy.get_config())))
    assert restored == policy
    assert restored.loss_scaling.config == {"underflow_rate": 1e-4, "every": 2,
                                            "max_scale": 2.0**24}
    rule = loss_scaling.from_spec(restored.loss_scaling)
    assert type(rule) is loss_scaling.Adaptive
    assert rule.underflow_rate == 1e-4 and rule.every == 2
    with pytest.raises(ValueError, match="underflow_rate"):
        loss_scaling.Adaptive(underflow_rate=2)
    with pytest.raises(ValueError, match="loss_scaling"):
        tfhfp8.Policy(loss_scaling="sometimes")


def test_policy_holds_a_loss_scaling_spec_the_layer_builds():
    policy = tfhfp8.Policy("hfp8", loss_scaling="absmax")
    assert policy.loss_scaling == LossScalingSpec("tfhfp8>AbsMax")
    hash(policy.loss_scaling)  # a value
    assert policy.get_config()["loss_scaling"] == "absmax"
    layer = tfhfp8.layers.Dense(2, policy=policy)
    layer.build((None, 3))
    assert layer.loss_scaling_rule == loss_scaling.AbsMax()
    plain = tfhfp8.layers.Dense(2, policy="hfp8")
    plain.build((None, 3))
    assert plain.loss_scaling_rule is None


def test_loss_scaling_specs_from_every_identifier():
    built_in = {name: keras.saving.get_registered_name(cls)
                for name, cls in loss_scaling.REGISTRY.entries.items()}
    assert loss_scaling_spec.BUILT_IN_RULES == built_in
    saved = keras.saving.serialize_keras_object(loss_scaling.AbsMax(history=4))
    from_saved = loss_scaling_spec.spec(json.loads(json.dumps(saved)))
    assert from_saved == loss_scaling_spec.spec(loss_scaling.AbsMax(history=4))
    assert loss_scaling.from_spec(from_saved) == loss_scaling.AbsMax(history=4)
    old = {"class_name": "Adaptive", "config": {"every": 3}}  # files before the registry
    assert loss_scaling.from_spec(loss_scaling_spec.spec(old)) == loss_scaling.Adaptive(every=3)
    assert loss_scaling_spec.spec("none") is None and loss_scaling_spec.spec(None) is None

    class Unregistered(loss_scaling.Adaptive):
        pass

    with pytest.raises(ValueError, match="not registered"):
        tfhfp8.Policy(errors="float8_e5m2", loss_scaling=Unregistered())
    with pytest.raises(TypeError, match="loss_scaling"):
        tfhfp8.Policy(errors="float8_e5m2", loss_scaling=3)
    with pytest.raises(ValueError, match="loss_scaling"):
        loss_scaling.from_spec(LossScalingSpec("tfhfp8>Policy"))


def _linear_model():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, use_bias=False)])
    return tfhfp8.quantize_model(model, tfhfp8.Policy(errors="float8_e5m2"), exempt=[])


def test_dynamic_optimizer_skips_non_finite_steps_and_halves():
    model = _linear_model()
    optimizer = loss_scaling.DynamicLossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=2.0**8, dynamic_growth_steps=3, min_scale=2.0**6)
    optimizer.build(model.trainable_variables)
    before = model.trainable_variables[0].numpy().copy()
    optimizer.apply([tf.fill((4, 1), np.inf)], model.trainable_variables)
    np.testing.assert_array_equal(model.trainable_variables[0].numpy(), before)
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**7
    assert int(optimizer.skipped_steps.numpy()) == 1
    for _ in range(3):  # the floor holds
        optimizer.apply([tf.fill((4, 1), np.nan)], model.trainable_variables)
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**6
    for _ in range(3):  # three clean steps double it
        optimizer.apply([tf.ones((4, 1))], model.trainable_variables)
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**7
    assert not np.array_equal(model.trainable_variables[0].numpy(), before)


def test_dynamic_optimizer_floor_rises_on_schedule():
    model = _linear_model()
    optimizer = loss_scaling.DynamicLossScaleOptimizer(
        keras.optimizers.SGD(0.0), initial_scale=2.0, dynamic_growth_steps=1000,
        min_scale=1.0, min_scale_schedule=[(2, 2.0**5)])
    optimizer.build(model.trainable_variables)
    for _ in range(3):
        optimizer.apply([tf.ones((4, 1))], model.trainable_variables)
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**5
    config = optimizer.get_config()
    assert config["min_scale_schedule"] == [(2, 32.0)]


@pytest.mark.parametrize("optimizer_factory", [
    lambda: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-2)),
    lambda: loss_scaling.DynamicLossScaleOptimizer(keras.optimizers.Adam(1e-2), min_scale=2.0**10),
], ids=["keras", "enhanced"])
def test_dynamic_optimizers_train_emulated_models(optimizer_factory):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1))).astype("float32")
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(1)])
    emulated = tfhfp8.quantize_model(model, tfhfp8.Policy("hfp8", loss_scaling="adaptive"))
    emulated.compile(optimizer_factory(), "mse")
    history = emulated.fit(x, y, epochs=5, batch_size=32, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]


def test_quantization_stats_callback_logs_to_history_and_tensorboard(tmp_path):
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(64, 8)).astype("float32"), rng.integers(0, 3, 64)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(3)])
    emulated = tfhfp8.quantize_model(model, tfhfp8.Policy(
        errors="float8_e5m2", loss_scaling="adaptive"))
    emulated.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    stats = tfhfp8.callbacks.QuantizationStats(log_dir=str(tmp_path))
    history = emulated.fit(x, y, epochs=2, batch_size=16, callbacks=[stats], verbose=0).history
    name = emulated.layers[0].name
    for key in ("scale", "underflow", "saturation"):
        assert len(history[f"{name}/gemm/{key}"]) == 2
        assert len(stats.steps[f"{name}/gemm/{key}"]) == 8
    assert all(s >= 1 for s in stats.steps[f"{name}/gemm/scale"])
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    lines = []
    rows = tfhfp8.summary(emulated, print_fn=lines.append)
    assert "scale=2^" in rows[0]["errors"] and "underflow=" in rows[0]["errors"]


def test_scales_and_dynamic_state_survive_save_and_load(tmp_path, tiny_gradients):
    x, upstream = tiny_gradients
    _, emulated = _dense_stack(tfhfp8.Policy(errors="float8_e5m2", loss_scaling="adaptive"))
    _kernel_grads(emulated, x, upstream)
    emulated.compile(loss_scaling.DynamicLossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=2.0**9, min_scale=4.0), "mse")
    emulated.optimizer.build(emulated.trainable_variables)
    emulated.optimizer.dynamic_scale.assign(2.0**5)
    scales = [float(layer.error_state["gemm"]["scale"].numpy()) for layer in emulated.layers]
    assert all(s > 1 for s in scales)
    path = str(tmp_path / "scaled.keras")
    emulated.save(path)
    restored = keras.saving.load_model(path)
    assert [float(layer.error_state["gemm"]["scale"].numpy())
            for layer in restored.layers] == scales
    assert float(restored.optimizer.dynamic_scale.numpy()) == 2.0**5
    assert restored.optimizer.min_scale == 4.0
    weights = str(tmp_path / "scaled.weights.h5")  # what ModelCheckpoint and
    emulated.save_weights(weights)  # BackupAndRestore use
    emulated.layers[0].error_state["gemm"]["scale"].assign(1.0)
    emulated.load_weights(weights)
    assert float(emulated.layers[0].error_state["gemm"]["scale"].numpy()) == scales[0]


def test_adaptive_scaling_under_mirrored_strategy():
    script = textwrap.dedent("""
        import numpy as np, keras, tensorflow as tf, tfhfp8
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(4)])
            model = tfhfp8.quantize_model(model, tfhfp8.Policy(errors="float8_e5m2", loss_scaling="adaptive"))
            model.compile(keras.optimizers.SGD(0.1), "mse")
        rng = np.random.default_rng(0)
        x = (rng.normal(size=(64, 8)) * 1e-5).astype("float32")  # tiny errors
        y = (rng.normal(size=(64, 4)) * 1e-5).astype("float32")
        stats = tfhfp8.callbacks.QuantizationStats()
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[stats])
        scale = model.layers[-1].error_state["gemm"]["scale"]
        per_replica = strategy.run(lambda: tf.identity(scale.value))
        values = [float(v.numpy()) for v in strategy.experimental_local_results(per_replica)]
        assert len(values) == 2 and values[0] == values[1] and values[0] > 1, values
        print("OK", values)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_scales_agree_under_a_second_strategy_in_the_same_process():
    # The scale agreement used all_gather, whose collective keys collided with those of
    # an earlier strategy's all-reduce: "Collective ops is aborted ... expected type 0
    # and data_type 1 but got type 2 and data_type 3".
    script = textwrap.dedent("""
        import numpy as np, keras, tensorflow as tf, tfhfp8
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        rng = np.random.default_rng(0)
        x = (rng.normal(size=(64, 8)) * 1e-5).astype("float32")
        y = (rng.normal(size=(64, 4)) * 1e-5).astype("float32")

        def train(scaling):
            strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
            with strategy.scope():
                model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
                                          keras.layers.Dense(4)])
                if scaling:
                    model = tfhfp8.quantize_model(model, tfhfp8.Policy(
                        errors="float8_e5m2", loss_scaling=scaling))
                model.compile(keras.optimizers.SGD(0.1), "mse")
            model.fit(x, y, batch_size=16, epochs=2, verbose=0)
            if scaling:
                scale = model.layers[-1].error_state["gemm"]["scale"]
                values = [float(v.numpy()) for v in strategy.experimental_local_results(
                    strategy.run(lambda: tf.identity(scale.value)))]
                assert values[0] == values[1] and values[0] > 1, values
                return values[0]

        train(None)  # plain Keras first
        first = train("adaptive")
        again = train("adaptive")  # a third strategy (other initial weights)
        last = train(tfhfp8.loss_scaling.AbsMax(history=2))
        print("OK", first, again, last)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
