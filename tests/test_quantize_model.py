"""tfhfp8.quantize_model and tfhfp8.summary on functional, nested, CNN and Transformer models."""

import keras
import numpy as np
import pytest
from keras import layers

import tfhfp8
from tfhfp8 import layers as tl


def all_layers(model):
    return list(tfhfp8.layers.walk(model))


def snapshot(model):
    """(name, exact class, weights) of every layer, nested models flattened."""
    return [(layer.name, type(layer), [w.copy() for w in layer.get_weights()])
            for layer in all_layers(model)]


def assert_unchanged(model, before):
    after = snapshot(model)
    assert [(n, c) for n, c, _ in after] == [(n, c) for n, c, _ in before]
    for (name, _, w1), (_, _, w2) in zip(before, after):
        assert len(w1) == len(w2), name
        for a, b in zip(w1, w2):
            np.testing.assert_array_equal(a, b, err_msg=name)
    for layer in all_layers(model):
        assert not isinstance(layer, tl.EmulatedLayer), layer.name


def assert_same_weights(source, target):
    ws, wt = source.get_weights(), target.get_weights()
    assert len(ws) == len(wt)
    for a, b in zip(ws, wt):
        np.testing.assert_array_equal(a, b)


def randomize(model, seed=0):
    """Non-trivial weights (biases and BN statistics included), seeded."""
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0.0, 0.4, size=w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    for layer in all_layers(model):
        if isinstance(layer, layers.BatchNormalization):
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))


# -- models -------------------------------------------------------------------------------
def residual_nested_shared_model():
    inputs = keras.Input((8,), name="x")
    first = layers.Dense(8, activation="relu", name="first")(inputs)
    shared = layers.Dense(8, activation="tanh", name="shared")
    h = shared(shared(first))  # one layer, two calls
    nested = keras.Sequential([keras.Input((8,)), layers.Dense(12, activation="relu", name="n1"),
                               layers.Dense(8, name="n2")], name="nested")
    h = nested(h)
    h = layers.Add(name="residual")([first, h])
    outputs = layers.Dense(3, name="head")(h)
    model = keras.Model(inputs, outputs, name="residual_model")
    randomize(model)
    return model


def mobilenet_v2_like(input_shape=(16, 16, 3), num_classes=5):
    def relu6(name):
        return layers.ReLU(6.0, name=name)

    inputs = keras.Input(input_shape)
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = layers.BatchNormalization(name="stem_bn")(x)
    x = relu6("stem_relu")(x)
    for i in range(2):  # inverted residual blocks with identity shortcut
        shortcut = x
        h = layers.Conv2D(24, 1, use_bias=False, name=f"b{i}_expand")(x)
        h = layers.BatchNormalization(name=f"b{i}_expand_bn")(h)
        h = relu6(f"b{i}_expand_relu")(h)
        h = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"b{i}_dw")(h)
        h = layers.BatchNormalization(name=f"b{i}_dw_bn")(h)
        h = relu6(f"b{i}_dw_relu")(h)
        h = layers.Conv2D(8, 1, use_bias=False, name=f"b{i}_project")(h)
        h = layers.BatchNormalization(name=f"b{i}_project_bn")(h)
        x = layers.Add(name=f"b{i}_add")([shortcut, h])
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="classifier")(x)
    model = keras.Model(inputs, outputs, name="mobilenet_v2_like")
    randomize(model, 1)
    return model


def transformer_encoder_like(vocab=40, length=10, dim=16, num_classes=3):
    inputs = keras.Input((length,), dtype="int32")
    x = layers.Embedding(vocab, dim, name="embed")(inputs)
    attention = layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(x, x)
    x = layers.LayerNormalization(name="ln1")(layers.Add(name="add1")([x, attention]))
    h = layers.Dense(32, activation="relu", name="ffn1")(x)
    h = layers.Dense(dim, name="ffn2")(h)
    x = layers.LayerNormalization(name="ln2")(layers.Add(name="add2")([x, h]))
    x = layers.GlobalAveragePooling1D(name="pool")(x)
    outputs = layers.Dense(num_classes, name="classifier")(x)
    model = keras.Model(inputs, outputs, name="encoder_like")
    randomize(model, 2)
    return model


def images(shape=(4, 16, 16, 3), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def tokens(shape=(4, 10), vocab=40, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=shape).astype("int32")


# -- the functional model with a residual, a nested Sequential and a shared layer ----------
def test_float32_policy_copy_is_identical():
    model = residual_nested_shared_model()
    before = snapshot(model)
    x = np.random.default_rng(0).normal(size=(6, 8)).astype("float32")
    y = model(x).numpy()
    converted = tfhfp8.quantize_model(model, "float32")
    assert converted is not model
    assert_same_weights(model, converted)
    np.testing.assert_array_equal(converted(x).numpy(), y)
    assert_unchanged(model, before)
    np.testing.assert_array_equal(model(x).numpy(), y)


def test_hfp8_conversion_of_residual_nested_shared_model():
    model = residual_nested_shared_model()
    before = snapshot(model)
    x = np.random.default_rng(0).normal(size=(6, 8)).astype("float32")
    y = model(x).numpy()
    converted = tfhfp8.quantize_model(model, "hfp8")
    assert_unchanged(model, before)
    assert_same_weights(model, converted)
    names = [layer.name for layer in all_layers(converted)]
    assert names == [layer.name for layer in all_layers(model)]
    for layer in all_layers(converted):
        if layer.name in ("first", "shared", "n1", "n2", "head"):
            assert type(layer) is tl.Dense, layer.name
    # The nested model is converted as a nested model, and the shared layer stays shared.
    nested = converted.get_layer("nested")
    assert isinstance(nested, keras.Sequential) and nested is not model.get_layer("nested")
    assert all(type(layer) is tl.Dense for layer in nested.layers)
    shared = converted.get_layer("shared")
    shared_config = [layer for layer in converted.get_config()["layers"]
                     if layer["config"]["name"] == shared.name]
    assert len(shared_config[0]["inbound_nodes"]) == 2  # called twice in the graph
    assert len(converted.weights) == len(model.weights)
    # First and last GEMM layers in 16 bits, the others hfp8.
    hfp8 = tfhfp8.Policy("hfp8")
    assert converted.get_layer("first").policy == hfp8.for_exempt_layer()
    assert converted.get_layer("head").policy == hfp8.for_exempt_layer()
    for name in ("shared", "n1", "n2"):
        layer = nested.get_layer(name) if name.startswith("n") else converted.get_layer(name)
        assert layer.policy == hfp8, name
    y8 = converted(x).numpy()
    assert np.all(np.isfinite(y8))
    assert not np.array_equal(y8, y)
    np.testing.assert_allclose(y8, y, atol=0.25 * np.abs(y).max())
    # Training the converted model changes only its weights.
    converted.compile(optimizer="sgd", loss="mse")
    converted.fit(x, np.zeros((6, 3), "float32"), epochs=1, verbose=0)
    assert_unchanged(model, before)


def test_converted_emulated_model_equals_one_built_from_tfhfp8_layers():
    """The converted model computes what the same model built from tfhfp8.layers does."""
    policy = tfhfp8.Policy("int16_dfp")
    model = keras.Sequential([keras.Input((8,)), layers.Dense(6, activation="relu", name="a"),
                              layers.Dense(4, name="b")])
    randomize(model, 3)
    built = keras.Sequential([keras.Input((8,)), tl.Dense(6, activation="relu", policy=policy),
                              tl.Dense(4, policy=policy)])
    built.set_weights(model.get_weights())
    x = np.random.default_rng(1).normal(size=(5, 8)).astype("float32")
    converted = tfhfp8.quantize_model(model, policy)
    np.testing.assert_array_equal(converted(x).numpy(), built(x).numpy())


# -- MobileNetV2- and Transformer-shaped models ---------------------------------------------
def test_mobilenet_v2_like():
    model = mobilenet_v2_like()
    before = snapshot(model)
    x = images()
    y = model(x, training=False).numpy()
    np.testing.assert_array_equal(
        tfhfp8.quantize_model(model, "float32")(x, training=False).numpy(), y)
    converted = tfhfp8.quantize_model(model, "hfp8")
    assert_unchanged(model, before)
    assert_same_weights(model, converted)
    expected = {layers.Conv2D: tl.Conv2D, layers.DepthwiseConv2D: tl.DepthwiseConv2D,
                layers.Dense: tl.Dense}
    for src, dst in zip(all_layers(model), all_layers(converted)):
        assert type(dst) is expected.get(type(src), type(src)), src.name
    assert converted.get_layer("stem").policy.name == "hfp8/exempt"
    assert converted.get_layer("classifier").policy.name == "hfp8/exempt"
    assert converted.get_layer("b0_dw").policy == tfhfp8.Policy("hfp8")
    y8 = converted(x, training=False).numpy()
    assert np.all(np.isfinite(y8)) and not np.array_equal(y8, y)
    np.testing.assert_allclose(y8, y, atol=0.3 * np.abs(y).max())
    rows = {row["layer"]: row for row in tfhfp8.summary(converted, print_fn=lambda *_: None)}
    assert rows["b0_expand_bn"]["note"] == "not a GEMM layer"
    assert rows["b0_dw_relu"]["note"] == "not a GEMM layer"
    assert rows["b1_dw"]["note"] == "emulated"
    assert "W:float8_e4m3b11fnuz" in rows["b1_dw"]["formats"]
    assert rows["stem"]["note"] == "first/last GEMM layer: 16 bits"


def test_transformer_encoder_like():
    model = transformer_encoder_like()
    before = snapshot(model)
    x = tokens()
    y = model(x).numpy()
    converted32 = tfhfp8.quantize_model(model, "float32")
    assert_same_weights(model, converted32)
    # Keras' MHA takes a fused attention kernel, the emulated one the explicit path.
    np.testing.assert_allclose(converted32(x).numpy(), y, rtol=1e-5, atol=1e-5)
    policy = tfhfp8.Policy("hfp8", exempt_first_last=False)
    converted = tfhfp8.quantize_model(model, policy)
    assert_unchanged(model, before)
    assert_same_weights(model, converted)
    mha = converted.get_layer("mha")
    assert type(mha) is tl.MultiHeadAttention and mha.policy == policy
    for projection in (mha.query_dense, mha.key_dense, mha.value_dense, mha.output_dense):
        assert type(projection) is tl.EinsumDense and projection.policy == policy
    # The input model's attention keeps plain Keras projections.
    for projection in (model.get_layer("mha").query_dense, model.get_layer("mha").output_dense):
        assert type(projection) is layers.EinsumDense
    assert type(converted.get_layer("embed")) is tl.Embedding
    assert type(converted.get_layer("ln1")) is layers.LayerNormalization
    assert type(converted.get_layer("ffn1")) is tl.Dense
    y8 = converted(x).numpy()
    assert np.all(np.isfinite(y8)) and not np.array_equal(y8, y)
    np.testing.assert_allclose(y8, y, atol=0.3 * np.abs(y).max())
    # Trainable: one step runs and changes weights.
    converted.compile(optimizer=keras.optimizers.SGD(0.1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    w0 = converted.get_layer("ffn1").kernel.numpy().copy()
    converted.fit(x, np.array([0, 1, 2, 0]), epochs=1, verbose=0)
    assert not np.array_equal(converted.get_layer("ffn1").kernel.numpy(), w0)
    assert_unchanged(model, before)


# -- exemptions ------------------------------------------------------------------------------
def test_exempt_list_keeps_named_layers_plain_keras():
    model = residual_nested_shared_model()
    converted = tfhfp8.quantize_model(model, "hfp8", exempt=["first", "n1"])
    assert type(converted.get_layer("first")) is layers.Dense
    assert type(converted.get_layer("nested").get_layer("n1")) is layers.Dense
    # An explicit list replaces the preset's first/last choice: the head is hfp8.
    assert converted.get_layer("head").policy == tfhfp8.Policy("hfp8")
    assert converted.get_layer("shared").policy == tfhfp8.Policy("hfp8")
    assert_same_weights(model, converted)
    rows = {row["layer"]: row for row in tfhfp8.summary(converted, print_fn=lambda *_: None)}
    assert rows["first"]["note"] == "exempt (kept in FP32)"
    assert rows["n1"]["note"] == "exempt (kept in FP32)"
    assert rows["first"]["formats"] == "float32"
    # An empty list exempts nothing at all.
    none = tfhfp8.quantize_model(model, "hfp8", exempt=[])
    assert all(layer.policy == tfhfp8.Policy("hfp8") for layer in all_layers(none)
               if isinstance(layer, tl.EmulatedLayer))


def test_exempt_unknown_name_raises():
    model = residual_nested_shared_model()
    with pytest.raises(ValueError, match="no_such_layer"):
        tfhfp8.quantize_model(model, "hfp8", exempt=["first", "no_such_layer"])


@pytest.mark.parametrize("preset", ["hfp8", "fp8"])
def test_preset_first_last_exemption(preset):
    model = mobilenet_v2_like()
    converted = tfhfp8.quantize_model(model, preset)
    gemm = [layer for layer in all_layers(converted) if isinstance(layer, tl.EmulatedLayer)]
    assert [layer.name for layer in gemm][0] == "stem"
    assert gemm[-1].name == "classifier"
    for layer in (gemm[0], gemm[-1]):
        policy = layer.policy
        assert policy.name == f"{preset}/exempt"
        for role in ("weights", "activations", "errors"):
            assert policy.formats[role].name == "float16", (layer.name, role)
    for layer in gemm[1:-1]:
        assert layer.policy == tfhfp8.Policy(preset), layer.name
    rows = {row["layer"]: row for row in tfhfp8.summary(converted, print_fn=lambda *_: None)}
    # The exempt layer keeps the preset's roundings (fp8: stochastic errors).
    assert rows["stem"]["formats"] == "W:float16 A:float16 E:float16" + (
        "/sr" if preset in ("fp8", "hfp8") else "")
    assert rows["classifier"]["note"] == "first/last GEMM layer: 16 bits"


@pytest.mark.parametrize("preset", ["float32", "bfloat16", "int16_dfp"])
def test_presets_without_first_last_exemption(preset):
    converted = tfhfp8.quantize_model(mobilenet_v2_like(), preset)
    for layer in all_layers(converted):
        if isinstance(layer, tl.EmulatedLayer):
            assert layer.policy == tfhfp8.Policy(preset), layer.name


# -- summary -----------------------------------------------------------------------------------
def test_summary_reports_unsupported_layers():
    inputs = keras.Input((5, 4))
    x = layers.LSTM(6, return_sequences=True, name="lstm")(inputs)
    x = layers.GRU(3, name="gru")(x)
    x = layers.Dense(4, name="dense")(x)
    x = layers.BatchNormalization(name="bn")(x)
    outputs = layers.Dense(2, name="out")(x)
    model = keras.Model(inputs, outputs)
    randomize(model, 4)
    converted = tfhfp8.quantize_model(model, "bfloat16")
    assert_same_weights(model, converted)
    assert type(converted.get_layer("lstm")) is layers.LSTM
    printed = []
    rows = tfhfp8.summary(converted, print_fn=printed.append)
    by_name = {row["layer"]: row for row in rows}
    assert list(by_name) == ["lstm", "gru", "dense", "bn", "out"]
    for name, kind in (("lstm", "LSTM"), ("gru", "GRU")):
        assert by_name[name]["type"] == kind
        assert by_name[name]["formats"] == "float32"
        assert "unsupported layer type" in by_name[name]["note"] and kind in by_name[name]["note"]
    assert by_name["dense"]["note"] == "emulated"
    assert by_name["dense"]["policy"] == "bfloat16"
    assert by_name["dense"]["formats"] == "W:bfloat16 A:bfloat16 E:bfloat16"
    assert by_name["bn"]["note"] == "not a GEMM layer" and by_name["bn"]["policy"] == "-"
    text = "\n".join(printed)
    assert "unsupported layer type LSTM" in text and "layer" in printed[0]
    assert len(printed) == 2 + len(rows)
    # On the original model: supported layers are reported as not converted.
    original = {row["layer"]: row for row in tfhfp8.summary(model, print_fn=lambda *_: None)}
    assert original["dense"]["formats"] == "float32"
    x = np.random.default_rng(0).normal(size=(3, 5, 4)).astype("float32")
    assert np.all(np.isfinite(converted(x).numpy()))


def test_summary_shows_roundings():
    converted = tfhfp8.quantize_model(mobilenet_v2_like(), "fp8")
    rows = {row["layer"]: row for row in tfhfp8.summary(converted, print_fn=lambda *_: None)}
    assert rows["b0_expand"]["formats"] == ("W:float8_e5m2 A:float8_e5m2 E:float8_e5m2/sr "
                                            "G:float8_e5m2/sr M:float16/sr")


# -- models it cannot convert -------------------------------------------------------------------
class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = layers.Dense(3)

    def call(self, x):
        return self.dense(x)


def test_subclassed_model_raises_type_error():
    model = Subclassed()
    model(np.ones((2, 4), "float32"))
    with pytest.raises(TypeError, match="subclassed"):
        tfhfp8.quantize_model(model, "hfp8")


def test_not_a_model_or_not_built():
    with pytest.raises(TypeError, match="keras.Model"):
        tfhfp8.quantize_model(layers.Dense(3), "hfp8")
    unbuilt = keras.Sequential([layers.Dense(3)])
    with pytest.raises(ValueError, match="not built"):
        tfhfp8.quantize_model(unbuilt, "hfp8")


def test_sequential_top_level_and_unknown_policy():
    model = keras.Sequential([keras.Input((4,)), layers.Dense(3), layers.Dense(2)])
    converted = tfhfp8.quantize_model(model, "int16_dfp")
    assert isinstance(converted, keras.Sequential)
    assert [type(layer) for layer in converted.layers] == [tl.Dense, tl.Dense]
    with pytest.raises(ValueError, match="hfp9"):
        tfhfp8.quantize_model(model, "hfp9")


# -- converting an emulated model to another policy (issue 11) --------------------------------

def _policies(model):
    return {layer.name: layer.policy.name for layer in all_layers(model)
            if isinstance(layer, tl.EmulatedLayer)}


@pytest.mark.parametrize("source_policy", [
    "hfp8", tfhfp8.Policy("hfp8", loss_scaling="adaptive"),
    tfhfp8.Policy("fp8", loss_scaling="absmax")])
@pytest.mark.parametrize("target", ["bfloat16", "float32", "fp8",
                                    tfhfp8.Policy("int16_dfp", loss_scaling="adaptive")])
def test_emulated_model_converts_to_another_policy(source_policy, target):
    model = residual_nested_shared_model()
    emulated = tfhfp8.quantize_model(model, source_policy)
    x = np.random.default_rng(0).normal(size=(6, 8)).astype("float32")
    y = np.random.default_rng(1).integers(0, 3, 6)
    emulated.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    emulated.fit(x, y, epochs=1, verbose=0)  # weights and loss-scaling state move
    before = snapshot(emulated)

    converted = tfhfp8.quantize_model(emulated, target)
    direct = tfhfp8.quantize_model(model, target)  # the FP32 model converted
    assert _policies(converted) == _policies(direct)
    target_policy = tfhfp8.policy.get(target)
    for layer in all_layers(converted):
        if isinstance(layer, tl.EmulatedLayer):
            expected = set(layer.GEMMS) if (target_policy.loss_scaling is not None and
                                            layer.policy.errors is not None) else set()
            assert {gemm for gemm, state in layer.error_state.items() if state} == expected
    for src, dst in zip(tfhfp8.conversion.model_weights(emulated),
                        tfhfp8.conversion.model_weights(direct)):
        dst.assign(src)
    np.testing.assert_array_equal(converted(x).numpy(), direct(x).numpy())
    # The weights are the emulated model's, which is unchanged.
    assert [w.numpy().tolist() for w in tfhfp8.conversion.model_weights(converted)] == [
        w.numpy().tolist() for w in tfhfp8.conversion.model_weights(emulated)]
    after = snapshot(emulated)
    for (name, cls, w1), (_, cls2, w2) in zip(before, after):
        assert cls is cls2
        for a, b in zip(w1, w2):
            np.testing.assert_array_equal(a, b, err_msg=name)


def test_emulated_layers_in_exempt_become_keras_layers_again():
    emulated = tfhfp8.quantize_model(residual_nested_shared_model(), "hfp8")
    converted = tfhfp8.quantize_model(emulated, "bfloat16", exempt=["shared"])
    classes = {layer.name: type(layer) for layer in all_layers(converted)}
    assert classes["shared"] is layers.Dense and classes["n1"] is tl.Dense
    assert set(_policies(converted).values()) == {"bfloat16"}


def test_exemptions_are_data_on_the_policy():
    hfp8 = tfhfp8.Policy("hfp8")
    exempt = hfp8.for_exempt_layer()
    assert exempt.exempt_of == "hfp8" and hfp8.exempt_of is None
    # Saved and reloaded with the policy's config.
    assert tfhfp8.Policy.from_config(exempt.get_config()).exempt_of == "hfp8"
    assert "exempt_of" not in hfp8.get_config()
    # Configs saved before the field existed said it in the name only.
    legacy = exempt.get_config()
    del legacy["exempt_of"]
    assert tfhfp8.Policy.from_config(legacy).exempt_of == "hfp8"
    # summary reads the data, not the name.
    inputs = keras.Input((4,))
    x = tfhfp8.layers.Dense(3, name="renamed", policy=tfhfp8.Policy(
        "my_policy", weights="float16", activations="float16", exempt_of="hfp8"))(inputs)
    y = tfhfp8.layers.Dense(2, name="plain", policy=tfhfp8.Policy(
        "looks/exempt", weights="float16", activations="float16"))(x)
    rows = {row["layer"]: row for row in tfhfp8.summary(keras.Model(inputs, y),
                                                        print_fn=lambda line: None)}
    assert rows["renamed"]["note"] == "first/last GEMM layer: 16 bits"
    assert rows["plain"]["note"] == "emulated"
    with pytest.raises(TypeError, match="exempt_of"):
        tfhfp8.Policy("hfp8", exempt_of=3)
