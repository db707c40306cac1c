"""Conv1D, Conv2D and Conv3D with emulated GEMM precision."""

import functools
import itertools

import keras
import tensorflow as tf
from keras import ops

from tfhfp8.layers.emulation import EmulatedLayer


def patches(x, kernel_size, strides, padding, dilation_rate):
    """The im2col matrix of a channels-last convolution input: `(batch, *out, K)` with
    `K = prod(kernel_size) * channels` in `(window..., channels)` order, the order of a
    kernel `(*kernel_size, channels, filters)` reshaped to `(K, filters)`.

    Built from strided slices of the padded input (TensorFlow's "same" padding: the
    extra element after), so its gradient is an exact scatter-add; None when the
    spatial shape is not static.
    """
    spatial = x.shape[1:-1]
    if any(n is None for n in spatial):
        return None
    pads, outs = [], []
    for n, k, s, d in zip(spatial, kernel_size, strides, dilation_rate):
        extent = (k - 1) * d + 1
        if padding == "same":
            out = -(-n // s)
            total = max((out - 1) * s + extent - n, 0)
            pads.append((total // 2, total - total // 2))
        else:
            out = (n - extent) // s + 1
            pads.append((0, 0))
        outs.append(out)
    x = tf.pad(x, [(0, 0)] + pads + [(0, 0)])
    columns = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        begin = [0] + [o * d for o, d in zip(offset, dilation_rate)] + [0]
        end = [0] + [b + (o - 1) * s + 1 for b, o, s in zip(begin[1:-1], outs, strides)] + [0]
        columns.append(tf.strided_slice(x, begin, end, [1] + list(strides) + [1],
                                        begin_mask=1 | 1 << (len(begin) - 1),
                                        end_mask=1 | 1 << (len(begin) - 1)))
    stacked = tf.stack(columns, axis=-2)  # (batch, *out, window, channels)
    return tf.reshape(stacked, tf.concat([tf.shape(stacked)[:-2], [-1]], 0))


class _EmulatedConv(EmulatedLayer):
    """Keras' BaseConv computes `convolution_op` then bias and activation.

    With a block-scaled role in the policy, the convolution is computed as the GEMM
    of its patches and its kernel (`patches`), whose three GEMMs block their operands
    along their own reduction axes (input channels x kernel window forward and for
    `dx`, batch x output positions for `dW`; see `tfhfp8.layers.gemm_axes`).
    Grouped convolutions, and Conv3D with dilation, keep the plain convolution (blocks
    along each tensor's last axis).
    """

    def convolution_op(self, inputs, kernel):
        return self._conv(inputs, kernel, self.padding)

    def _conv(self, inputs, kernel, padding):
        y = self._conv_as_gemm(inputs, kernel, padding)
        if y is not None:
            return y
        op = functools.partial(ops.conv, strides=list(self.strides), padding=padding,
                               dilation_rate=self.dilation_rate, data_format=self.data_format)
        return self._gemm(op, [inputs], [kernel])

    def _conv_as_gemm(self, inputs, kernel, padding):
        if not self._blocks_per_gemm() or self.groups != 1 or padding not in ("same", "valid"):
            return None
        if self.rank == 3 and tuple(self.dilation_rate) != (1, 1, 1):
            return None
        x = ops.convert_to_tensor(inputs)
        first = self.data_format == "channels_first"
        if first:
            x = tf.transpose(x, [0] + list(range(2, self.rank + 2)) + [1])
        columns = patches(x, self.kernel_size, self.strides, padding, self.dilation_rate)
        if columns is None:
            return None
        matrix = ops.reshape(kernel, (-1, kernel.shape[-1]))
        y = self._gemm(ops.matmul, [columns], [matrix], equation="...k,ko->...o")
        if first:
            y = tf.transpose(y, [0, self.rank + 1] + list(range(1, self.rank + 1)))
        return y

    def _accumulating_op(self, name):
        from tfhfp8 import gemm  # noqa: PLC0415
        # Conv1D pads causal inputs itself before the convolution.
        padding = "valid" if self.padding == "causal" else self.padding
        return functools.partial(gemm.layer_conv, strides=self.strides, padding=padding,
                                 dilation_rate=self.dilation_rate,
                                 data_format=self.data_format, groups=self.groups)


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
        return self._bias_and_activation(self._conv(inputs, self.kernel, padding))


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
