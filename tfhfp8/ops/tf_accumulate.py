"""Emulated accumulation written with TensorFlow ops (XLA-compilable, any device).

Bit-identical to the C++ kernels (`custom_ops/accumulate`); the definition is the
docstring of `tfhfp8.Accumulator`. A loop over `k` (ascending), each step vectorized
over every output element:

- float accumulators: `acc <- Q(RO32(acc + p_k))`, `RO32` the float32 round-to-odd of
  the exact sum (TwoSum gives the rounding error), `Q` the same `quantize_float` as
  `tfhfp8.quantize`'s TF-ops backend; chunks restart `acc` and feed an outer sum;
- INT32: the sum in int64 lanes, wrapped or clamped to 32 bits at every addition.
"""

import tensorflow as tf

from tfhfp8.ops import tf_backend

_F32 = tf_backend.CONTAINERS[tf.float32]
# Loop state (counter, sums, count): the sums' static shape may loosen in a loop.
_INVARIANTS = (tf.TensorShape([]), tf.TensorShape([None, None, None]), tf.TensorShape([]))


def _ro32(acc, p):
    """float32 round-to-odd of the exact `acc + p` (finite float32 inputs)."""
    s = acc + p
    bb = s - acc
    error = (acc - (s - bb)) + (p - bb)
    bits = tf.bitcast(s, tf.uint32)
    even = (bits & tf.constant(1, tf.uint32)) == 0
    # The neighbour of s in the direction of the error: larger magnitude when the error
    # has s's sign (s != 0 whenever the error is).
    away = (error > 0) == (s > 0)
    neighbour = tf.where(away, bits + 1, bits - 1)
    inexact = (error != 0) & even & tf.math.is_finite(s)
    bits = tf.where(inexact, neighbour, bits)
    # A finite sum beyond float32's range: +-FLT_MAX, its odd neighbour (not inf).
    beyond = tf.math.is_inf(s) & tf.math.is_finite(acc) & tf.math.is_finite(p)
    sign = bits & tf.constant(0x80000000, tf.uint32)
    bits = tf.where(beyond, sign | tf.constant(0x7F7FFFFF, tf.uint32), bits)
    return tf.bitcast(bits, tf.float32)


class _Bits:
    """Random bits of the additions of one output tensor: index `o * count + j` (o the
    flat output index) hashed with a seed."""

    def __init__(self, shape, count, seed):
        self.seed = seed
        size = tf.reduce_prod(tf.cast(shape, tf.int64))
        count = tf.cast(count, tf.int64)
        static = tf.get_static_value(size * count)
        base = tf.reshape(tf.range(size, dtype=tf.int64) * count, shape)
        # Below 2^32 indices, 32-bit lanes only (the high word is 0).
        self.wide = static is None or static > 2**32
        self.base = base if self.wide else tf.cast(base, tf.uint32)

    def __call__(self, j):
        if not self.wide:
            return tf_backend.index_bits(self.base + tf.cast(j, tf.uint32), None,
                                         self.seed, _F32)
        index = self.base + tf.cast(j, tf.int64)
        lo = tf.cast(index & 0xFFFFFFFF, tf.uint32)
        hi = tf.cast(tf.bitwise.right_shift(index, 32), tf.uint32)
        return tf_backend.index_bits(lo, hi, self.seed, _F32)


def _shapes(a, b):
    """(output shape [B, M, N] as a tensor, K as a scalar tensor)."""
    sa, sb = tf.shape(a), tf.shape(b)
    return tf.stack([sa[0], sa[1], sb[2]]), sa[2]


def _chunks(k, chunk_size):
    """(chunk length, number of chunks) as int32 tensors; one chunk when none."""
    if not chunk_size:
        return tf.maximum(k, 1), tf.constant(1)
    chunk = tf.constant(int(chunk_size))
    return chunk, tf.maximum((k + chunk - 1) // chunk, 1)


def accumulating_matmul(a, b, fmt, outer_format, products, rounding, saturate, chunk_size,
                        seed):
    """`(c, swamped)`: `a @ b` summed in the float format `fmt` (the arguments of
    `tfhfp8.ops.cpp_backend.accumulating_matmul`; `outer_format` None: `fmt`).

    `a`: float32 `[B, M, K]`, `b`: float32 `[B, K, N]` with static shapes, `seed`: an
    int64 scalar. `swamped`: int64, the number of inner additions of a non-zero
    product that left the running sum unchanged.
    """
    a = tf.convert_to_tensor(a, tf.float32)
    b = tf.convert_to_tensor(b, tf.float32)
    out_shape, k = _shapes(a, b)
    outer_format = fmt if outer_format is None else outer_format
    chunk, num_chunks = _chunks(k, chunk_size)
    zeros = tf.zeros(out_shape, tf.float32)
    if a.shape[2] == 0:  # an empty sum (XLA cannot even slice an empty axis)
        return zeros, tf.constant(0, tf.int64)
    seed = tf.cast(seed, tf.int64)
    stochastic = rounding == "stochastic"
    inner_bits = _Bits(out_shape, k, seed) if stochastic else None
    outer_bits = _Bits(out_shape, num_chunks, seed + 1) if stochastic else None
    product_bits = _Bits(out_shape, k, seed + 2) if stochastic else None
    a_t = tf.transpose(a, [2, 0, 1])  # [K, B, M]
    b_t = tf.transpose(b, [1, 0, 2])  # [K, B, N]

    def add(acc, p, target, bits):
        rand = bits if stochastic else None
        return tf_backend.quantize_float(_ro32(acc, p), target, rounding, saturate, seed,
                                         rand=rand)

    def inner(i, acc, swamped):
        p = a_t[i][:, :, None] * b_t[i][:, None, :]
        if products is not None:
            p = tf_backend.quantize_float(p, products, rounding, saturate, seed,
                                          rand=product_bits(i) if stochastic else None)
        new = add(acc, p, fmt, inner_bits(i) if stochastic else None)
        lost = tf.math.count_nonzero((p != 0) & (new == acc), dtype=tf.int64)
        return i + 1, new, swamped + lost

    def run_chunk(start, stop, swamped):
        _, acc, swamped = tf.while_loop(
            lambda i, acc, swamped: i < stop, inner, (start, zeros, swamped),
            parallel_iterations=1, shape_invariants=_INVARIANTS)
        return acc, swamped

    swamped0 = tf.constant(0, tf.int64)
    # One chunk (none asked, or chunk_size >= K): the result is its sum, no outer addition.
    static_k = a.shape[2]
    if not chunk_size or (static_k is not None and chunk_size >= static_k):
        return run_chunk(tf.constant(0), k, swamped0)

    def outer(c, total, swamped):
        start = c * chunk
        acc, swamped = run_chunk(start, tf.minimum(start + chunk, k), swamped)
        total = add(total, acc, outer_format, outer_bits(c) if stochastic else None)
        return c + 1, total, swamped

    def chunked():
        _, total, swamped = tf.while_loop(lambda c, total, swamped: c < num_chunks, outer,
                                          (tf.constant(0), zeros, swamped0),
                                          parallel_iterations=1, shape_invariants=_INVARIANTS)
        return total, swamped

    if static_k is not None:
        return chunked()
    return tf.cond(num_chunks > 1, chunked, lambda: run_chunk(tf.constant(0), k, swamped0))


_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def int32_matmul(a_mantissas, b_mantissas, chunk_size, overflow):
    """`(c, overflows)`: the integer `a @ b` in a 32-bit accumulator, as float32.

    `a_mantissas`: int32 `[B, M, K]`, `b_mantissas`: int32 `[B, K, N]`; `chunk_size`:
    None or 0 (one integer sum) or n (the integer partial sum goes into a float32 total
    every n products); `overflow`: `"wrap"` or `"saturate"`.
    """
    a = tf.convert_to_tensor(a_mantissas, tf.int32)
    b = tf.convert_to_tensor(b_mantissas, tf.int32)
    out_shape, k = _shapes(a, b)
    if a.shape[2] == 0:
        return tf.zeros(out_shape, tf.float32), tf.constant(0, tf.int64)
    chunk, num_chunks = _chunks(k, chunk_size)
    a_t = tf.cast(tf.transpose(a, [2, 0, 1]), tf.int64)
    b_t = tf.cast(tf.transpose(b, [1, 0, 2]), tf.int64)
    low, high = tf.constant(_INT32_MIN, tf.int64), tf.constant(_INT32_MAX, tf.int64)

    def inner(i, acc, overflows):
        s = acc + a_t[i][:, :, None] * b_t[i][:, None, :]
        out = (s < low) | (s > high)
        overflows += tf.math.count_nonzero(out, dtype=tf.int64)
        if overflow == "wrap":
            s = tf.bitwise.bitwise_and(s - low, tf.constant(2**32 - 1, tf.int64)) + low
        else:
            s = tf.clip_by_value(s, low, high)
        return i + 1, s, overflows

    def outer(c, total, overflows):
        start = c * chunk
        stop = tf.minimum(start + chunk, k)
        _, acc, overflows = tf.while_loop(
            lambda i, acc, overflows: i < stop, inner,
            (start, tf.zeros(out_shape, tf.int64), overflows), parallel_iterations=1, shape_invariants=_INVARIANTS)
        # int32 -> float32 rounds to nearest even.
        return c + 1, total + tf.cast(tf.cast(acc, tf.int32), tf.float32), overflows

    _, total, overflows = tf.while_loop(
        lambda c, total, overflows: c < num_chunks, outer,
        (tf.constant(0), tf.zeros(out_shape, tf.float32), tf.constant(0, tf.int64)),
        parallel_iterations=1, shape_invariants=_INVARIANTS)
    return total, overflows
