"""Bias and activation after a convolution, as Keras' convolution layers apply them."""

from keras import ops


def add_bias_and_activate(layer, outputs):
    if layer.use_bias:
        if layer.data_format == "channels_last":
            bias = layer.bias
        else:
            bias = ops.reshape(layer.bias, (1, -1) + (1,) * layer.rank)
        outputs = ops.add(outputs, bias)
    return outputs if layer.activation is None else layer.activation(outputs)
