"""Conv2DTranspose with emulated GEMM precision."""

import functools

import keras
from keras import ops

from tfhfp8 import gemm
from tfhfp8.gemm import portable_conv
from tfhfp8.layers import convolution
from tfhfp8.layers.emulation import EmulatedLayer


@keras.saving.register_keras_serializable(package="tfhfp8")
class Conv2DTranspose(EmulatedLayer, keras.layers.Conv2DTranspose):
    """`keras.layers.Conv2DTranspose` whose convolution runs in the formats of `policy`.

    With a block-scaled role in the policy, it runs as a GEMM over the input channels
    followed by a scatter-add (`tfhfp8.layers.convolution.transposed_as_gemm`), its
    `dx` GEMM over the output gradient's patches (kernel window x filters) and its
    `dW` GEMM over batch x input positions: a convolution's reductions, swapped.

    >>> import numpy as np, tfhfp8
    >>> layer = tfhfp8.layers.Conv2DTranspose(8, 3, policy="hfp8")
    >>> layer(np.ones((1, 5, 5, 4), "float32")).shape
    (1, 7, 7, 8)
    """

    # Keras' transposed kernel is (kh, kw, filters, input channels).
    KERNEL_INPUT_AXIS = -1

    def _accumulating_op(self, name):

        def op(x, kernel, **kwargs):
            # The output size as Keras computes it (the version's own formula).
            shape = self.compute_output_shape(tuple(x.shape))
            spatial = shape[2:] if self.data_format == "channels_first" else shape[1:-1]
            return gemm.layer_conv_transpose(
                x, kernel, strides=self.strides, padding=self.padding,
                output_padding=self.output_padding, dilation_rate=self.dilation_rate,
                data_format=self.data_format, spatial=spatial, **kwargs)

        return op

    def call(self, inputs):
        if self._blocks_per_gemm():
            x = ops.convert_to_tensor(inputs)
            shape = self.compute_output_shape(tuple(x.shape))
            spatial = shape[2:] if self.data_format == "channels_first" else shape[1:-1]
            y = convolution.transposed_as_gemm(
                self, portable_conv.to_channels_last(x, self.data_format), self.kernel, spatial)
            if y is not None:
                return self._bias_and_activation(
                    portable_conv.to_channels_first(y, self.data_format))
        op = functools.partial(
            portable_conv.conv_transpose, strides=list(self.strides), padding=self.padding,
            output_padding=self.output_padding, dilation_rate=self.dilation_rate,
            data_format=self.data_format)
        return self._bias_and_activation(self.emulated_gemm(op, [inputs], [self.kernel]))
