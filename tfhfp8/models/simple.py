"""Small reference models: a multilayer perceptron and a small CNN."""

import keras
from keras import layers

from tfhfp8.models._common import input_layer


def mlp(input_shape=(28, 28, 1), num_classes=10, hidden=(256, 128), dropout=0.0,
        classifier_activation="softmax"):
    """Multilayer perceptron: Flatten, `Dense(h, relu)` for each `h` in `hidden`, Dense.

    Args:
        input_shape: shape of one example, e.g. `(28, 28, 1)`, `(8, 8, 1)` or `(784,)`;
            it is flattened to `prod(input_shape)` features.
        num_classes: number of output units.
        hidden: widths of the hidden ReLU layers (may be empty: logistic regression).
        dropout: dropout rate after each hidden layer (0 = no Dropout layer).
        classifier_activation: activation of the last Dense layer (`None` for logits).

    Returns:
        A functional `keras.Model` named `"mlp"`; input `(batch, *input_shape)` float32,
        output `(batch, num_classes)`.

    Parameter count (all trainable): with `widths = [prod(input_shape), *hidden, num_classes]`,
    `sum(widths[i] * widths[i + 1] + widths[i + 1])`; **235,146** for the defaults
    (784 -> 256 -> 128 -> 10), 50,826 for `(8, 8, 1)` input.
    """
    inputs = input_layer(input_shape)
    x = layers.Flatten(name="flatten")(inputs)
    for index, units in enumerate(hidden):
        x = layers.Dense(units, activation="relu", name=f"dense{index}")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"dropout{index}")(x)
    outputs = layers.Dense(num_classes, activation=classifier_activation, name="classifier")(x)
    return keras.Model(inputs, outputs, name="mlp")


def _conv_bn_relu(x, filters, name):
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def small_cnn(input_shape=(28, 28, 1), num_classes=10, filters=(16, 32), dense_units=128,
              dropout=0.25, classifier_activation="softmax"):
    """A small Conv2D + BatchNormalization CNN for quick CPU demos.

    Architecture: for each `f` in `filters`: 3x3 `Conv2D(f)` (no bias) + BN + ReLU,
    2x2 max pooling; then Flatten, `Dense(dense_units)` (no bias) + BN + ReLU, dropout and
    a Dense classifier. On 10,000 Fashion-MNIST training images it reaches about 85-87% test
    accuracy after 2 epochs (Adam, lr 1e-3, batch 64), at a few seconds per epoch on 2 CPU cores.

    Args:
        input_shape: `(H, W, C)`, e.g. `(28, 28, 1)` or `(32, 32, 3)`.
        num_classes: number of output units.
        filters: filters of the conv stages (each halves the spatial size).
        dense_units: width of the hidden Dense layer.
        dropout: dropout rate before the classifier.
        classifier_activation: activation of the last Dense layer (`None` for logits).

    Returns:
        A functional `keras.Model` named `"small_cnn"`; input `(batch, H, W, C)`
        float32, output `(batch, num_classes)`.

    Parameter count (10 classes): **207,450** total (207,098 trainable) for `(28, 28, 1)`;
    **269,178** total (268,826 trainable) for `(32, 32, 3)`.
    """
    inputs = input_layer(input_shape)
    x = inputs
    for index, count in enumerate(filters):
        x = _conv_bn_relu(x, count, f"conv{index}")
        x = layers.MaxPooling2D(2, name=f"pool{index}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(dense_units, use_bias=False, name="dense")(x)
    x = layers.BatchNormalization(momentum=0.9, name="dense_bn")(x)
    x = layers.ReLU(name="dense_relu")(x)
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation=classifier_activation, name="classifier")(x)
    return keras.Model(inputs, outputs, name="small_cnn")
