"""SeparableConv2D with emulated GEMM precision."""

import functools

import keras
from keras import ops

from tfhfp8 import gemm
from tfhfp8.gemm import portable_conv
from tfhfp8.layers import convolution
from tfhfp8.layers.emulation import EmulatedLayer


@keras.saving.register_keras_serializable(package="tfhfp8")
class SeparableConv2D(EmulatedLayer, keras.layers.SeparableConv2D):
    """`keras.layers.SeparableConv2D` with both of its products emulated.

    A separable convolution is a depthwise convolution followed by a 1x1 convolution;
    each is a GEMM with its own quantized inputs, weights and errors (the
    intermediate tensor is an activation of the pointwise product). With a
    block-scaled role in the policy, the depthwise product blocks as
    `tfhfp8.layers.DepthwiseConv2D` does, and the pointwise one as a Dense layer over
    the channels (forward: input channels, `dx`: filters, `dW`: batch x positions).

    >>> import numpy as np, tfhfp8
    >>> layer = tfhfp8.layers.SeparableConv2D(8, 3, policy="hfp8")
    >>> layer(np.ones((1, 5, 5, 4), "float32")).shape
    (1, 3, 3, 8)
    """

    GEMMS = ("depthwise", "pointwise")

    def _accumulating_op(self, name):
        if name == "depthwise":
            return functools.partial(gemm.layer_depthwise_conv, strides=self.strides,
                                     padding=self.padding, dilation_rate=self.dilation_rate,
                                     data_format=self.data_format)
        return functools.partial(gemm.layer_conv, strides=1, padding="valid",
                                 dilation_rate=1, data_format=self.data_format)

    def call(self, inputs):
        if self._blocks_per_gemm():
            x = portable_conv.to_channels_last(ops.convert_to_tensor(inputs), self.data_format)
            x = convolution.depthwise_as_gemm(self, x, self.depthwise_kernel, "depthwise")
            if x is not None:
                kernel = self.pointwise_kernel
                matrix = ops.reshape(kernel, tuple(kernel.shape[-2:]))
                y = self.emulated_gemm(ops.matmul, [x], [matrix], name="pointwise",
                               equation="...k,ko->...o")
                return self._bias_and_activation(
                    portable_conv.to_channels_first(y, self.data_format))
        depthwise = functools.partial(
            portable_conv.depthwise_conv, strides=self.strides, padding=self.padding,
            dilation_rate=self.dilation_rate, data_format=self.data_format)
        pointwise = functools.partial(portable_conv.conv, strides=1, padding="valid",
                                      data_format=self.data_format)
        x = self.emulated_gemm(depthwise, [inputs], [self.depthwise_kernel], name="depthwise")
        x = self.emulated_gemm(pointwise, [x], [self.pointwise_kernel], name="pointwise")
        return self._bias_and_activation(x)
