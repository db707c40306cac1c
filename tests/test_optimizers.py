"""tfhfp8.optimizers.LowPrecisionOptimizer: optimizer state and master weights in low precision."""

import subprocess
import sys
import textwrap
from fractions import Fraction

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as R
import tfhfp8
from tfhfp8.optimizers import LowPrecisionOptimizer

F16 = lambda a: np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def _in_float16(a):
    a = np.asarray(a, np.float32)
    return np.array_equal(a, F16(a))


def _model(policy=None, seed=0):
    keras.utils.set_random_seed(seed)
    dense = (lambda units: tfhfp8.layers.Dense(units, policy=policy)) if policy else \
        keras.layers.Dense
    return keras.Sequential([keras.Input((6,)), dense(5), keras.layers.BatchNormalization(),
                             dense(3)])


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(16, 6)).astype("float32"),
            rng.normal(size=(16, 3)).astype("float32"))


OPTIMIZERS = {
    "sgd_momentum": (lambda: keras.optimizers.SGD(0.05, momentum=0.9), 1),
    "adam": (lambda: keras.optimizers.Adam(1e-2), 2),
    "adamw": (lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1), 2),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_slot_is_the_float16_rounding_of_the_fp32_step(name):
    factory, slots_per_weight = OPTIMIZERS[name]
    x, y = _data()
    grads_model = _model()
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((grads_model(x, training=True) - y) ** 2)
    grads = tape.gradient(loss, grads_model.trainable_variables)

    plain_model, low_model = _model(), _model()
    plain = factory()
    plain.apply(grads, plain_model.trainable_variables)
    low = LowPrecisionOptimizer(factory(), tfhfp8.Policy(optimizer_states="float16"))
    low.apply(grads, low_model.trainable_variables)

    slots = low.slots()
    assert len(slots) == slots_per_weight * len(low_model.trainable_variables)
    reference = plain.variables[2:]  # after the step counter and the learning rate
    assert [v.name for v in plain.variables[:2]] == ["iteration", "learning_rate"]
    assert len(reference) == len(slots)
    # Only the bias before BatchNormalization gets no gradient (its slots stay 0).
    assert sum(np.any(s.numpy() != 0) for s in slots) == len(slots) - slots_per_weight
    for slot, ref in zip(slots, reference):
        # One step: the slot is ml_dtypes/numpy's float16 of the FP32 optimizer's slot.
        np.testing.assert_array_equal(slot.numpy(), F16(ref.numpy()), err_msg=slot.path)
    # Master weights not named: the weights are the FP32 optimizer's.
    for a, b in zip(low_model.trainable_variables, plain_model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_states_and_weights_stay_in_the_format_while_training():
    policy = tfhfp8.Policy(master_weights="bfloat16", optimizer_states="float16_e6m9",
                           rounding={"master_weights": "stochastic",
                                     "optimizer_states": "stochastic"})
    model = _model()
    optimizer = LowPrecisionOptimizer(keras.optimizers.Adam(1e-2), policy)
    model.compile(optimizer, "mse")
    model.fit(*_data(), batch_size=4, epochs=2, verbose=0)
    e6m9 = R.Spec(6, 9, 31, "ieee")
    for slot in optimizer.slots():
        values = slot.numpy().ravel()
        assert np.array_equal(values, R.round_array(values, e6m9)), slot.path
    for weight in model.trainable_variables:  # BatchNormalization's included
        values = weight.numpy()
        assert np.array_equal(values, values.astype(tf.bfloat16.as_numpy_dtype)
                              .astype(np.float32)), weight.path


def _kahan_run(rounding, steps=16):
    """A weight of 1.0 in FP16, SGD(1.0) with the gradient -2^-12 every step: each
    update is a quarter of the weight's ulp (2^-10), below half an ulp."""
    policy = tfhfp8.Policy(weights="float16", master_weights="float16",
                           rounding={"master_weights": rounding})
    layer = tfhfp8.layers.Dense(1, use_bias=False, kernel_initializer="ones", policy=policy)
    layer.build((None, 1))
    optimizer = LowPrecisionOptimizer(keras.optimizers.SGD(1.0), policy)
    gradient = tf.constant([[-2.0**-12]])
    values = []
    for _ in range(steps):
        optimizer.apply([gradient], [layer.kernel])
        values.append(float(layer.kernel.numpy()[0, 0]))
    return values, optimizer, layer


def test_kahan_recovers_updates_that_nearest_rounding_loses():
    nearest, _, _ = _kahan_run("nearest_even")
    assert nearest == [1.0] * 16  # every update lost
    kahan, optimizer, layer = _kahan_run("kahan")
    (compensation,) = optimizer._compensations
    for step, value in enumerate(kahan, 1):
        assert _in_float16(value)
    # Weight + compensation is the exact sum, and the weight is within half an ulp.
    exact = Fraction(1) + 16 * Fraction(1, 2**12)
    total = Fraction(kahan[-1]) + Fraction(float(compensation.numpy()[0, 0]))
    assert total == exact
    assert kahan[-1] == float(exact)  # 1 + 2^-8 is an FP16 value
    assert kahan[1] == 1.0 and kahan[2] == 1.0 + 2.0**-10  # 3 quarters round up


def _trained(policy, factory=lambda: keras.optimizers.SGD(0.05, momentum=0.9)):
    model = _model(policy)
    model.compile(LowPrecisionOptimizer(factory(), policy), "mse")
    model.fit(*_data(), batch_size=4, epochs=1, verbose=0)
    return model


POLICY = tfhfp8.Policy(weights="float8_e4m3b11fnuz", errors="float8_e5m2",
                       master_weights="float16", optimizer_states="float16",
                       rounding={"master_weights": "kahan", "optimizer_states": "stochastic",
                                 "errors": "stochastic"})


def _state(model):
    return [v.numpy() for v in model.optimizer.variables + model.weights]


def test_state_survives_save_and_load_bit_for_bit(tmp_path):
    model = _trained(POLICY)
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored.optimizer, LowPrecisionOptimizer)
    assert restored.optimizer.policy == POLICY
    assert restored.optimizer.get_config() == model.optimizer.get_config()
    for a, b in zip(_state(model), _state(restored)):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(c.numpy() != 0) for c in restored.optimizer._compensations)
    # Training on from either gives the same bits (stochastic seeds from saved counters).
    x, y = _data(1)
    for m in (model, restored):
        m.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(_state(model), _state(restored)):
        np.testing.assert_array_equal(a, b)


def test_state_survives_tf_train_checkpoint(tmp_path):
    model = _trained(POLICY)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
        str(tmp_path / "ckpt"))
    fresh = _model(POLICY, seed=5)
    fresh.compile(LowPrecisionOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), POLICY), "mse")
    fresh.optimizer.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).read(path).assert_consumed()
    for a, b in zip(_state(model), _state(fresh)):
        np.testing.assert_array_equal(a, b)


def test_loss_scale_optimizer_around_it_skips_the_whole_step():
    policy = tfhfp8.Policy(master_weights="float16", optimizer_states="float16",
                           rounding={"master_weights": "kahan"})
    model = _model()
    optimizer = keras.optimizers.LossScaleOptimizer(
        LowPrecisionOptimizer(keras.optimizers.SGD(0.1, momentum=0.9), policy))
    variables = model.trainable_variables
    optimizer.build(variables)
    before = [v.numpy() for v in optimizer.variables + variables]
    optimizer.apply([tf.fill(v.shape, np.inf) for v in variables], variables)
    after = [v.numpy() for v in optimizer.variables + variables]
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if not np.array_equal(a, b)]
    assert len(changed) == 1  # only the halved loss scale
    optimizer.apply([tf.ones(v.shape) * 1e-3 for v in variables], variables)
    assert int(optimizer.iterations.numpy()) == 1
    assert all(_in_float16(v.numpy()) for v in variables)


def test_bad_arguments_are_clear_errors():
    policy = tfhfp8.Policy(optimizer_states="float16")
    with pytest.raises(TypeError, match="optimizer must be a keras.optimizers.Optimizer"):
        LowPrecisionOptimizer("sgd", policy)
    with pytest.raises(ValueError, match="wrap the low-precision optimizer in it"):
        LowPrecisionOptimizer(keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()), policy)
    with pytest.raises(ValueError, match="policy must name optimizer_states or master_weights"):
        LowPrecisionOptimizer(keras.optimizers.SGD(), tfhfp8.Policy(weights="float16"))
    with pytest.raises(ValueError, match="set it on the wrapped optimizer"):
        LowPrecisionOptimizer(keras.optimizers.SGD(), policy, clipnorm=1.0)
    with pytest.raises(ValueError, match="optimizer_states"):
        tfhfp8.Policy(optimizer_states="float16", rounding={"optimizer_states": "kahan"})
    with pytest.raises(ValueError, match="master_weights only"):
        tfhfp8.Policy(master_weights="float16", rounding="kahan")
    # Kahan needs the optimizer's buffers: a plain optimizer fails before any update.
    kahan = tfhfp8.Policy(master_weights="float16", rounding={"master_weights": "kahan"})
    model = _model(kahan)
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.build((None, 6))
    weights = [w.numpy() for w in model.weights]
    with pytest.raises(ValueError, match="LowPrecisionOptimizer"):
        model.fit(*_data(), batch_size=4, epochs=1, verbose=0)
    for a, b in zip(weights, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_float16_e6m9_is_wangs_1_6_9_float():
    fmt = tfhfp8.formats.get("float16_e6m9")
    assert (fmt.bits, fmt.exponent_bits, fmt.mantissa_bits, fmt.bias) == (16, 6, 9, 31)
    assert Fraction(fmt.max) == (2 - Fraction(1, 2**9)) * 2**31
    assert Fraction(fmt.min_subnormal) == Fraction(1, 2**39)
    spec = R.Spec(6, 9, 31, "ieee")  # from the paper's field widths, not from fmt
    rng = np.random.default_rng(0)
    x = (rng.normal(size=3000) * 2.0 ** rng.integers(-45, 36, size=3000)).astype("float32")
    got = tfhfp8.quantize(tf.constant(x), fmt, saturate=True).numpy()
    np.testing.assert_array_equal(got, R.round_array(x, spec, saturate=True).astype("float32"))


def test_mirrored_strategy_keeps_replicas_identical_and_in_format():
    script = textwrap.dedent("""
        import numpy as np, keras, tensorflow as tf, tfhfp8
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        policy = tfhfp8.Policy(master_weights="float16", optimizer_states="float16",
                               rounding={"master_weights": "kahan", "optimizer_states": "stochastic"})
        with strategy.scope():
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(4)])
            optimizer = tfhfp8.optimizers.LowPrecisionOptimizer(keras.optimizers.Adam(1e-2), policy)
            model.compile(optimizer, "mse")
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(64, 8)).astype("float32"), rng.normal(size=(64, 4)).astype("float32")
        model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        f16 = lambda a: a.astype(np.float16).astype(np.float32)
        checked = 0
        for v in optimizer.slots() + list(optimizer._compensations) + model.trainable_variables:
            values = [t.numpy() for t in strategy.experimental_local_results(v.value)]
            assert len(values) == 2 and np.array_equal(values[0], values[1]), v.path
            assert np.array_equal(values[0], f16(values[0])), v.path
            checked += 1
        assert int(optimizer.iterations.numpy()) == 8
        print("OK", checked)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 16" in result.stdout


def test_low_precision_is_a_deprecated_alias_and_old_configs_load():
    with pytest.warns(DeprecationWarning, match="LowPrecisionOptimizer"):
        alias = tfhfp8.optimizers.LowPrecision
    assert alias is tfhfp8.optimizers.LowPrecisionOptimizer
    policy = tfhfp8.Policy(optimizer_states="bfloat16", master_weights="float16")
    optimizer = tfhfp8.optimizers.LowPrecisionOptimizer(keras.optimizers.SGD(0.1), policy)
    config = keras.saving.serialize_keras_object(optimizer)
    assert config["registered_name"] == "tfhfp8>LowPrecisionOptimizer"
    # What files saved before the rename hold.
    old = dict(config, class_name="LowPrecision", registered_name="tfhfp8>LowPrecision")
    restored = keras.saving.deserialize_keras_object(old)
    assert type(restored) is tfhfp8.optimizers.LowPrecisionOptimizer
    assert restored.policy == policy
    assert type(restored.inner_optimizer) is keras.optimizers.SGD
