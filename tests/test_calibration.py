"""tfhfp8.recalibrate_batchnorm and tfhfp8.callbacks.BatchNormRecalibration.

Exactness is checked against statistics computed independently: for each
BatchNormalization layer, a sub-model from the inputs to that layer's input runs in
inference mode over the same data and numpy takes the mean and population variance.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras
import tfhfp8
from tfhfp8 import calibration
from tfhfp8.callbacks import BatchNormRecalibration

BN = keras.layers.BatchNormalization
RTOL = 1e-4


def _randomize_batchnorm(model, seed=1):
    """BatchNorm statistics and affine parameters far from their initial values."""
    rng = np.random.default_rng(seed)
    for layer in tfhfp8.layers.walk(model, any_model=True):
        if isinstance(layer, BN):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 2, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.2, 5, c).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 2, c).astype("float32"))
            layer.beta.assign(rng.normal(0, 1, c).astype("float32"))
    return model


def residual_model(seed=0):
    """BatchNorm layers in sequence, on a residual branch, behind a Dropout."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same")(inputs)
    x = BN(name="bn_stem")(x)
    x = keras.layers.ReLU()(x)
    a = keras.layers.Conv2D(6, 3, padding="same")(x)
    a = BN(name="bn_a1")(a)
    a = keras.layers.Dropout(0.5)(a)
    a = BN(name="bn_a2")(a)
    a = keras.layers.DepthwiseConv2D(3, padding="same")(a)
    a = BN(name="bn_a3")(a)
    b = BN(name="bn_skip")(x)
    x = keras.layers.Add()([a, b])
    x = BN(name="bn_merge", axis=-1)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(8)(x)
    x = BN(name="bn_dense")(x)
    outputs = keras.layers.Dense(4)(x)
    return _randomize_batchnorm(keras.Model(inputs, outputs, name="residual"))


def nested_model(seed=0):
    """A Functional model and a Sequential model nested in a Functional model."""
    keras.utils.set_random_seed(seed)
    inner_in = keras.Input((8, 8, 4))
    y = keras.layers.Conv2D(4, 3, padding="same")(inner_in)
    y = BN(name="inner_bn1")(y)
    y = keras.layers.ReLU()(y)
    y = BN(name="inner_bn2")(y)
    inner = keras.Model(inner_in, keras.layers.Add()([y, inner_in]), name="inner")
    block = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(5, 1),
                              BN(name="seq_bn"), keras.layers.ReLU()], name="block")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = BN(name="outer_bn1")(x)
    x = inner(x)
    x = block(x)
    x = BN(name="outer_bn2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3)(x)
    return _randomize_batchnorm(keras.Model(inputs, outputs, name="nested"))


def images(n=90, seed=0, shape=(8, 8, 3)):
    rng = np.random.default_rng(seed)
    return (rng.normal(0.5, 1.5, size=(n,) + shape) + rng.uniform(-1, 1, size=(1,) + shape)
            ).astype("float32")


def _bn_input(model, bn, x):
    """The input of `bn` (inside nested models too) in inference mode, by sub-models."""
    for layer in model.layers:
        if layer is bn:
            return keras.Model(model.inputs, bn.input)(x, training=False).numpy()
        if isinstance(layer, keras.Model) and any(
                sub is bn for sub in tfhfp8.layers.walk(layer, any_model=True)):
            # (`Model.input` is the nested model's own input: take its call's input,
            # which the property of keras.Operation returns for any layer.)
            call_input = keras.Operation.input.fget(layer)
            inner_x = keras.Model(model.inputs, call_input)(x, training=False).numpy()
            return _bn_input(layer, bn, inner_x)
    raise AssertionError(f"{bn.name} not found")


def batchnorms(model):
    return [layer for layer in tfhfp8.layers.walk(model, any_model=True) if isinstance(layer, BN)]


def assert_exact(model, x):
    for bn in batchnorms(model):
        v = _bn_input(model, bn, x).astype(np.float64)
        axes = tuple(i for i in range(v.ndim) if i != bn.axis % v.ndim)
        mean, var = v.mean(axis=axes), v.var(axis=axes)
        np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=RTOL,
                                   atol=RTOL * np.abs(mean).max(), err_msg=bn.name)
        np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=RTOL,
                                   atol=RTOL * var.max(), err_msg=bn.name)


def _snapshot(model):
    return {v.path: v.numpy().copy() for v in model.weights}


def _assert_only_statistics_changed(before, model):
    changed = set()
    for v in model.weights:
        if not np.array_equal(before[v.path], v.numpy()):
            changed.add(v.path.split("/")[-1])
            assert v.path.endswith(("moving_mean", "moving_variance")), v.path
    assert changed == {"moving_mean", "moving_variance"}


@pytest.mark.parametrize("policy", ["float32", "hfp8"])
def test_exact_statistics_in_sequence_and_on_residual_branch(policy):
    model = tfhfp8.quantize_model(residual_model(), policy)
    x = images()
    before = _snapshot(model)
    out = calibration.recalibrate_batchnorm(model, x, batch_size=16, verbose=0)
    assert out is model
    _assert_only_statistics_changed(before, model)  # every other weight bit for bit
    assert_exact(model, x)


def test_exact_statistics_in_nested_models():
    model = tfhfp8.quantize_model(nested_model(), "hfp8")
    x = images()
    depths = {layer.name: d for layer, d in calibration.batchnorm_layers(model)}
    assert depths == {"outer_bn1": 0, "inner_bn1": 1, "inner_bn2": 2, "seq_bn": 3,
                      "outer_bn2": 4}
    before = _snapshot(model)
    calibration.recalibrate_batchnorm(model, (x, np.zeros(len(x))), batch_size=32,
                                      verbose=0)
    _assert_only_statistics_changed(before, model)
    assert_exact(model, x)


def test_sequential_model_and_progress_bar(capsys):
    keras.utils.set_random_seed(0)
    model = _randomize_batchnorm(keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(5), BN(), keras.layers.Dense(5), BN()]))
    x = np.random.default_rng(3).normal(2, 3, size=(50, 6)).astype("float32")
    calibration.recalibrate_batchnorm(model, x, batch_size=8)  # verbose=1
    assert "Re-calibrating 2 BatchNormalization" in capsys.readouterr().out
    assert_exact(model, x)


def test_all_data_kinds_give_the_same_statistics():
    x = images(70)
    reference = residual_model()
    calibration.recalibrate_batchnorm(reference, x, batch_size=20, verbose=0)
    expected = [bn.moving_mean.numpy() for bn in batchnorms(reference)]
    batches = [x[i:i + 20] for i in range(0, 70, 20)]
    kinds = {
        "tuple": (x, np.arange(70)),
        "dataset": tf.data.Dataset.from_tensor_slices((x, np.arange(70))).batch(20),
        "list": batches,
        "generator": (b for b in batches),
        "labelled batches": [(b, np.zeros(len(b))) for b in batches],
    }
    for name, data in kinds.items():
        model = residual_model()
        calibration.recalibrate_batchnorm(model, data, batch_size=20, verbose=0)
        for bn, mean in zip(batchnorms(model), expected):
            np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5,
                                       atol=1e-6, err_msg=f"{name}: {bn.name}")


def test_steps_limits_the_batches():
    x = images(80)
    limited = residual_model()
    calibration.recalibrate_batchnorm(
        limited, tf.data.Dataset.from_tensor_slices(x).batch(20).repeat(), steps=2,
        verbose=0)
    assert_exact(limited, x[:40])
    generator = residual_model()
    calibration.recalibrate_batchnorm(generator, (x[i:i + 10] for i in range(0, 80, 10)),
                                      steps=3, verbose=0)
    assert_exact(generator, x[:30])


def test_one_pass_equals_training_mode_statistics_on_one_batch():
    """one_pass on one batch = the batch statistics Keras computes in training mode."""
    x = images(40)
    model = residual_model()
    trained = residual_model()
    for layer in trained.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
        if isinstance(layer, BN):
            layer.momentum = 0.0
    trained(x, training=True)
    before = _snapshot(model)
    calibration.recalibrate_batchnorm(model, x, batch_size=40, mode="one_pass", verbose=0)
    _assert_only_statistics_changed(before, model)
    for bn, ref in zip(batchnorms(model), batchnorms(trained)):
        np.testing.assert_allclose(bn.moving_mean.numpy(), ref.moving_mean.numpy(),
                                   rtol=1e-4, atol=1e-5, err_msg=bn.name)
        np.testing.assert_allclose(bn.moving_variance.numpy(), ref.moving_variance.numpy(),
                                   rtol=1e-4, atol=1e-5, err_msg=bn.name)
    # Dropout stayed off: the run is deterministic.
    again = residual_model()
    calibration.recalibrate_batchnorm(again, x, batch_size=40, mode="one_pass", verbose=0)
    for a, b in zip(batchnorms(model), batchnorms(again)):
        np.testing.assert_array_equal(a.moving_variance.numpy(), b.moving_variance.numpy())


def test_one_pass_averages_batches_and_momentum_updates():
    x = images(40)
    model = residual_model()
    stem = model.get_layer("bn_stem")
    calibration.recalibrate_batchnorm(model, x, batch_size=10, mode="one_pass", verbose=0)
    v = keras.Model(model.inputs, stem.input)(x).numpy().astype(np.float64)
    batch_means = [v[i:i + 10].mean(axis=(0, 1, 2)) for i in range(0, 40, 10)]
    batch_vars = [v[i:i + 10].var(axis=(0, 1, 2)) for i in range(0, 40, 10)]
    np.testing.assert_allclose(stem.moving_mean.numpy(), np.mean(batch_means, 0), rtol=1e-5)
    np.testing.assert_allclose(stem.moving_variance.numpy(), np.mean(batch_vars, 0),
                               rtol=1e-5)

    model = residual_model()
    stem = model.get_layer("bn_stem")
    start_mean = stem.moving_mean.numpy().astype(np.float64)
    calibration.recalibrate_batchnorm(model, x, batch_size=20, mode="momentum",
                                      momentum=0.25, verbose=0)
    expected = start_mean
    for i in (0, 20):
        expected = expected * 0.25 + v[i:i + 20].mean(axis=(0, 1, 2)) * 0.75
    np.testing.assert_allclose(stem.moving_mean.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("when", ["train_end", "epoch_end"])
def test_callback_recalibrates_inside_fit(when):
    model = tfhfp8.quantize_model(residual_model(), "hfp8")
    x, y = images(64), np.random.default_rng(0).integers(0, 4, 64)
    model.compile(optimizer=keras.optimizers.SGD(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = BatchNormRecalibration(x, when=when, batch_size=32)
    kernel = model.layers[1].kernel.numpy().copy()
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[callback])
    assert callback.calls == (1 if when == "train_end" else 2)
    assert not np.array_equal(kernel, model.layers[1].kernel.numpy())  # it did train
    assert_exact(model, x)  # statistics of the final weights
    assert all("call" not in bn.__dict__ for bn in batchnorms(model))  # probes removed


# -- errors ----------------------------------------------------------------------------

def test_no_batchnorm_is_an_error():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no BatchNormalization layer"):
        calibration.recalibrate_batchnorm(model, np.zeros((4, 4), "float32"), verbose=0)


@pytest.mark.parametrize("data, message", [
    (np.zeros((0, 8, 8, 3), "float32"), "empty"),
    ([], "empty"),
    (iter([]), "empty"),
    (tf.data.Dataset.from_tensor_slices(np.zeros((0, 8, 8, 3), "float32")).batch(4), "empty"),
    (None, "missing"),
])
def test_empty_data_is_an_error(data, message):
    with pytest.raises(ValueError, match=message):
        calibration.recalibrate_batchnorm(residual_model(), data, verbose=0)


def test_wrong_shapes_are_errors_naming_the_shapes():
    model = residual_model()
    with pytest.raises(ValueError, match=r"batch 0 has shape \(10, 7, 8, 3\).*\(None, 8, 8, 3\)"):
        calibration.recalibrate_batchnorm(model, np.zeros((10, 7, 8, 3), "float32"), verbose=0)
    with pytest.raises(ValueError, match="unbatched"):
        calibration.recalibrate_batchnorm(
            model, tf.data.Dataset.from_tensor_slices(images(10)), verbose=0)
    with pytest.raises(ValueError, match="different numbers of examples"):
        calibration.recalibrate_batchnorm(model, (images(10), np.zeros(9)), verbose=0)
    with pytest.raises(ValueError, match="2 input array"):
        calibration.recalibrate_batchnorm(model, [[images(4), images(4)]], verbose=0)


def test_argument_errors():
    model, x = residual_model(), images(8)
    with pytest.raises(ValueError, match="mode must be one of"):
        calibration.recalibrate_batchnorm(model, x, mode="fast", verbose=0)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        calibration.recalibrate_batchnorm(model, x, steps=0, verbose=0)
    with pytest.raises(ValueError, match="infinite"):
        calibration.recalibrate_batchnorm(
            model, tf.data.Dataset.from_tensor_slices(x).batch(4).repeat(), verbose=0)
    with pytest.raises(ValueError, match="when must be one of"):
        BatchNormRecalibration(x, when="batch_end")
    with pytest.raises(ValueError, match="empty"):
        BatchNormRecalibration(np.zeros((0, 8, 8, 3), "float32"))
    with pytest.raises(TypeError, match="keras.Model"):
        calibration.recalibrate_batchnorm(keras.layers.Dense(3), x, verbose=0)


# -- all or nothing (issue 11) -----------------------------------------------------------

def _statistics(model):
    return {bn.name: (bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy())
            for bn in batchnorms(model)}


def _assert_same_statistics(before, model):
    after = _statistics(model)
    for name, (mean, variance) in before.items():
        np.testing.assert_array_equal(after[name][0], mean, err_msg=name)
        np.testing.assert_array_equal(after[name][1], variance, err_msg=name)


class _Failing:
    """A re-iterable of batches whose `fail_on`-th iteration raises after one batch."""

    def __init__(self, x, fail_on):
        self.x, self.fail_on, self.iterations = x, fail_on, 0

    def __iter__(self):
        self.iterations += 1
        for i in range(0, len(self.x), 10):
            if self.iterations == self.fail_on and i > 0:
                raise RuntimeError("the data source failed")
            yield self.x[i:i + 10]


@pytest.mark.parametrize("mode, fail_on", [
    ("momentum", 1), ("one_pass", 1), ("exact", 1),
    ("exact", 3),  # after two passes have already set the first statistics
])
def test_a_failing_generator_leaves_the_statistics_unchanged(mode, fail_on):
    model = residual_model()
    before = _statistics(model)
    data = _Failing(images(40), fail_on)
    with pytest.raises(RuntimeError, match="the data source failed"):
        calibration.recalibrate_batchnorm(model, data, mode=mode, verbose=0)
    assert data.iterations == fail_on
    _assert_same_statistics(before, model)
    assert all("call" not in bn.__dict__ for bn in batchnorms(model))


@pytest.mark.parametrize("mode", calibration.MODES)
def test_non_finite_calibration_data_is_an_error_and_changes_nothing(mode):
    model = residual_model()
    before = _statistics(model)
    x = images(64)
    x[37, 2, 3, 1] = np.nan
    with pytest.raises(ValueError, match="batch 1 contains NaN or infinite"):
        calibration.recalibrate_batchnorm(model, x, mode=mode, verbose=0)
    _assert_same_statistics(before, model)
    x[37, 2, 3, 1] = -np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        calibration.recalibrate_batchnorm(model, iter([x[:32], x[32:]]), mode=mode,
                                          verbose=0)
    _assert_same_statistics(before, model)


@pytest.mark.parametrize("mode", calibration.MODES)
def test_statistics_that_overflow_are_an_error_and_change_nothing(mode):
    model = residual_model()
    before = _statistics(model)
    x = np.full((8, 8, 8, 3), 3e38, "float32")  # finite, but its square is not
    with pytest.raises(ValueError, match="not finite"):
        calibration.recalibrate_batchnorm(model, x, mode=mode, verbose=0)
    _assert_same_statistics(before, model)


def test_ptq_with_non_finite_data_raises_and_leaves_the_model_alone():
    model = residual_model()
    weights = _snapshot(model)
    x = images(32)
    x[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        tfhfp8.ptq(model, "hfp8", calibration_data=x, verbose=0)
    for v in model.weights:
        np.testing.assert_array_equal(v.numpy(), weights[v.path])


def test_an_endless_generator_without_steps_stops_at_the_default(monkeypatch):
    monkeypatch.setattr(calibration, "DEFAULT_MAX_STEPS", 5)
    x = images(10)
    read = []

    def endless():
        while True:
            read.append(1)
            yield x

    model = residual_model()
    with pytest.warns(UserWarning, match="stopped after 5 batches"):
        calibration.recalibrate_batchnorm(model, endless(), verbose=0)
    assert len(read) == 6  # 5 batches, cached for every pass, and one to look ahead
    assert_exact(model, x)
    batches = calibration.Batches(endless())
    with pytest.warns(UserWarning, match="stopped after 5 batches"):
        assert len(list(batches)) == 5
    assert len(list(batches)) == 5  # replayed from the cache, which stays bounded
    assert batches.num_batches == 5  # what was read and cached


def test_the_default_limit_is_set_on_the_package_and_read_where_it_is_used():
    before = calibration.DEFAULT_MAX_STEPS
    try:
        calibration.DEFAULT_MAX_STEPS = 7  # as users set it
        assert calibration.data.DEFAULT_MAX_STEPS == 7
        assert calibration.Batches(iter([images(2)] * 9)).steps == 7
    finally:
        calibration.DEFAULT_MAX_STEPS = before
    assert calibration.data.DEFAULT_MAX_STEPS == before == 1000


def test_a_finite_generator_under_the_default_limit_does_not_warn():
    import warnings
    x = images(30)
    model = residual_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibration.recalibrate_batchnorm(model, (x[i:i + 10] for i in range(0, 30, 10)),
                                          verbose=0)
    assert_exact(model, x)
