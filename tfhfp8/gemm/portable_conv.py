"""Keras' convolution ops in a form that every TensorFlow CPU kernel set runs.

TensorFlow runs its oneDNN kernels only on some x86 CPUs (or with
`TF_ENABLE_ONEDNN_OPTS=1`); its Eigen kernels, which every other CPU gets (and any
machine with `TF_ENABLE_ONEDNN_OPTS=0`), reject channels-first 2-D convolutions and
transposed convolutions with a dilation above 1, and plain Keras fails with them.
These functions take the arguments of `keras.ops.conv`, `depthwise_conv` and
`conv_transpose` and:

- compute channels-last only, transposing a channels-first input before the op and
  the result after it (a transpose moves values, it rounds nothing, so a
  channels-first result is the channels-last one transposed, bit for bit);
- compute a dilated transposed convolution as the forward convolution it is the
  adjoint of: the input with `stride - 1` zeros inserted between neighbours, padded,
  convolved with the spatially flipped kernel (input and output channels swapped) at
  the same dilation. Every kernel set runs that convolution and its gradients.

The same route runs on every kernel set, so a result differs between kernel sets at
most by the FP32 summation order of TensorFlow's own convolution.

>>> import numpy as np
>>> from tfhfp8.gemm import portable_conv
>>> x = np.ones((1, 3, 5, 5), "float32")                  # channels first
>>> kernel = np.ones((3, 3, 4, 3), "float32")             # (kh, kw, filters, channels)
>>> portable_conv.conv_transpose(x, kernel, padding="same", dilation_rate=2,
...                              data_format="channels_first").shape
TensorShape([1, 4, 5, 5])
"""

import keras
import tensorflow as tf
from keras import ops


def _tuple(value, rank, name):
    values = (value,) * rank if isinstance(value, int) else tuple(value)
    if len(values) != rank or not all(isinstance(v, int) and v >= 1 for v in values):
        raise ValueError(f"{name} must be a positive integer or {rank} of them, got {value!r}")
    return values


def to_channels_last(x, data_format):
    """`x` channels-last (unchanged unless `data_format` is "channels_first")."""
    if data_format != "channels_first":
        return x
    rank = x.shape.rank
    return tf.transpose(x, [0] + list(range(2, rank)) + [1])


def to_channels_first(y, data_format):
    """The inverse of `to_channels_last`."""
    if data_format != "channels_first":
        return y
    rank = y.shape.rank
    return tf.transpose(y, [0, rank - 1] + list(range(1, rank - 1)))


def _data_format(data_format):
    return data_format or keras.config.image_data_format()


def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
    """`keras.ops.conv`, computed channels-last."""
    data_format = _data_format(data_format)
    x = to_channels_last(tf.convert_to_tensor(inputs), data_format)
    y = ops.conv(x, kernel, strides=strides, padding=padding, data_format="channels_last",
                 dilation_rate=dilation_rate)
    return to_channels_first(y, data_format)


def depthwise_conv(inputs, kernel, strides=1, padding="valid", data_format=None,
                   dilation_rate=1):
    """`keras.ops.depthwise_conv`, computed channels-last."""
    data_format = _data_format(data_format)
    x = to_channels_last(tf.convert_to_tensor(inputs), data_format)
    y = ops.depthwise_conv(x, kernel, strides=strides, padding=padding,
                           data_format="channels_last", dilation_rate=dilation_rate)
    return to_channels_first(y, data_format)


def conv_transpose(inputs, kernel, strides=1, padding="valid", output_padding=None,
                   data_format=None, dilation_rate=1):
    """`keras.ops.conv_transpose`, computed channels-last; with a dilation above 1 as a
    forward convolution (see the module docstring)."""
    data_format = _data_format(data_format)
    x = to_channels_last(tf.convert_to_tensor(inputs), data_format)
    rank = x.shape.rank - 2
    dilations = _tuple(dilation_rate, rank, "dilation_rate")
    if all(d == 1 for d in dilations):
        y = ops.conv_transpose(x, kernel, strides=strides, padding=padding,
                               output_padding=output_padding, data_format="channels_last",
                               dilation_rate=dilation_rate)
    else:
        y = _dilated_transpose(x, tf.convert_to_tensor(kernel), _tuple(strides, rank, "strides"),
                               padding, output_padding, dilations)
    return to_channels_first(y, data_format)


def zero_insert(x, strides):
    """`s - 1` zeros inserted between neighbours along each spatial axis of
    channels-last `x` (static spatial sizes): length `n` becomes `(n - 1) * s + 1`."""
    for i, s in enumerate(strides):
        if s == 1:
            continue
        axis, n = 1 + i, x.shape[1 + i]
        x = tf.expand_dims(x, axis + 1)
        pad = [[0, 0]] * x.shape.rank
        pad[axis + 1] = [0, s - 1]
        shape = tf.shape(x)
        x = tf.reshape(tf.pad(x, pad), tf.concat([shape[:axis], [n * s], shape[axis + 2:]], 0))
        size = [-1] * x.shape.rank
        size[axis] = (n - 1) * s + 1
        x = tf.slice(x, [0] * x.shape.rank, size)
    return x


def _transpose_output_sizes(x, kernel, strides, padding, output_padding, dilations):
    """The output's spatial sizes as Keras computes them (its shape inference)."""
    spec = ops.conv_transpose(keras.KerasTensor(x.shape), keras.KerasTensor(kernel.shape),
                              strides=strides, padding=padding, output_padding=output_padding,
                              data_format="channels_last", dilation_rate=dilations)
    return list(spec.shape[1:-1])


def _dilated_transpose(x, kernel, strides, padding, output_padding, dilations):
    """A channels-last transposed convolution as a forward one. Per spatial axis, with
    input length `n`, output length `out` and TensorFlow's front padding `p` of the
    forward convolution from `out` to `n`, output `i` is `sum_t u[i + p - t d] W[t]`
    over the zero-inserted input `u`: a valid convolution, at dilation `d`, of `u`
    with `(k - 1) d - p` zeros in front and enough behind for `out` outputs (cropped
    where negative), with the flipped kernel."""
    spatial = x.shape[1:-1]
    if any(n is None for n in spatial):
        raise ValueError(
            "a transposed convolution with dilation_rate > 1 needs static spatial "
            f"input sizes, got input shape {tuple(x.shape)}")
    outs = _transpose_output_sizes(x, kernel, strides, padding, output_padding, dilations)
    u = zero_insert(x, strides)
    paddings, crops = [[0, 0]], [slice(None)]
    for n, k, s, d, out in zip(spatial, kernel.shape, strides, dilations, outs):
        reach = (k - 1) * d
        total = max((-(-out // s) - 1) * s + reach + 1 - out, 0) if padding == "same" else 0
        before = reach - total // 2
        after = out + reach - ((n - 1) * s + 1) - before
        paddings.append([max(before, 0), max(after, 0)])
        length = (n - 1) * s + 1 + max(before, 0) + max(after, 0)
        crops.append(slice(max(-before, 0), length - max(-after, 0)))
    u = tf.pad(u, paddings + [[0, 0]])[tuple(crops) + (slice(None),)]
    rank = len(spatial)
    flipped = tf.transpose(tf.reverse(kernel, list(range(rank))),
                           list(range(rank)) + [rank + 1, rank])
    return ops.conv(u, flipped, strides=1, padding="valid", data_format="channels_last",
                    dilation_rate=dilations)
