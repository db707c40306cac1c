"""Bit-level helpers of the TF-ops rounding (`tf_backend`, `tf_block`,
`tf_accumulate`): the float containers' layouts, shifts on unsigned bits, and the
counter-based random bits (a hash of seed and flat index, the same as the C++ kernels').
"""

import dataclasses

import tensorflow as tf

# Hash constants (shared with the C++ kernel).
_GOLDEN = 0x9E3779B9
_INDEX_HI = 0x85EBCA77
_INDEX_LO2 = 0xC2B2AE3D
_INDEX_HI2 = 0x27D4EB2F
_SEED_SALT = 0x2545F491
_KEY_SALT = 0x68E31DA4


@dataclasses.dataclass(frozen=True)
class _Container:
    """Bit layout of the float type the rounding runs in."""
    dtype: tf.DType
    uint: tf.DType
    width: int
    mantissa: int
    exponent_bias: int

    @property
    def inf_bits(self):
        return ((1 << (self.width - self.mantissa - 1)) - 1) << self.mantissa

    @property
    def min_exponent(self):
        """Exponent of the smallest positive subnormal."""
        return 1 - self.exponent_bias - self.mantissa


CONTAINERS = {
    tf.float32: _Container(tf.float32, tf.uint32, 32, 23, 127),
    tf.float64: _Container(tf.float64, tf.uint64, 64, 52, 1023),
}


def uint_constant(value, c):
    """`value` as a constant of the container's unsigned type (`c.uint`)."""
    return tf.constant(value, c.uint)


def shift_right(x, n):
    """`x >> n` on unsigned bits, `n` cast to `x`'s type."""
    return tf.bitwise.right_shift(x, tf.cast(n, x.dtype))


def shl(x, n):
    """`x << n` on unsigned bits, `n` cast to `x`'s type."""
    return tf.bitwise.left_shift(x, tf.cast(n, x.dtype))


def _mix32(x):
    """lowbias32 (C. Wellons): a bijective 32-bit integer hash."""
    x = x ^ shift_right(x, 16)
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = x ^ shift_right(x, 15)
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return x ^ shift_right(x, 16)


def _keys(seed):
    seed = tf.cast(seed, tf.int64)
    lo = tf.cast(seed, tf.uint32)
    hi = tf.cast(tf.bitwise.right_shift(seed, 32), tf.uint32)
    key0 = _mix32(lo ^ _mix32(hi ^ tf.constant(_SEED_SALT, tf.uint32)))
    key1 = _mix32(key0 ^ tf.constant(_KEY_SALT, tf.uint32))
    return key0, key1


def _flat_index(shape, size=None):
    """(low, high) 32-bit words of each element's flat index, as uint32 tensors.

    When the element count is static and below 2^31 (always, in practice) the high
    word is the constant 0 and the low word an int32 iota: no 64-bit arithmetic per
    element, which keeps XLA's fused loop on 32-bit lanes.
    """
    if size is None:
        size = tf.get_static_value(tf.reduce_prod(shape))
    if size is not None and size <= 2**31:
        lo = tf.bitcast(tf.range(int(size), dtype=tf.int32), tf.uint32)
        return tf.reshape(lo, shape), None
    index = tf.reshape(tf.range(tf.reduce_prod(tf.cast(shape, tf.int64)), dtype=tf.int64), shape)
    lo = tf.cast(index, tf.uint32)
    hi = tf.cast(tf.bitwise.right_shift(index, 32), tf.uint32)
    return lo, hi


def random_bits(shape, seed, c, size=None):
    """`c.width` random bits per element: a hash of the seed and the flat index.

    `size`: the number of elements when known statically (a Python int), else None.
    """
    lo, hi = _flat_index(shape, size)
    return index_bits(lo, hi, seed, c)


def index_bits(lo, hi, seed, c):
    """`c.width` random bits per element for the flat indices whose 32-bit words are
    `lo` and `hi` (uint32 tensors; `hi` None means 0): the hash `random_bits` uses."""
    key0, key1 = _keys(seed)
    u32 = lambda v: tf.constant(v, tf.uint32)
    # hi == None means hi == 0, whose products vanish from the xor.
    word0 = lo * u32(_GOLDEN) if hi is None else lo * u32(_GOLDEN) ^ hi * u32(_INDEX_HI)
    word0 = _mix32(word0 ^ key0)
    if c.width == 32:
        return word0
    word1 = lo * u32(_INDEX_LO2) if hi is None else lo * u32(_INDEX_LO2) ^ hi * u32(_INDEX_HI2)
    word1 = _mix32(word1 ^ key1)
    return shl(tf.cast(word0, tf.uint64), 32) | tf.cast(word1, tf.uint64)
