"""A small MobileNetV2-style network (Sandler et al., "MobileNetV2: Inverted Residuals and
Linear Bottlenecks", 2018), sized for 28x28 / 32x32 images on a CPU."""

import keras
from keras import layers

from tfhfp8.models._common import classifier_head, input_layer

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2,
# shortened to four stages for 28x28 / 32x32 inputs.
DEFAULT_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 2, 2),
)


def _make_divisible(value, divisor=8):
    """Round a channel count to a multiple of `divisor` (as in the reference code)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def _bn(x, name):
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-3, name=f"{name}_bn")(x)


def _inverted_residual(x, expansion, filters, strides, name):
    in_channels = x.shape[-1]
    y = x
    if expansion != 1:
        y = layers.Conv2D(
            _make_divisible(in_channels * expansion),
            1,
            padding="same",
            use_bias=False,
            name=f"{name}_expand_conv",
        )(y)
        y = _bn(y, f"{name}_expand")
        y = layers.ReLU(max_value=6.0, name=f"{name}_expand_relu6")(y)
    y = layers.DepthwiseConv2D(
        3, strides=strides, padding="same", use_bias=False, name=f"{name}_depthwise"
    )(y)
    y = _bn(y, f"{name}_depthwise")
    y = layers.ReLU(max_value=6.0, name=f"{name}_depthwise_relu6")(y)
    # Linear bottleneck: 1x1 projection + BN, no activation.
    y = layers.Conv2D(filters, 1, padding="same", use_bias=False, name=f"{name}_project_conv")(y)
    y = _bn(y, f"{name}_project")
    if strides == 1 and in_channels == filters:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def mobilenet_v2(
    input_shape=(28, 28, 1),
    num_classes=10,
    width=1.0,
    blocks=DEFAULT_BLOCKS,
    last_channels=256,
    dropout=0.2,
    classifier_activation="softmax",
):
    """A small MobileNetV2-style network built from inverted residual blocks.

    Architecture: 3x3 conv stem (`32 * width` filters, stride 1) + BN + ReLU6; inverted
    residual blocks given by `blocks` = `(t, c, n, s)` tuples (expansion, output channels,
    repeats, stride of the first repeat); each block is 1x1 expand conv + BN + ReLU6 (omitted
    when `t == 1`), 3x3 `DepthwiseConv2D` + BN + ReLU6, 1x1 linear projection + BN, and an
    `Add` residual when stride is 1 and the channel counts match. Then a 1x1 conv to
    `last_channels` + BN + ReLU6, global average pooling, dropout, Dense classifier.
    The default blocks are `(1,16,1,1), (6,24,2,2), (6,32,3,2), (6,64,2,2)`: eight blocks,
    three stride-2 stages (28x28 -> 4x4, 32x32 -> 4x4), four residual Adds.
    Channel counts are multiplied by `width` and rounded to multiples of 8 (`last_channels`
    is scaled only when `width > 1`, as in the paper). Convolutions have no bias.

    Args:
        input_shape: `(H, W, C)`, e.g. `(28, 28, 1)` or `(32, 32, 3)`.
        num_classes: number of output units.
        width: width multiplier (the paper's alpha).
        blocks: sequence of `(t, c, n, s)` tuples.
        last_channels: channels of the final 1x1 conv.
        dropout: dropout rate before the classifier.
        classifier_activation: activation of the last Dense layer (`None` for logits).

    Returns:
        A functional `keras.Model` named `"mobilenet_v2"`; input `(batch, H, W, C)`
        float32, output `(batch, num_classes)`.

    Parameter count (10 classes, `width=1.0`): **156,298** total (149,706 trainable) for
    `(28, 28, 1)`; **156,874** total (150,282 trainable) for `(32, 32, 3)`. With
    `width=0.5`: 55,514 total (51,754 trainable) for `(28, 28, 1)`.
    """
    inputs = input_layer(input_shape)
    stem = _make_divisible(32 * width)
    x = layers.Conv2D(stem, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _bn(x, "stem")
    x = layers.ReLU(max_value=6.0, name="stem_relu6")(x)
    index = 0
    for expansion, channels, repeats, first_stride in blocks:
        filters = _make_divisible(channels * width)
        for repeat in range(repeats):
            strides = first_stride if repeat == 0 else 1
            x = _inverted_residual(x, expansion, filters, strides, f"block{index}")
            index += 1
    head = _make_divisible(last_channels * width) if width > 1.0 else last_channels
    x = layers.Conv2D(head, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = _bn(x, "head")
    x = layers.ReLU(max_value=6.0, name="head_relu6")(x)
    outputs = classifier_head(x, num_classes, classifier_activation, dropout=dropout)
    return keras.Model(inputs, outputs, name="mobilenet_v2")
