"""FP32 block scales (`BlockScaled(..., scale="float32")` with blocks or 2D tiles:
Transformer Engine's Float8BlockScaling, DeepSeek-V3's recipe) in TF ops.

The arithmetic is the float32 operation sequence of TE's reference quantizer
(`tests/pytorch/references/quantize_scale_calc.py`, `blockwise_quantizer_reference.py`):
`scale = max_element / amax` (FLT_MAX where it overflows; optionally rounded down to a
power of two; 1 where `amax` is 0), `q = round(clamp(x * scale))`, value
`q * (1 / scale)`. Each float32 operation is computed in float64 from exact operands
and rounded once to float32 on the bits: a product or quotient of two float32 values
rounded to float64 and then to float32 equals the exact one rounded to float32 (53 >=
2 * 24 + 2), subnormals included, which TF's CPU float32 kernels would flush to zero.
"""

import tensorflow as tf

from tfhfp8 import formats
from tfhfp8.ops import tf_backend as tb
from tfhfp8.ops.tf_block import Blocks, float32_to_float64_exact, float64_to_float32_exact

_FLOAT32 = formats.FloatFormat(8, 23, name="float32")
_FLT_MAX = float(tf.float32.max)


def _f64(value):
    return tf.constant(value, tf.float64)


def _widened(x32):
    """float32 `x32` as float64, exactly (subnormals, infinities and NaN kept)."""
    c = tb.CONTAINERS[tf.float32]
    exact = float32_to_float64_exact(x32, tb.split_sign(x32, c)[1], c)
    return tf.where(tf.math.is_finite(x32), exact, tf.cast(x32, tf.float64))


def _fl32(y64):
    """float64 `y64` rounded once to a float32 value (nearest even; beyond FLT_MAX: inf),
    kept in float64."""
    rounded = tb.quantize_float(y64, _FLOAT32, "nearest_even", False, tf.zeros([], tf.int64))
    return tf.where(tf.math.is_nan(y64), y64, rounded)


class _Tiles:
    """2D tiles of `rows` x `cols` over the last two axes of `x` (padded with zeros)."""

    def __init__(self, x, rows, cols):
        if x.shape.rank is None or x.shape.rank < 2:
            raise ValueError(f"block_shape ({rows}, {cols}) tiles the last two axes: it "
                             f"needs a tensor of rank >= 2, got shape {x.shape}")
        self.rows, self.cols = rows, cols
        shape = tf.shape(x)
        self.lead, self.r, self.c = shape[:-2], shape[-2], shape[-1]

    def reduce_max(self, t):
        """Per-tile maximum of an integer tensor shaped like x: [..., row tiles, col tiles]."""
        tiles_r = (self.r + self.rows - 1) // self.rows
        tiles_c = (self.c + self.cols - 1) // self.cols
        padding = [[0, 0]] * (t.shape.rank - 2) + [[0, tiles_r * self.rows - self.r],
                                                  [0, tiles_c * self.cols - self.c]]
        tiled = tf.reshape(tf.pad(t, padding),
                           tf.concat([self.lead, [tiles_r, self.rows, tiles_c, self.cols]], 0))
        return tf.reduce_max(tiled, axis=[-3, -1])

    def expand(self, v):
        """A per-tile tensor back to one value per element of x."""
        v = tf.repeat(tf.repeat(v, self.rows, axis=-2), self.cols, axis=-1)
        return v[..., :self.r, :self.c]


def _narrowed(y64):
    """float64 `y64` holding float32 values (or inf, NaN) as float32, on the bits."""
    finite = tf.math.is_finite(y64)
    exact = float64_to_float32_exact(tf.where(finite, y64, tf.zeros_like(y64)))
    return tf.where(finite, exact, tf.cast(y64, tf.float32))


def _power_of_two_below(scale):
    """2^floor(log2(scale)) of positive normal float32 values held in float64, from the
    exponent bits; 0.5 elsewhere (TE: frexp gives exponent 0 for 0 and NaN)."""
    usable = tf.math.is_finite(scale) & (scale > 0)
    bits = tf.bitcast(tf.where(usable, scale, tf.ones_like(scale)), tf.int64)
    exponent_bits = tf.bitwise.bitwise_and(bits, 0x7FF << 52)
    return tf.where(usable, tf.bitcast(exponent_bits, tf.float64), _f64(0.5))


def _scales(amax, fmt):
    """(scale, 1 / scale) per block, float32 values in float64, as TE's
    `scale_from_amax_tensor` (eps 0) computes them."""
    scale = _fl32(fmt.element.max / amax)
    scale = tf.where(tf.math.is_inf(scale), _f64(_FLT_MAX), scale)
    if fmt.scale_rounding == "power_of_two":
        scale = tf.where(tf.math.is_inf(amax), _f64(0.0), _power_of_two_below(scale))
    scale = tf.where(amax == 0, _f64(1.0), scale)
    return scale, _fl32(1.0 / scale)


def quantize_float32_blocks(x, fmt, rounding, seed, quantize_float):
    """`x` (float32, or float64 first rounded to float32) rounded to the FP32-block-scaled
    `fmt`; `quantize_float(y, element, rounding, saturate, seed)`: the backend's element
    rounding of float32 `y`. Returns float32 values in `x`'s dtype."""
    x32 = x if x.dtype == tf.float32 else _narrowed(_fl32(x))
    c = tb.CONTAINERS[tf.float32]
    _, magnitude = tb.split_sign(x32, c)
    blocks = (_Tiles(x32, *fmt.block_shape) if fmt.tiles
              else Blocks(x32, fmt.axis, fmt.block_size))
    amax_bits = blocks.reduce_max(tf.bitcast(magnitude, tf.int32))  # NaN sorts above inf
    scale, scale_inv = (blocks.expand(s) for s in _scales(
        _widened(tf.bitcast(amax_bits, tf.float32)), fmt))
    product = _fl32(_widened(x32) * scale)
    top = fmt.element.max
    clamped = tf.where(tf.math.is_nan(product), product,
                       tf.clip_by_value(product, -top, top))
    q = quantize_float(_narrowed(clamped), fmt.element, rounding, True, seed)
    return tf.cast(_narrowed(_fl32(_widened(q) * scale_inv)), x.dtype)
