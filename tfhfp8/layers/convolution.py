"""Conv1D, Conv2D and Conv3D with emulated GEMM precision, and the patches (im2col) that
turn every convolution into a GEMM when its operands are blocked per GEMM."""

import functools
import itertools

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfhfp8 import gemm
from tfhfp8.gemm import portable_conv
from tfhfp8.layers.emulation import EmulatedLayer


def _geometry(spatial, kernel_size, strides, padding, dilation_rate):
    """Per spatial axis of a convolution input: the output length and the (before,
    after) zero padding of TensorFlow's convolution ("same": the extra element after)."""
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
    return outs, pads


def _slices(kernel_size, strides, dilation_rate, outs):
    """Per kernel tap (TensorFlow's kernel order): the strided slice of the padded
    input that meets it, as (begin, end, strides) without the batch and channel axes."""
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        begin = [o * d for o, d in zip(offset, dilation_rate)]
        end = [b + (o - 1) * s + 1 for b, o, s in zip(begin, outs, strides)]
        yield [0] + begin + [0], [0] + end + [0], [1] + list(strides) + [1]


def window_stack(x, kernel_size, strides, padding, dilation_rate):
    """The patches of a channels-last convolution input as `(batch, *out, window,
    channels)`, the window in TensorFlow's kernel order; None when the spatial shape
    is not static.

    Built from strided slices of the padded input, so its gradient is an exact
    scatter-add."""
    spatial = x.shape[1:-1]
    if any(n is None for n in spatial):
        return None
    outs, pads = _geometry(spatial, kernel_size, strides, padding, dilation_rate)
    x = tf.pad(x, [(0, 0)] + pads + [(0, 0)])
    masks = 1 | 1 << (len(spatial) + 1)  # all of the batch and channel axes
    columns = [tf.strided_slice(x, begin, end, step, begin_mask=masks, end_mask=masks)
               for begin, end, step in _slices(kernel_size, strides, dilation_rate, outs)]
    return tf.stack(columns, axis=-2)


def patches(x, kernel_size, strides, padding, dilation_rate):
    """The im2col matrix of a channels-last convolution input: `(batch, *out, K)` with
    `K = prod(kernel_size) * channels` in `(window..., channels)` order, the order of a
    kernel `(*kernel_size, channels, filters)` reshaped to `(K, filters)`; None when
    the spatial shape is not static.
    """
    stacked = window_stack(x, kernel_size, strides, padding, dilation_rate)
    if stacked is None:
        return None
    return tf.reshape(stacked, tf.concat([tf.shape(stacked)[:-2], [-1]], 0))


def unpatches(columns, spatial, kernel_size, strides, padding, dilation_rate):
    """The adjoint of `patches` (col2im): `columns` `(batch, *out, K)` summed, in FP32
    and in kernel order, into the `(batch, *spatial, channels)` input positions each
    column entry was read from. A transposed convolution is this applied to a GEMM's
    result. None when `columns`' positions are not those of a convolution over
    `spatial` (TensorFlow's transposed convolution then decides).
    """
    outs, pads = _geometry(spatial, kernel_size, strides, padding, dilation_rate)
    if list(columns.shape[1:-1]) != outs:
        return None
    window = int(np.prod(kernel_size))
    shape = tf.shape(columns)
    stacked = tf.reshape(columns, tf.concat([shape[:-1], [window, -1]], 0))
    padded = tf.concat([shape[:1], [n + a + b for n, (a, b) in zip(spatial, pads)],
                        tf.shape(stacked)[-1:]], 0)
    masks = 1 | 1 << (len(spatial) + 1)
    total = None
    for column, (begin, end, step) in zip(
            tf.unstack(stacked, axis=-2),
            _slices(kernel_size, strides, dilation_rate, outs)):
        # The adjoint of a strided slice (its registered gradient is the slice).
        part = tf.raw_ops.StridedSliceGrad(shape=padded, begin=begin, end=end, strides=step,
                                           dy=column, begin_mask=masks, end_mask=masks)
        total = part if total is None else total + part
    crop = tuple(slice(a, a + n) for n, (a, _) in zip(spatial, pads))
    return total[(slice(None),) + crop + (slice(None),)]


class _EmulatedConv(EmulatedLayer):
    """Keras' BaseConv computes `convolution_op` then bias and activation.

    With a block-scaled role in the policy, the convolution is computed as the GEMM
    of its patches and its kernel (`patches`), whose three GEMMs block their operands
    along their own reduction axes (kernel window x input channels forward, output
    channels for `dx`, batch x output positions for `dW`; see
    `tfhfp8.gemm.axes`).
    Grouped convolutions, and Conv3D with dilation, keep the plain convolution (blocks
    along each tensor's last axis).
    """

    def convolution_op(self, inputs, kernel):
        return self._conv(inputs, kernel, self.padding)

    # Keras' BaseConv.call adds the bias with `keras.ops.add`, along the wrong axis for
    # some channels-first shapes (see `_bias_and_activation`).
    def call(self, inputs):
        return self._bias_and_activation(self.convolution_op(inputs, self.kernel))

    def _conv(self, inputs, kernel, padding):
        y = self._conv_as_gemm(inputs, kernel, padding)
        if y is not None:
            return y
        op = functools.partial(portable_conv.conv, strides=list(self.strides), padding=padding,
                               dilation_rate=self.dilation_rate, data_format=self.data_format)
        return self.emulated_gemm(op, [inputs], [kernel])

    def _conv_as_gemm(self, inputs, kernel, padding):
        if not self._blocks_per_gemm() or self.groups != 1 or padding not in ("same", "valid"):
            return None
        if self.rank == 3 and tuple(self.dilation_rate) != (1, 1, 1):
            return None
        x = portable_conv.to_channels_last(ops.convert_to_tensor(inputs), self.data_format)
        columns = patches(x, self.kernel_size, self.strides, padding, self.dilation_rate)
        if columns is None:
            return None
        matrix = ops.reshape(kernel, (-1, kernel.shape[-1]))
        y = self.emulated_gemm(ops.matmul, [columns], [matrix], equation="...k,ko->...o")
        return portable_conv.to_channels_first(y, self.data_format)

    def _accumulating_op(self, name):
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


def depthwise_as_gemm(layer, inputs, kernel, name="gemm"):
    """A channels-last depthwise convolution as the per-channel GEMM of its patches,
    `y[..., c, m] = sum_w x_patch[..., w, c] W[w, c, m]` (`layer.emulated_gemm` with its
    equation): the forward GEMM blocks along the kernel window of each channel, the
    `dx` GEMM along the depth multiplier (each product its own block when it is 1;
    the window is then summed in FP32 by the patches' scatter-add), the `dW` GEMM
    along batch x output positions. Returns `(batch, *out, channels * multiplier)`,
    Keras' channel order; None when the spatial shape is not static."""
    stacked = window_stack(inputs, layer.kernel_size, layer.strides, layer.padding,
                           layer.dilation_rate)
    if stacked is None:
        return None
    window = int(np.prod(layer.kernel_size))
    matrix = ops.reshape(kernel, (window,) + tuple(kernel.shape[-2:]))
    equation = "...wc,wcm->...cm"
    y = layer.emulated_gemm(functools.partial(tf.einsum, equation), [stacked], [matrix], name=name,
                    equation=equation)
    return tf.reshape(y, tf.concat([tf.shape(y)[:-2], [-1]], 0))


def transposed_as_gemm(layer, inputs, kernel, spatial):
    """A channels-last transposed convolution (the input gradient of a convolution
    over `spatial`) as a GEMM and a scatter-add: `columns = x W^T` over the input
    channels, with `W` `(*kernel_size, filters, channels)` as `(K, channels)`, then
    `unpatches(columns)` sums them, in FP32, into the output positions. Its GEMMs so
    swap a convolution's: the forward one blocks along the input channels, the `dx`
    one along kernel window x filters (of the output gradient's patches), the `dW` one
    along batch x input positions. None when the geometry is not static or is not
    that of a convolution (`output_padding` beyond it)."""
    if any(n is None for n in list(spatial) + list(inputs.shape[1:-1])):
        return None
    outs, _ = _geometry(spatial, layer.kernel_size, layer.strides, layer.padding,
                        layer.dilation_rate)
    if outs != list(inputs.shape[1:-1]) or layer.padding not in ("same", "valid"):
        return None
    matrix = ops.reshape(kernel, (-1, kernel.shape[-1]))
    # Rows are batch x input positions (TF 2.18's einsum "...c,kc->...k" mixes up the
    # batch entries of a 4-D operand, so the GEMM is written on matrices).
    rows = tf.reshape(inputs, [-1, inputs.shape[-1]])
    columns = layer.emulated_gemm(functools.partial(tf.einsum, "nc,kc->nk"), [rows], [matrix],
                          equation="nc,kc->nk")
    columns = tf.reshape(columns, tf.concat([tf.shape(inputs)[:-1], [matrix.shape[0]]], 0))
    return unpatches(columns, spatial, layer.kernel_size, layer.strides, layer.padding,
                     layer.dilation_rate)
