"""Convolutions with emulated sums, each a GEMM of its input patches.

A convolution is the GEMM of its input patches (`K = kernel positions x in_channels`,
in that order); its input gradient is itself a convolution of the output gradient
(dilated by the strides) with the flipped kernel, whose reduction runs over `kernel
positions x out_channels`, and its kernel gradient the GEMM of the patches with the
output gradient (`K = batch x output positions`). A transposed convolution is the input
gradient of the convolution it transposes (forward), that convolution itself (its
input gradient) and the same kernel-gradient GEMM with the roles of input and output
swapped. A depthwise convolution is one GEMM per channel, batched.
"""

import numpy as np
import tensorflow as tf

from tfhfp8.gemm import geometry, portable_conv, products


def conv(x, kernel, strides=1, padding="valid", dilation_rate=1, accumulator="float32",
         x_format=None, kernel_format=None, grad_format=None, seed=None, stats=None):
    """N-d convolution (1, 2 or 3 spatial dims, channels last) as a GEMM of patches,
    each of its three GEMMs summed by its accumulator (see `matmul` for the arguments).
    `kernel`: `[*kernel_size, in_channels, out_channels]`; `padding`: `"valid"` or
    `"same"` (TF's pads)."""
    accs, x_given, k_given, grad_fmt = products.checked_formats(
        accumulator, x_format, kernel_format, grad_format, ("x_format", "kernel_format"))
    rank = kernel.shape.rank - 2
    strides = geometry.as_tuple(strides, rank)
    dilations = geometry.as_tuple(dilation_rate, rank)
    padding = padding.lower()
    x = tf.convert_to_tensor(x, tf.float32)
    if x_given is not None:
        x, x_given = products.rounded_operand(x, x_given)
    if k_given is not None:
        kernel, k_given = products.rounded_operand(kernel, k_given)
    if products.is_tensor_scaled(grad_fmt):
        grad_fmt = products.TensorScaled(grad_fmt)  # its scale: in the backward pass
    seed = products.gemm_seed(seed, accs)
    return _conv(x, tf.convert_to_tensor(kernel, tf.float32), strides, dilations, padding,
                 accs, x_given, k_given, grad_fmt, seed, stats or products.Stats())


def _conv_forward(x, kernel, geo, accumulator, x_fmt, k_fmt, seed):
    """The convolution of channels-last `x` with `kernel` `[*kernel_size, C_in/G,
    C_out]`: the GEMM of its patches, K = kernel positions x input channels (of the
    group). Returns (y, patch rows `[R, kpos * C_in]`, swamped, overflows, additions)."""
    c_in = kernel.shape[-2] * geo.groups
    patches, _ = geometry.patches(x, geo.kernel_size, geo.strides, geo.dilations, geo.pads)
    rows = tf.reshape(patches, [-1, geo.kpos * c_in])
    y, swamped, overflows, additions = products.product(
        geo.split(rows, c_in), geo.split_kernel(kernel), accumulator, x_fmt, k_fmt, seed)
    y = tf.reshape(geo.join(y), tf.concat([[tf.shape(x)[0]], geo.outs, [-1]], 0))
    return y, rows, swamped, overflows, additions


def _conv_input_grad(dy, kernel, geo, accumulator, dy_fmt, k_fmt, seed):
    """The gradient of the convolution's input: the output gradient, dilated by the
    strides and padded, convolved with the flipped kernel (K = kernel positions x
    output channels of the group); `[N, *spatial, C_in]`."""
    rank = len(geo.strides)
    c_in_g, c_out = kernel.shape[-2], kernel.shape[-1]
    g = geo.groups
    full_pads = geometry.backward_pads(geo.spatial, geo.kernel_size, geo.strides,
                                       geo.dilations, geo.pads, geo.outs)
    dpatches, _ = geometry.patches(portable_conv.zero_insert(dy, geo.strides),
                                   geo.kernel_size, (1,) * rank, geo.dilations, full_pads)
    flipped = tf.reverse(kernel, list(range(rank)))  # [*k, C_in/G, C_out]
    flipped = tf.reshape(flipped, [geo.kpos, c_in_g, g, c_out // g])
    flipped = tf.transpose(flipped, [2, 0, 3, 1])  # [G, kpos, C_out/G, C_in/G]
    flipped = tf.reshape(flipped, [g, geo.kpos * (c_out // g), c_in_g])
    if g == 1:
        flipped = flipped[0]
    drows = geo.split(tf.reshape(dpatches, [-1, geo.kpos * c_out]), c_out)
    dx, swamped, overflows, additions = products.product(drows, flipped, accumulator, dy_fmt,
                                                         k_fmt, seed)
    padded_shape = [geo.spatial[i] + geo.pads[i][0] + geo.pads[i][1] for i in range(rank)]
    dx = tf.reshape(geo.join(dx), tf.concat([[tf.shape(dy)[0]], padded_shape, [-1]], 0))
    crop = tuple(slice(geo.pads[i][0], geo.pads[i][0] + geo.spatial[i]) for i in range(rank))
    return dx[(slice(None),) + crop], swamped, overflows, additions


def _conv_kernel_grad(rows, dy, kernel_shape, geo, accumulator, x_fmt, dy_fmt, seed):
    """The gradient of the kernel: the patch rows against the output gradient, K = batch
    x output positions; `kernel_shape`."""
    c_out = kernel_shape[-1]
    c_in = kernel_shape[-2] * geo.groups
    dy_rows = tf.reshape(dy, [-1, c_out])
    g = geo.groups
    if g == 1:
        a, b = tf.transpose(rows), dy_rows
    else:
        a = tf.transpose(geo.split(rows, c_in), [0, 2, 1])
        b = tf.transpose(tf.reshape(dy_rows, [-1, g, c_out // g]), [1, 0, 2])
    dw, swamped, overflows, additions = products.product(a, b, accumulator, x_fmt, dy_fmt, seed)
    if g > 1:  # [G, kpos * C_in/G, C_out/G] -> [kpos, C_in/G, C_out]
        dw = tf.reshape(dw, [g, geo.kpos, c_in // g, c_out // g])
        dw = tf.reshape(tf.transpose(dw, [1, 2, 0, 3]), [geo.kpos, c_in // g, c_out])
    return tf.reshape(dw, kernel_shape), swamped, overflows, additions


def _conv(x, kernel, strides, dilations, padding, accs, x_fmt, k_fmt, grad_fmt, seed, stats,
          round_grad=True, groups=1):
    rank = len(strides)
    geo = geometry.Geometry(x.shape[1:1 + rank], kernel.shape[:rank], strides, dilations,
                            padding, groups)

    def forward(x, kernel, accumulator, seed):
        return _conv_forward(x, kernel, geo, accumulator, x_fmt, k_fmt, seed)

    def input_gradient(dy, x, kernel, rows, accumulator, seed):
        return _conv_input_grad(dy, kernel, geo, accumulator, grad_fmt, k_fmt, seed)

    def weight_gradient(dy, x, kernel, rows, accumulator, seed):
        return _conv_kernel_grad(rows, dy, kernel.shape, geo, accumulator, x_fmt, grad_fmt,
                                 seed)

    return products.three_gemms(forward, input_gradient, weight_gradient, accs, seed, stats,
                                grad_fmt if round_grad else None)(x, kernel)


def _conv_transpose(x, kernel, strides, dilations, padding, output_padding, accs, x_fmt,
                    k_fmt, grad_fmt, seed, stats, spatial=None):
    """The transposed convolution of channels-last `x` with a Keras transposed kernel
    `[*kernel_size, filters, C_in]`: the input gradient of the convolution `C` (from
    `filters` to `C_in` channels, of the output's size) applied to `x` (forward, K =
    kernel positions x C_in); its input gradient is `C` of the output gradient (K =
    kernel positions x filters), its kernel gradient `C`'s with the output gradient as
    `C`'s input and `x` as its output gradient (K = batch x input positions).
    `spatial`: the output's spatial size (None: Keras' formula)."""
    rank = len(strides)
    if spatial is None:
        spatial = [geometry.transpose_length(
            x.shape[1 + i], kernel.shape[i], strides[i], dilations[i], padding,
            None if output_padding is None else output_padding[i]) for i in range(rank)]
    spatial = list(spatial)
    geo = geometry.Geometry(spatial, kernel.shape[:rank], strides, dilations, padding)
    if list(geo.outs) != list(x.shape[1:1 + rank]):
        raise ValueError(f"transposed convolution: an output of size {spatial} does not "
                         f"convolve back to the input's {list(x.shape[1:1 + rank])} (strides "
                         f"{strides}, padding {padding!r}, output_padding {output_padding})")
    dy_rows = []  # the output gradient's patch rows: the input gradient's, reused for dW

    def forward(x, kernel, accumulator, seed):
        y, *counts = _conv_input_grad(x, kernel, geo, accumulator, x_fmt, k_fmt, seed)
        return (y, None, *counts)

    def input_gradient(dy, x, kernel, _, accumulator, seed):
        dx, rows, *counts = _conv_forward(dy, kernel, geo, accumulator, grad_fmt, k_fmt, seed)
        dy_rows.append(rows)
        return (dx, *counts)

    def weight_gradient(dy, x, kernel, _, accumulator, seed):
        return _conv_kernel_grad(dy_rows.pop(), x, kernel.shape, geo, accumulator, grad_fmt,
                                 x_fmt, seed)

    return products.three_gemms(forward, input_gradient, weight_gradient, accs, seed,
                                stats)(x, kernel)


def _depthwise(x, kernel, strides, dilations, padding, accs, x_fmt, k_fmt, grad_fmt, seed,
               stats):
    """Depthwise convolution (`kernel`: `[*kernel_size, channels, multiplier]`, output
    channel `c * multiplier + m`): one GEMM per channel, batched; K = kernel positions
    (forward), batch x output positions (kernel gradient), kernel positions x
    multiplier (input gradient)."""
    rank = len(strides)
    kernel_size = tuple(kernel.shape[:rank])
    channels, mult = kernel.shape[rank], kernel.shape[rank + 1]
    kpos = int(np.prod(kernel_size))
    spatial = x.shape[1:1 + rank]
    sizes = [geometry.output_and_pads(spatial[i], kernel_size[i], strides[i], dilations[i],
                                      padding) for i in range(rank)]
    pads = [(s[1], s[2]) for s in sizes]

    def forward(x, kernel, accumulator, seed):
        patches, outs = geometry.patches(x, kernel_size, strides, dilations, pads)
        rows = tf.transpose(tf.reshape(patches, [-1, kpos, channels]), [2, 0, 1])
        kern = tf.transpose(tf.reshape(kernel, [kpos, channels, mult]), [1, 0, 2])
        y, *counts = products.product(rows, kern, accumulator, x_fmt, k_fmt, seed)
        y = tf.reshape(tf.transpose(y, [1, 0, 2]),
                       tf.concat([[tf.shape(x)[0]], outs, [channels * mult]], 0))
        return (y, (rows, outs), *counts)

    def input_gradient(dy, x, kernel, saved, accumulator, seed):
        full = geometry.backward_pads(spatial, kernel_size, strides, dilations, pads, saved[1])
        dpatches, _ = geometry.patches(portable_conv.zero_insert(dy, strides), kernel_size,
                                       (1,) * rank, dilations, full)
        drows = tf.reshape(dpatches, [-1, kpos, channels, mult])
        drows = tf.reshape(tf.transpose(drows, [2, 0, 1, 3]), [channels, -1, kpos * mult])
        flipped = tf.reshape(tf.reverse(kernel, list(range(rank))), [kpos, channels, mult])
        flipped = tf.reshape(tf.transpose(flipped, [1, 0, 2]), [channels, kpos * mult, 1])
        dx, *counts = products.product(drows, flipped, accumulator, grad_fmt, k_fmt, seed)
        padded_shape = [spatial[i] + pads[i][0] + pads[i][1] for i in range(rank)]
        dx = tf.reshape(tf.transpose(dx[..., 0], [1, 0]),
                        tf.concat([[tf.shape(x)[0]], padded_shape, [channels]], 0))
        crop = tuple(slice(pads[i][0], pads[i][0] + spatial[i]) for i in range(rank))
        return (dx[(slice(None),) + crop], *counts)

    def weight_gradient(dy, x, kernel, saved, accumulator, seed):
        dy_c = tf.transpose(tf.reshape(dy, [-1, channels, mult]), [1, 0, 2])
        dw, *counts = products.product(tf.transpose(saved[0], [0, 2, 1]), dy_c, accumulator,
                                       x_fmt, grad_fmt, seed)
        return (tf.reshape(tf.transpose(dw, [1, 0, 2]), kernel.shape), *counts)

    return products.three_gemms(forward, input_gradient, weight_gradient, accs, seed,
                                stats)(x, kernel)


# -- the emulated layers' convolutions -------------------------------------------------------
# Their operands are already rounded by the layer (`Q_a`, `Q_w`), the output gradient
# by `Q_e` (possibly divided by a power-of-two loss scale: products stay exact), and
# the policy checked the formats: the GEMMs run on them as they are. `formats`: those
# of the input, the kernel and the output gradient.
def _to_channels_last(x, data_format, rank):
    if data_format == "channels_first":
        return tf.transpose(x, [0] + list(range(2, rank + 2)) + [1])
    return x


def _to_data_format(y, data_format, rank):
    if data_format == "channels_first":
        return tf.transpose(y, [0, rank + 1] + list(range(1, rank + 1)))
    return y


def layer_conv(x, kernel, strides, padding, dilation_rate, data_format, accumulators,
               formats, seed, stats, groups=1):
    """A Keras convolution (`data_format` `"channels_last"` or `"channels_first"`)."""
    a_fmt, w_fmt, e_fmt = formats
    rank = kernel.shape.rank - 2
    x = _to_channels_last(x, data_format, rank)
    y = _conv(x, kernel, geometry.as_tuple(strides, rank), geometry.as_tuple(dilation_rate, rank),
              padding.lower(), accumulators, a_fmt, w_fmt, e_fmt, seed, stats,
              round_grad=False, groups=groups)
    return _to_data_format(y, data_format, rank)


def layer_depthwise_conv(x, kernel, strides, padding, dilation_rate, data_format,
                         accumulators, formats, seed, stats):
    """A Keras depthwise convolution (kernel `[*kernel_size, channels, multiplier]`)."""
    a_fmt, w_fmt, e_fmt = formats
    rank = kernel.shape.rank - 2
    x = _to_channels_last(x, data_format, rank)
    y = _depthwise(x, kernel, geometry.as_tuple(strides, rank),
                   geometry.as_tuple(dilation_rate, rank), padding.lower(), accumulators,
                   a_fmt, w_fmt, e_fmt, seed, stats)
    return _to_data_format(y, data_format, rank)


def layer_conv_transpose(x, kernel, strides, padding, output_padding, dilation_rate,
                         data_format, accumulators, formats, seed, stats, spatial=None):
    """A Keras transposed convolution (kernel `[*kernel_size, filters, in_channels]`;
    `spatial`: the output's spatial size, e.g. from the layer's
    `compute_output_shape`)."""
    a_fmt, w_fmt, e_fmt = formats
    rank = kernel.shape.rank - 2
    x = _to_channels_last(x, data_format, rank)
    y = _conv_transpose(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel),
                        geometry.as_tuple(strides, rank), geometry.as_tuple(dilation_rate, rank),
                        padding.lower(),
                        None if output_padding is None else geometry.as_tuple(output_padding,
                                                                              rank),
                        accumulators, a_fmt, w_fmt, e_fmt, seed, stats, spatial)
    return _to_data_format(y, data_format, rank)
