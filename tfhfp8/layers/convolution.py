"""Conv1D, Conv2D and Conv3D with emulated GEMM precision."""

import functools

import keras
from keras import ops

from tfhfp8.layers.emulation import EmulatedLayer


class _EmulatedConv(EmulatedLayer):
    """Keras' BaseConv computes `convolution_op` then bias and activation."""

    def convolution_op(self, inputs, kernel):
        return self._gemm(super().convolution_op, [inputs], [kernel])

    def _accumulating_op(self, name):
        from tfhfp8 import gemm  # noqa: PLC0415
        if self.groups != 1:
            raise NotImplementedError(
                f"{type(self).__name__}: emulated accumulation with groups={self.groups} "
                "is not implemented (groups=1 only)")
        # Conv1D pads causal inputs itself before the convolution.
        padding = "valid" if self.padding == "causal" else self.padding
        return functools.partial(gemm.layer_conv, strides=self.strides, padding=padding,
                                 dilation_rate=self.dilation_rate,
                                 data_format=self.data_format)


@keras.saving.register_keras_serializable(package="tfhfp8")
class Conv1D(_EmulatedConv, keras.layers.Conv1D):
    """`keras.layers.Conv1D` whose convolution runs in the formats of `policy`.

    >>> import numpy as np, tfhfp8
    >>> layer = tfhfp8.layers.Conv1D(8, 3, padding="causal", policy="hfp8")
    >>> layer(np.ones((1, 5, 3), "float32")).shape
    (1, 5, 8)
    """

    # Keras' Conv1D.call pads causal inputs and calls ops.conv itself, bypassing
    # convolution_op: the same steps here, with the convolution emulated.
    def call(self, inputs):
        padding = self.padding
        if padding == "causal":
            left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            time = [[left, 0]]
            pad = [[0, 0]] + (time + [[0, 0]] if self.data_format == "channels_last"
                              else [[0, 0]] + time)
            inputs = ops.pad(inputs, pad)
            padding = "valid"
        op = functools.partial(ops.conv, strides=list(self.strides), padding=padding,
                               dilation_rate=self.dilation_rate, data_format=self.data_format)
        return self._bias_and_activation(self._gemm(op, [inputs], [self.kernel]))


@keras.saving.register_keras_serializable(package="tfhfp8")
class Conv2D(_EmulatedConv, keras.layers.Conv2D):
    """`keras.layers.Conv2D` whose convolution runs in the formats of `policy`.

    >>> import numpy as np, tfhfp8
    >>> layer = tfhfp8.layers.Conv2D(8, 3, policy="hfp8")
    >>> layer(np.ones((1, 5, 5, 3), "float32")).shape
    (1, 3, 3, 8)
    """


@keras.saving.register_keras_serializable(package="tfhfp8")
class Conv3D(_EmulatedConv, keras.layers.Conv3D):
    """`keras.layers.Conv3D` whose convolution runs in the formats of `policy`."""
