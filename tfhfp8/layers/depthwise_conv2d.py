"""DepthwiseConv2D with emulated GEMM precision."""

import functools

import keras
from keras import ops

from tfhfp8 import gemm
from tfhfp8.gemm import portable_conv
from tfhfp8.layers import convolution
from tfhfp8.layers.emulation import EmulatedLayer


@keras.saving.register_keras_serializable(package="tfhfp8")
class DepthwiseConv2D(EmulatedLayer, keras.layers.DepthwiseConv2D):
    """`keras.layers.DepthwiseConv2D` whose convolution runs in the formats of `policy`.

    With a block-scaled role in the policy, the convolution runs as the per-channel
    GEMM of its patches (`tfhfp8.layers.convolution.depthwise_as_gemm`): blocks along
    the kernel window forward, the depth multiplier for `dx`, batch x output positions
    for `dW`.

    >>> import numpy as np, tfhfp8
    >>> layer = tfhfp8.layers.DepthwiseConv2D(3, policy="hfp8")
    >>> layer(np.ones((1, 5, 5, 4), "float32")).shape
    (1, 3, 3, 4)
    """

    def _accumulating_op(self, name):
        return functools.partial(gemm.layer_depthwise_conv, strides=self.strides,
                                 padding=self.padding, dilation_rate=self.dilation_rate,
                                 data_format=self.data_format)

    def call(self, inputs):
        if self._blocks_per_gemm():
            x = portable_conv.to_channels_last(ops.convert_to_tensor(inputs), self.data_format)
            y = convolution.depthwise_as_gemm(self, x, self.kernel)
            if y is not None:
                y = portable_conv.to_channels_first(y, self.data_format)
                return self._bias_and_activation(y)
        op = functools.partial(portable_conv.depthwise_conv, strides=self.strides,
                               padding=self.padding, dilation_rate=self.dilation_rate,
                               data_format=self.data_format)
        return self._bias_and_activation(self.emulated_gemm(op, [inputs], [self.kernel]))
