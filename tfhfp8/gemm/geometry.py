"""The geometry of the convolutions of `tfhfp8.gemm`: TF's pads and output sizes, the
patches a convolution is the GEMM of, and the channel groups."""

import numpy as np
import tensorflow as tf


def output_and_pads(size, kernel, stride, dilation, padding):
    """(output size, pad before, pad after) of one spatial dimension, as TF pads."""
    span = (kernel - 1) * dilation + 1
    if padding == "valid":
        out = max((size - span) // stride + 1, 0)
        return out, 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
    return out, total // 2, total - total // 2


def patches(x, kernel_size, strides, dilations, pads):
    """`[N, O..., prod(kernel) * C]` patches of channels-last `x` (K ordered kernel
    position, then channel), on explicitly padded input."""
    rank = len(kernel_size)
    x = tf.pad(x, [[0, 0]] + [list(p) for p in pads] + [[0, 0]])
    spatial = x.shape[1:1 + rank]
    outs = [(spatial[i] - (kernel_size[i] - 1) * dilations[i] - 1) // strides[i] + 1
            for i in range(rank)]
    slices = []
    for offset in np.ndindex(*kernel_size):
        begin = [0] + [offset[i] * dilations[i] for i in range(rank)] + [0]
        end = [0] + [begin[1 + i] + (outs[i] - 1) * strides[i] + 1 for i in range(rank)] + [0]
        slices.append(tf.strided_slice(x, begin, end, [1] + list(strides) + [1],
                                       begin_mask=1 | 1 << (rank + 1),
                                       end_mask=1 | 1 << (rank + 1)))
    return tf.concat(slices, axis=-1) if len(slices) > 1 else slices[0], outs


def backward_pads(spatial, kernel_size, strides, dilations, pads, outs):
    """Pads of the stride-dilated output gradient for the input-gradient convolution."""
    full = []
    for i in range(len(strides)):
        reach = (kernel_size[i] - 1) * dilations[i]
        padded = spatial[i] + pads[i][0] + pads[i][1]
        right = padded - ((outs[i] - 1) * strides[i] + 1 + reach)
        full.append((reach, reach + right))
    return full


def transpose_length(size, kernel, stride, dilation, padding, output_padding):
    """Keras' output size of a transposed convolution (its TF backend's
    `compute_conv_transpose_output_shape`)."""
    span = (kernel - 1) * dilation + 1
    if padding == "valid":
        extra = max(span, stride) - span if output_padding is None else output_padding
        return (size - 1) * stride + span + extra
    if output_padding is None:
        return size * stride
    return (size - 1) * stride + span % 2 + output_padding


def as_tuple(value, rank):
    """`value` (a number or a sequence) as a tuple of `rank` numbers."""
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * rank


class Geometry:
    """A convolution's geometry: channels-last input of `spatial` size, `kernel_size`,
    `strides`, `dilations`, TF's `pads` and the output size `outs`; `groups` input
    and output channel groups (channel `c` of group `c // (channels / groups)`)."""

    def __init__(self, spatial, kernel_size, strides, dilations, padding, groups=1):
        rank = len(strides)
        self.spatial, self.kernel_size = list(spatial), tuple(kernel_size)
        self.strides, self.dilations, self.groups = strides, dilations, groups
        geometry = [output_and_pads(spatial[i], kernel_size[i], strides[i], dilations[i],
                                    padding) for i in range(rank)]
        self.pads = [(g[1], g[2]) for g in geometry]
        self.outs = [g[0] for g in geometry]
        self.kpos = int(np.prod(kernel_size))

    def split(self, rows, per_position):
        """`[R, kpos * C]` rows (C channels per kernel position) -> `[G, R, kpos * C/G]`
        (K: kernel position, then channel within the group); `[R, K]` when G = 1."""
        if self.groups == 1:
            return rows
        g = self.groups
        rows = tf.reshape(rows, [-1, self.kpos, g, per_position // g])
        return tf.reshape(tf.transpose(rows, [2, 0, 1, 3]),
                          [g, -1, self.kpos * (per_position // g)])

    def split_kernel(self, kernel):
        """`[*kernel_size, C_in/G, C_out]` -> `[G, kpos * C_in/G, C_out/G]`."""
        c_in, c_out, g = kernel.shape[-2], kernel.shape[-1], self.groups
        if g == 1:
            return tf.reshape(kernel, [self.kpos * c_in, c_out])
        kernel = tf.reshape(kernel, [self.kpos, c_in, g, c_out // g])
        return tf.reshape(tf.transpose(kernel, [2, 0, 1, 3]), [g, self.kpos * c_in, c_out // g])

    def join(self, y):
        """`[G, R, C/G]` -> `[R, C]` (channel `g * C/G + c`); `[R, C]` unchanged."""
        if self.groups == 1:
            return y
        return tf.reshape(tf.transpose(y, [1, 0, 2]), [tf.shape(y)[1], -1])
