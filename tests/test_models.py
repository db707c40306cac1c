"""Tests of the reference models in tfhfp8.models."""

import math

import keras
import numpy as np
import pytest

from tfhfp8 import models
from tfhfp8.models import PositionEmbedding

# Standard Keras layers the models may use (the precision converter maps these).
ALLOWED_LAYERS = {
    "InputLayer", "Conv2D", "DepthwiseConv2D", "Dense", "BatchNormalization", "ReLU",
    "Activation", "Add", "GlobalAveragePooling2D", "GlobalAveragePooling1D", "MaxPooling2D",
    "Flatten", "Dropout", "Embedding", "MultiHeadAttention", "LayerNormalization",
    "PositionEmbedding",
}

# (builder name, input_shape, documented total params, documented trainable params)
DOCUMENTED_COUNTS = [
    ("resnet20", (32, 32, 3), 274_042, 272_474),
    ("resnet20", (28, 28, 1), 273_754, 272_186),
    ("mobilenet_v2", (28, 28, 1), 156_298, 149_706),
    ("mobilenet_v2", (32, 32, 3), 156_874, 150_282),
    ("small_cnn", (28, 28, 1), 207_450, 207_098),
    ("small_cnn", (32, 32, 3), 269_178, 268_826),
]


def trainable_count(model):
    return int(sum(math.prod(w.shape) for w in model.trainable_weights))


def mlp_formula(input_shape, num_classes, hidden):
    widths = [math.prod(input_shape), *hidden, num_classes]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))


def transformer_formula(vocab_size, sequence_length, num_classes, embed_dim, ff_dim, num_layers):
    d, f = embed_dim, ff_dim
    per_layer = (4 * d * d + 4 * d) + (2 * d * f + f + d) + 2 * (2 * d)
    return vocab_size * d + sequence_length * d + num_layers * per_layer + d * num_classes + num_classes


def compile_and_step(model, x, y):
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    before = [np.array(w) for w in model.trainable_weights]
    logs = model.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    changed = [not np.array_equal(b, np.array(w)) for b, w in zip(before, model.trainable_weights)]
    assert all(changed), "every trainable weight should move after one Adam step"
    return logs


def images(shape, n=4, seed=0):
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def test_registry():
    assert models.names() == [
        "mlp", "mobilenet_v2", "resnet20", "small_cnn", "transformer_classifier",
    ]
    model = models.get("mlp", input_shape=(8, 8, 1), num_classes=3, hidden=(5,))
    assert model.output_shape == (None, 3)
    assert models.get("Small-CNN").name == "small_cnn"
    with pytest.raises(ValueError, match="resnet20"):
        models.get("resnet21")


def test_builders_have_documented_docstrings():
    for name in models.names():
        doc = models.REGISTRY.entries[name].__doc__
        assert doc and "Returns" in doc and "Parameter count" in doc, name


@pytest.mark.parametrize("name,input_shape,total,trainable", DOCUMENTED_COUNTS)
def test_documented_parameter_counts_and_shapes(name, input_shape, total, trainable):
    model = models.get(name, input_shape=input_shape, num_classes=10)
    assert model.count_params() == total
    assert trainable_count(model) == trainable
    assert f"{total:,}" in models.REGISTRY.entries[name].__doc__
    assert model.input_shape == (None, *input_shape)
    assert model.output_shape == (None, 10)
    assert {type(layer).__name__ for layer in model.layers} <= ALLOWED_LAYERS
    x = images(input_shape)
    probs = np.asarray(model(x, training=False))
    assert probs.shape == (4, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name,input_shape", [
    ("resnet20", (28, 28, 1)), ("mobilenet_v2", (28, 28, 1)), ("small_cnn", (32, 32, 3)),
])
def test_image_models_train_one_batch(name, input_shape):
    model = models.get(name, input_shape=input_shape, num_classes=10)
    compile_and_step(model, images(input_shape, n=8), np.arange(8) % 10)


def test_resnet20_structure():
    model = models.resnet20()
    kinds = [type(layer).__name__ for layer in model.layers]
    # 1 stem + 18 block convs + 2 projection shortcuts; 9 residual additions.
    assert kinds.count("Conv2D") == 21
    assert kinds.count("Add") == 9
    assert kinds.count("BatchNormalization") == 21
    assert model.get_layer("stage3_block3_out").output.shape == (None, 8, 8, 64)
    small = models.resnet20((28, 28, 1))
    assert small.get_layer("stage3_block3_out").output.shape == (None, 7, 7, 64)


def test_mobilenet_v2_structure_and_width():
    model = models.mobilenet_v2()
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("DepthwiseConv2D") == 8
    assert kinds.count("Add") == 4
    relu6 = [layer for layer in model.layers if type(layer).__name__ == "ReLU"]
    assert relu6 and all(float(layer.max_value) == 6.0 for layer in relu6)
    # linear bottleneck: a projection BN feeds an Add or the next block, never a ReLU
    assert model.get_layer("block1_project_bn").output.shape == (None, 14, 14, 24)
    assert model.get_layer("head_relu6").output.shape == (None, 4, 4, 256)
    half = models.mobilenet_v2(width=0.5)
    assert half.count_params() == 55_514
    assert half.get_layer("stem_conv").filters == 16


@pytest.mark.parametrize("input_shape,num_classes,hidden", [
    ((28, 28, 1), 10, (256, 128)), ((8, 8, 1), 10, (256, 128)), ((784,), 3, ()),
    ((32, 32, 3), 7, (64, 32, 16)),
])
def test_mlp_parameter_count_by_formula(input_shape, num_classes, hidden):
    model = models.mlp(input_shape, num_classes, hidden=hidden)
    assert model.count_params() == mlp_formula(input_shape, num_classes, hidden)
    assert model.output_shape == (None, num_classes)
    assert models.mlp().count_params() == 235_146


def test_mlp_trains_on_one_batch():
    model = models.mlp((8, 8, 1), 10)
    compile_and_step(model, images((8, 8, 1), n=16), np.arange(16) % 10)


def test_classifier_activation_none_gives_logits():
    model = models.small_cnn(classifier_activation=None)
    out = np.asarray(model(images((28, 28, 1)) * 50, training=False))
    assert not np.allclose(out.sum(axis=1), 1.0)
    assert model.get_layer("classifier").activation is keras.activations.linear


@pytest.mark.parametrize("kwargs", [
    dict(vocab_size=1000, sequence_length=32),
    dict(vocab_size=10000, sequence_length=80),
    dict(vocab_size=500, sequence_length=16, num_classes=5, embed_dim=32, num_heads=2,
         ff_dim=48, num_layers=3),
])
def test_transformer_parameter_count(kwargs):
    model = models.transformer_classifier(**kwargs)
    full = dict(num_classes=2, embed_dim=64, ff_dim=128, num_layers=2)
    full.update(kwargs)
    full.pop("num_heads", None)
    assert model.count_params() == transformer_formula(**full)
    assert model.input_shape == (None, kwargs["sequence_length"])
    assert model.output_shape == (None, full["num_classes"])
    if kwargs["vocab_size"] == 10000 and kwargs["sequence_length"] == 80:
        assert model.count_params() == 712_194  # the docstring's example


def test_transformer_runs_on_token_ids_and_trains():
    model = models.transformer_classifier(vocab_size=200, sequence_length=24)
    assert {type(layer).__name__ for layer in model.layers} <= ALLOWED_LAYERS
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("MultiHeadAttention") == 2 and kinds.count("LayerNormalization") == 4
    ids = np.random.default_rng(0).integers(0, 200, size=(8, 24)).astype("int32")
    probs = np.asarray(model(ids, training=False))
    assert probs.shape == (8, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    compile_and_step(model, ids, np.arange(8) % 2)


def test_transformer_rejects_bad_heads():
    with pytest.raises(ValueError, match="divisible"):
        models.transformer_classifier(vocab_size=10, sequence_length=4, embed_dim=30, num_heads=4)


def test_position_embedding_matches_embedding_lookup():
    layer = PositionEmbedding(10)
    x = np.random.default_rng(1).normal(size=(3, 10, 6)).astype("float32")
    out = np.asarray(layer(x))
    table = np.asarray(layer.embeddings)
    assert table.shape == (10, 6)
    np.testing.assert_allclose(out - x, np.broadcast_to(table, x.shape), atol=1e-6)
    # a shorter sequence uses the first positions
    np.testing.assert_allclose(np.asarray(layer(x[:, :4])) - x[:, :4],
                               np.broadcast_to(table[:4], (3, 4, 6)), atol=1e-6)
    clone = PositionEmbedding.from_config(layer.get_config())
    assert clone.sequence_length == 10


def _round_trip(model, x, tmp_path):
    path = tmp_path / f"{model.name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(np.asarray(model.predict(x, verbose=0)),
                                  np.asarray(loaded.predict(x, verbose=0)))
    assert [type(layer).__name__ for layer in loaded.layers] == \
        [type(layer).__name__ for layer in model.layers]
    return loaded


def test_transformer_save_load_round_trip(tmp_path):
    model = models.transformer_classifier(vocab_size=100, sequence_length=12, num_layers=1)
    ids = np.random.default_rng(2).integers(0, 100, size=(5, 12)).astype("int32")
    compile_and_step(model, ids, np.array([0, 1, 0, 1, 1]))
    loaded = _round_trip(model, ids, tmp_path)
    assert isinstance(loaded.get_layer("position_embedding"), PositionEmbedding)


def test_resnet_save_load_round_trip(tmp_path):
    model = models.resnet20((28, 28, 1))
    x = images((28, 28, 1), n=4, seed=3)
    compile_and_step(model, x, np.array([0, 1, 2, 3]))  # moves BN statistics too
    _round_trip(model, x, tmp_path)


def test_mlp_learns_real_digits():
    from tfhfp8 import datasets

    keras.utils.set_random_seed(0)
    (x_train, y_train), (x_test, y_test) = datasets.digits()
    model = models.mlp((8, 8, 1), 10, hidden=(64,))
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=64, epochs=15, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    assert accuracy > 0.9
