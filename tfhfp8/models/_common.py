"""Helpers shared by the model builders."""

from keras import layers


def input_layer(input_shape, name="input", dtype="float32"):
    return layers.Input(shape=tuple(input_shape), dtype=dtype, name=name)


def classifier_head(x, num_classes, activation, dropout=0.0, name="classifier"):
    """Global average pooling, optional dropout and the Dense classifier."""
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="classifier_dropout")(x)
    return layers.Dense(num_classes, activation=activation, name=name)(x)
