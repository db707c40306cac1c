"""CIFAR-style ResNet-20 (He et al., "Deep Residual Learning for Image Recognition", 2016, §4.2)."""

import keras
from keras import layers

from tfhfp8.models._common import classifier_head, input_layer


def _conv_bn(x, filters, kernel_size, strides, name):
    x = layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)


def _basic_block(x, filters, strides, name):
    shortcut = x
    y = _conv_bn(x, filters, 3, strides, f"{name}_1")
    y = layers.ReLU(name=f"{name}_1_relu")(y)
    y = _conv_bn(y, filters, 3, 1, f"{name}_2")
    if strides != 1 or x.shape[-1] != filters:
        # Projection shortcut ("option B"): 1x1 convolution + BN, only where the shape changes.
        shortcut = _conv_bn(x, filters, 1, strides, f"{name}_shortcut")
    y = layers.Add(name=f"{name}_add")([shortcut, y])
    return layers.ReLU(name=f"{name}_out")(y)


def resnet20(input_shape=(32, 32, 3), num_classes=10, classifier_activation="softmax"):
    """CIFAR-style ResNet-20 (He et al. 2016, CIFAR-10 network with n = 3).

    Architecture: 3x3 conv (16 filters) + BN + ReLU, then three stages of three basic
    blocks (two 3x3 conv + BN, ReLU) with 16, 32 and 64 filters; the first block of
    stages 2 and 3 has stride 2. Global average pooling and a Dense classifier.
    Convolutions have no bias (each is followed by BatchNormalization).

    Shortcuts: identity, except where the shape changes (the first block of stages 2
    and 3), where a **projection shortcut** (1x1 conv, stride 2, + BN; the paper's
    "option B") is used. The paper's CIFAR networks use zero-padding shortcuts
    ("option A", parameter-free), which would need a Lambda or custom layer; the
    projection adds 3,456 parameters (two 1x1 convs and two BN layers).

    Args:
        input_shape: `(H, W, C)`, e.g. `(32, 32, 3)` (CIFAR) or `(28, 28, 1)`
            (Fashion-MNIST / MNIST). Spatial size is reduced by 4 (`same` padding).
        num_classes: number of output units.
        classifier_activation: activation of the last Dense layer (`"softmax"`
            gives probabilities; `None` gives logits).

    Returns:
        A functional `keras.Model` named `"resnet20"`; input `(batch, H, W, C)`
        float32, output `(batch, num_classes)`.

    Parameter count (10 classes): **274,042** in total for `(32, 32, 3)`, of which
    272,474 trainable and 1,568 non-trainable (BN moving mean/variance); **273,754** total
    (272,186 trainable) for `(28, 28, 1)`. With zero-padding shortcuts it would be
    269,722 trainable, the paper's "0.27M".
    """
    inputs = input_layer(input_shape)
    x = _conv_bn(inputs, 16, 3, 1, "stem")
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(1, 4):
            strides = 2 if (stage > 1 and block == 1) else 1
            x = _basic_block(x, filters, strides, f"stage{stage}_block{block}")
    outputs = classifier_head(x, num_classes, classifier_activation)
    return keras.Model(inputs, outputs, name="resnet20")
