"""Convolutions in float64 numpy, written from their definitions (channels-last, any
rank, stride, dilation, padding): the independent reference of the convolution tests.

Per spatial axis, TensorFlow pads a forward convolution from length `n` with "same"
by `total = max((ceil(n / s) - 1) s + (k - 1) d + 1 - n, 0)` zeros, `total // 2` in
front; "valid" pads nothing. A transposed convolution is the adjoint of the forward
convolution from its output length to its input length."""

import itertools

import numpy as np


def front_padding(n, k, s, d, padding):
    """(front zeros, output length) of a forward convolution over length `n`."""
    reach = (k - 1) * d
    if padding == "same":
        total = max((-(-n // s) - 1) * s + reach + 1 - n, 0)
        return total // 2, -(-n // s)
    return 0, (n - reach - 1) // s + 1


def _padded(x, kernel_size, strides, dilations, padding):
    """`x` zero-padded as the convolution reads it, and the output lengths."""
    pads, outs = [], []
    for n, k, s, d in zip(x.shape[1:-1], kernel_size, strides, dilations):
        front, out = front_padding(n, k, s, d, padding)
        back = max((out - 1) * s + (k - 1) * d + 1 - front - n, 0)
        pads.append((front, back))
        outs.append(out)
    return np.pad(x, [(0, 0)] + pads + [(0, 0)]), pads, outs


def _taps(kernel_size, strides, dilations, outs):
    """Per kernel tap: its index and the strided slice of the padded input it meets."""
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        yield tap, (slice(None),) + tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, s, d, o in zip(tap, strides, dilations, outs))


def conv(x, kernel, strides, dilations, padding):
    """A forward convolution: `x` (batch, *spatial, c), `kernel` (*k, c, f)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    xp, _, outs = _padded(x, kernel.shape[:-2], strides, dilations, padding)
    y = np.zeros((x.shape[0],) + tuple(outs) + (kernel.shape[-1],))
    for tap, window in _taps(kernel.shape[:-2], strides, dilations, outs):
        y += xp[window] @ kernel[tap]
    return y


def conv_grads(x, kernel, dy, strides, dilations, padding):
    """(dx, dW) of `sum(conv(x, kernel) * dy)`."""
    x, kernel, dy = (np.asarray(t, np.float64) for t in (x, kernel, dy))
    xp, pads, outs = _padded(x, kernel.shape[:-2], strides, dilations, padding)
    dxp, dw = np.zeros_like(xp), np.zeros_like(kernel)
    batch_and_positions = list(range(x.ndim - 1))
    for tap, window in _taps(kernel.shape[:-2], strides, dilations, outs):
        dxp[window] += dy @ kernel[tap].T
        dw[tap] = np.tensordot(xp[window], dy, (batch_and_positions, batch_and_positions))
    crop = tuple(slice(front, front + n) for (front, _), n in zip(pads, x.shape[1:-1]))
    return dxp[(slice(None),) + crop], dw


def conv_transpose(x, kernel, strides, dilations, padding, outs):
    """A transposed convolution to output lengths `outs`: `x` (batch, *spatial, c),
    `kernel` (*k, f, c) as Keras holds it: the adjoint (in `x`) of the forward
    convolution of an `outs`-sized input with `kernel` read as (*k, f, c)."""
    y_shape = (x.shape[0],) + tuple(outs) + (kernel.shape[-2],)
    dx, _ = conv_grads(np.zeros(y_shape), kernel, x, strides, dilations, padding)
    return dx


def conv_transpose_grads(x, kernel, dz, strides, dilations, padding):
    """(dx, dW) of `sum(conv_transpose(x, kernel) * dz)`: the forward convolution of
    `dz` and the forward convolution's kernel gradient with the roles swapped."""
    dx = conv(dz, kernel, strides, dilations, padding)
    _, dw = conv_grads(dz, kernel, x, strides, dilations, padding)
    return dx, dw


def depthwise_conv(x, kernel, strides, dilations, padding):
    """`kernel` (*k, c, m): output channel `c * m + j` is channel `c` convolved with
    `kernel[..., c, j]`."""
    c, m = kernel.shape[-2:]
    parts = [conv(x[..., i:i + 1], kernel[..., i:i + 1, :], strides, dilations, padding)
             for i in range(c)]
    return np.concatenate(parts, axis=-1).reshape(parts[0].shape[:-1] + (c * m,))
