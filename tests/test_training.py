"""Training with emulated layers: saving, distribution, tf.function, XLA, callbacks,
master weights, and an end-to-end accuracy check on scikit-learn digits."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

import tfhfp8
from tfhfp8 import layers as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, timeout=240):
    """Runs `code` in a fresh Python process (repository on the path); returns stdout."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result.stdout


def is_float16(values):
    values = np.asarray(values)
    return np.array_equal(values.astype(np.float16).astype(values.dtype), values)


# -- models ----------------------------------------------------------------------------------
def conv_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = layers.BatchNormalization(name="bn")(x)
    x = layers.ReLU(name="relu")(x)
    x = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = layers.SeparableConv2D(12, 3, padding="same", activation="relu", name="sep")(x)
    x = layers.Conv2DTranspose(6, 3, strides=2, padding="same", name="up")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    x = layers.Dense(16, activation="relu", name="fc")(x)
    outputs = layers.Dense(10, name="classifier")(x)
    return keras.Model(inputs, outputs, name="conv_model")


def attention_model(seed=0, vocab=30, length=7):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((length,), dtype="int32")
    x = layers.Embedding(vocab, 16, name="embed")(inputs)
    h = layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(x, x)
    x = layers.LayerNormalization(name="ln")(layers.Add()([x, h]))
    x = layers.EinsumDense("btd,de->bte", output_shape=(None, 16), bias_axes="e",
                           name="einsum")(x)
    x = layers.Conv1D(8, 3, padding="causal", name="conv1d")(x)
    x = layers.GlobalAveragePooling1D()(x)
    outputs = layers.Dense(3, name="classifier")(x)
    return keras.Model(inputs, outputs, name="attention_model")


def images(n=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 8, 8, 1)).astype("float32")


def token_ids(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, 30, size=(n, 7)).astype("int32")


def compile_model(model, jit_compile=False, lr=0.01):
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    return model


# -- saving ------------------------------------------------------------------------------------
def test_save_and_load_in_a_new_process(tmp_path):
    custom = tfhfp8.Policy("hfp8", errors="float8_e5m2fnuz", exempt_first_last=False)
    models = {
        "conv": (tfhfp8.quantize_model(conv_model(), "hfp8"), images()),
        "attention": (tfhfp8.quantize_model(attention_model(), custom), token_ids()),
    }
    expected = {}
    for name, (model, x) in models.items():
        compile_model(model)
        model.fit(x, np.arange(len(x)) % 3, epochs=1, batch_size=8, verbose=0)  # state to save
        model.save(tmp_path / f"{name}.keras")
        np.save(tmp_path / f"{name}_x.npy", x)
        expected[name] = model.predict(x, verbose=0)
        policies = {layer.name: layer.policy for layer in model.layers
                    if isinstance(layer, tl.EmulatedLayer)}
        expected[name + "_policies"] = {k: tfhfp8.policy.serialize(v) for k, v in policies.items()}

    out = run_python(f"""
        import json, numpy as np, keras, tfhfp8
        from tfhfp8 import layers as tl
        report = {{}}
        for name in ("conv", "attention"):
            model = keras.saving.load_model({str(tmp_path)!r} + f"/{{name}}.keras")
            x = np.load({str(tmp_path)!r} + f"/{{name}}_x.npy")
            np.save({str(tmp_path)!r} + f"/{{name}}_y.npy", model.predict(x, verbose=0))
            report[name] = {{layer.name: [type(layer).__module__ + "." + type(layer).__name__,
                                          tfhfp8.policy.serialize(layer.policy)]
                             for layer in model.layers if isinstance(layer, tl.EmulatedLayer)}}
            report[name + "_iterations"] = int(model.optimizer.iterations.numpy())
            if name == "attention":
                mha = model.get_layer("mha")
                report["projections"] = [type(p).__module__ for p in
                                         (mha.query_dense, mha.key_dense, mha.value_dense,
                                          mha.output_dense)]
        print("REPORT" + json.dumps(report))
    """)
    import json
    report = json.loads(out.split("REPORT", 1)[1])
    for name, (model, x) in models.items():
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}_y.npy"), expected[name])
        loaded = report[name]
        assert set(loaded) == set(expected[name + "_policies"])
        for layer_name, (cls, policy) in loaded.items():
            assert cls.startswith("tfhfp8.layers."), (layer_name, cls)
            assert policy == expected[name + "_policies"][layer_name], layer_name
        assert report[name + "_iterations"] == 2
    assert report["projections"] == ["tfhfp8.layers.einsum_dense"] * 4
    assert "float8_e5m2fnuz" in str(report["attention"]["mha"][1])


# -- distribution ------------------------------------------------------------------------------
def test_mirrored_strategy_two_cpu_replicas():
    out = run_python("""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, tfhfp8
        from tfhfp8 import layers as tl
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        keras.utils.set_random_seed(0)
        with strategy.scope():
            inputs = keras.Input((8, 8, 1))
            x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
            x = keras.layers.DepthwiseConv2D(3)(x)
            x = keras.layers.Flatten()(x)
            x = keras.layers.Dense(16, activation="relu")(x)
            outputs = keras.layers.Dense(10)(x)
            model = tfhfp8.quantize_model(keras.Model(inputs, outputs), "hfp8", exempt=[])
            model.compile(optimizer=keras.optimizers.SGD(0.05),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 8, 8, 1)).astype("float32")
        y = rng.integers(0, 10, size=32)
        before = [w.numpy().copy() for w in model.trainable_weights]
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        after = [w.numpy() for w in model.trainable_weights]
        losses = history.history["loss"]
        assert all(np.isfinite(losses)), losses
        assert all(not np.array_equal(a, b) for a, b in zip(before, after))
        # Master weights in float16 on the mirrored variables.
        for w in after:
            assert np.array_equal(w.astype(np.float16).astype(np.float32), w)
        assert int(model.optimizer.iterations.numpy()) == 4
        assert all(isinstance(l, tl.EmulatedLayer) for l in model.layers
                   if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense,
                                     keras.layers.DepthwiseConv2D)))
        print("MIRRORED_OK", losses)
    """)
    assert "MIRRORED_OK" in out


# -- tf.function, unknown batch size -------------------------------------------------------------
@pytest.mark.parametrize("preset", ["hfp8", "int16_dfp"])
def test_tf_function_with_unknown_batch_size(preset):
    # Round to nearest: stochastic rounding (hfp8's errors) draws new bits at every call,
    # so the eager and the traced call would not compare.
    policy = tfhfp8.Policy(preset, rounding="nearest_even")
    conv = tfhfp8.quantize_model(conv_model(), policy)
    attention = tfhfp8.quantize_model(attention_model(), policy)

    def step(model, x):
        with tf.GradientTape() as tape:
            y = model(x, training=False)
            loss = tf.reduce_sum(y * y)
        return y, [tf.convert_to_tensor(g)  # Embedding: IndexedSlices
                   for g in tape.gradient(loss, model.trainable_weights)]

    for model, spec, data in (
            (conv, tf.TensorSpec([None, 8, 8, 1], tf.float32), images),
            (attention, tf.TensorSpec([None, None], tf.int32), token_ids)):
        traced = tf.function(lambda x, m=model: step(m, x), input_signature=[spec])
        concrete = traced.get_concrete_function()
        assert concrete.structured_outputs[0].shape[0] is None
        for n in (3, 5):
            x = data(n, seed=n)
            y_eager, g_eager = step(model, tf.constant(x))
            y_graph, g_graph = traced(tf.constant(x))
            assert y_graph.shape[0] == n
            np.testing.assert_allclose(y_graph.numpy(), y_eager.numpy(), rtol=1e-5, atol=1e-6)
            # Graph and eager may accumulate in different orders, and a last-bit
            # difference can move an intermediate across a rounding boundary.
            for a, b in zip(g_graph, g_eager):
                b = b.numpy()
                np.testing.assert_allclose(a.numpy(), b, rtol=1e-3,
                                           atol=1e-3 * np.abs(b).max() + 1e-6)
        if model is attention:  # and a different sequence length
            y, _ = traced(tf.constant(token_ids(2)[:, :5]))
            assert y.shape == (2, 3)


# -- XLA -------------------------------------------------------------------------------------------
def small_conv_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = layers.DepthwiseConv2D(3, name="dw")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(16, activation="relu", name="fc")(x)
    outputs = layers.Dense(10, name="classifier")(x)
    return keras.Model(inputs, outputs)


def test_jit_compile_trains():
    """fp8 (stochastic rounding of errors, gradients and the update) under XLA."""
    x, y = images(32, seed=1), np.arange(32) % 10
    base = small_conv_model(seed=3)
    jitted = compile_model(tfhfp8.quantize_model(base, "fp8", exempt=[]), jit_compile=True)
    assert jitted.jit_compile
    # The forward pass (round to nearest even) under XLA, TF-ops backend, matches the
    # eager one up to accumulation order.
    predict = tf.function(lambda t: jitted(t, training=False), jit_compile=True)
    np.testing.assert_allclose(predict(tf.constant(x)).numpy(),
                               jitted(x, training=False).numpy(), rtol=1e-4, atol=1e-4)
    w0 = [w.numpy().copy() for w in jitted.trainable_weights]
    history = jitted.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert all(not np.array_equal(a, b.numpy()) for a, b in zip(w0, jitted.trainable_weights))
    for layer in jitted.layers:
        if isinstance(layer, tl.EmulatedLayer):
            for w in layer.trainable_weights:
                assert is_float16(w.numpy()), w.path


# -- callbacks -------------------------------------------------------------------------------------
def test_keras_callbacks(tmp_path):
    model = compile_model(tfhfp8.quantize_model(conv_model(seed=4), "hfp8"), lr=0.05)
    x, y = images(48, seed=2), np.arange(48) % 10
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=0, min_delta=1e9,
                                         restore_best_weights=True)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "best.keras"),
                                                 monitor="val_loss", save_best_only=True)
    seen = []
    logger = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(logs))
    history = model.fit(x, y, validation_split=0.25, batch_size=12, epochs=10, verbose=0,
                        callbacks=[stop, checkpoint, logger])
    assert isinstance(history, keras.callbacks.History)
    # min_delta is unreachable: it stops after patience + 1 epochs.
    assert len(history.history["loss"]) == 2 == len(seen)
    assert stop.stopped_epoch == 1
    assert set(history.history) >= {"loss", "val_loss"}
    assert np.all(np.isfinite(history.history["val_loss"]))
    best = keras.saving.load_model(tmp_path / "best.keras")
    assert type(best.get_layer("dw")) is tl.DepthwiseConv2D
    np.testing.assert_array_equal(best.predict(x, verbose=0), model.predict(x, verbose=0))


# -- master weights ----------------------------------------------------------------------------------
def emulated_weights(model):
    return [(layer.name, w) for layer in model.layers if isinstance(layer, tl.EmulatedLayer)
            for w in layer.trainable_weights]


def test_master_weights_after_optimizer_apply():
    model = tfhfp8.quantize_model(conv_model(seed=5), "fp8", exempt=[])
    weights = emulated_weights(model)
    assert weights and not all(is_float16(w.numpy()) for _, w in weights)  # FP32 copies
    optimizer = keras.optimizers.Adam(1e-3)
    x = tf.constant(images(8))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(model(x, training=True) ** 2)
    variables = model.trainable_weights
    optimizer.apply(tape.gradient(loss, variables), variables)
    for name, w in weights:
        assert is_float16(w.numpy()), (name, w.path)
    # Layers that are not emulated (BatchNormalization) keep FP32 master weights.
    gamma = model.get_layer("bn").gamma.numpy()
    assert not isinstance(model.get_layer("bn"), tl.EmulatedLayer)
    assert gamma.dtype == np.float32


def test_master_weights_after_one_fit_step():
    model = compile_model(tfhfp8.quantize_model(attention_model(seed=6), "fp8", exempt=[]))
    mha = model.get_layer("mha")
    names = {w.path for w in mha.trainable_weights}
    assert any("query" in n for n in names)
    model.fit(token_ids(8), np.arange(8) % 3, batch_size=8, epochs=1, verbose=0)
    weights = emulated_weights(model)
    assert len(weights) >= 14  # embedding, 4 projections x 2, einsum x 2, conv1d x 2, dense x 2
    for name, w in weights:
        assert is_float16(w.numpy()), (name, w.path)


def test_hfp8_master_weights_are_float16_and_policy_default_fp32():
    model = compile_model(tfhfp8.quantize_model(conv_model(seed=7), "hfp8", exempt=[]))
    model.fit(images(8), np.arange(8), batch_size=8, epochs=1, verbose=0)
    for name, w in emulated_weights(model):
        assert is_float16(w.numpy()), name
    plain = compile_model(tfhfp8.quantize_model(conv_model(seed=7), "bfloat16"))
    plain.fit(images(8), np.arange(8), batch_size=8, epochs=1, verbose=0)
    assert not all(is_float16(w.numpy()) for _, w in emulated_weights(plain))


# -- end to end: digits -----------------------------------------------------------------------------
def digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype("float32")[..., None]
    return train_test_split(x, data.target.astype("int32"), test_size=0.2, random_state=0,
                            stratify=data.target)


def digits_cnn():
    inputs = keras.Input((8, 8, 1))
    x = layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    outputs = layers.Dense(10)(x)
    return keras.Model(inputs, outputs)


def train_and_evaluate(model, data, epochs=6):
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(123)  # same shuffling for both runs
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)
    return model.evaluate(x_test, y_test, verbose=0)[1]


def test_digits_cnn_hfp8_matches_float32_accuracy():
    data = digits_split()
    keras.utils.set_random_seed(0)
    fp32 = digits_cnn()
    hfp8 = tfhfp8.quantize_model(fp32, "hfp8")  # same initial weights
    assert all(np.array_equal(a, b) for a, b in zip(fp32.get_weights(), hfp8.get_weights()))
    acc_hfp8 = train_and_evaluate(hfp8, data)
    acc_fp32 = train_and_evaluate(fp32, data)
    assert acc_fp32 > 0.93, acc_fp32
    assert abs(acc_hfp8 - acc_fp32) <= 0.02, (acc_hfp8, acc_fp32)
