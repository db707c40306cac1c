"""`tfhfp8.matmul`: the batched matrix product with emulated sums, and the layers' GEMM
(`layer_matmul`): `C = A B` (`"forward"`), `dA = dC B^T` (`"input_gradient"`), `dB =
A^T dC` (`"weight_gradient"`), each summed by its accumulator."""

import dataclasses

import tensorflow as tf

from tfhfp8.gemm import axes, products
from tfhfp8.quantization import as_float_tensor


def matmul(a, b, accumulator="float32", transpose_a=False, transpose_b=False,
           a_format=None, b_format=None, grad_format=None, seed=None, stats=None):
    """`a @ b` (batched like `tf.linalg.matmul`) with its sums emulated.

    Args:
      a, b: float tensors `[..., M, K]` and `[..., K, N]` (after the transposes):
        float32, or float16, bfloat16, float64 cast to float32 (other dtypes are a
        TypeError).
      accumulator: a `tfhfp8.Accumulator` or its name, used by the forward GEMM and the
        two gradient GEMMs; or a dict `{"forward", "input_gradient",
        "weight_gradient"}` (missing kinds: `"float32"`).
      transpose_a, transpose_b: as in `tf.linalg.matmul`.
      a_format, b_format: formats the operands are rounded to first (nearest even,
        saturating); block formats block them along K (`a`'s last axis, `b`'s
        second-last after the transposes), whatever axis they name. A float
        accumulator needs formats whose products are exact in float32 (`FloatFormat`
        with at most 11 mantissa bits, `DynamicFixedPoint` with at most 13 bits);
        `"int32"` needs per-tensor `DynamicFixedPoint` formats.
      grad_format: the format the gradient of the output is rounded to before the
        gradient GEMMs. Without it they sum in FP32 (a dict asking for emulated
        gradient sums without it is a ValueError).
      seed: for stochastic accumulators, as in `tfhfp8.quantize` (None: fresh).
      stats: internal (the layers' statistics).

    Returns:
      a float32 tensor. The gradient flows to `a` and `b` (straight through their
      rounding).

    Example:

    >>> import tensorflow as tf, tfhfp8
    >>> a = tf.fill([1, 4096], 1.0)
    >>> b = tf.fill([4096, 1], 1.0)
    >>> float(tfhfp8.matmul(a, b, "float16", a_format="float8_e4m3",
    ...                     b_format="float8_e4m3")[0, 0])  # 2048 + 1 rounds to 2048
    2048.0
    >>> float(tfhfp8.matmul(a, b, "float16_chunk64", a_format="float8_e4m3",
    ...                     b_format="float8_e4m3")[0, 0])
    4096.0
    """
    accs, a_format, b_format, grad_format = products.checked_formats(
        accumulator, a_format, b_format, grad_format, ("a_format", "b_format"))
    a = tf.cast(as_float_tensor(a, "matmul: a"), tf.float32)
    b = tf.cast(as_float_tensor(b, "matmul: b"), tf.float32)
    a, b = _checked_shapes(a, b, transpose_a, transpose_b)
    if transpose_a:
        a = tf.linalg.matrix_transpose(a)
    if transpose_b:
        b = tf.linalg.matrix_transpose(b)
    if a_format is not None:
        a, a_format = _quantize_along_k(a, a_format, -1)
    if b_format is not None:
        b, b_format = _quantize_along_k(b, b_format, -2)
    if products.is_tensor_scaled(grad_format):
        grad_format = products.TensorScaled(grad_format)  # its scale: in the backward pass
    return _matmul(a, b, accs, a_format, b_format, grad_format,
                   products.gemm_seed(seed, accs), stats or products.Stats())


def _checked_shapes(a, b, transpose_a, transpose_b):
    """`a`, `b` as given, or a ValueError naming their shapes: ranks below 2, different
    K, batch dimensions that do not broadcast (checked when run where not yet known)."""
    shapes = (f"shapes {a.shape.as_list() if a.shape.rank is not None else a.shape} and "
              f"{b.shape.as_list() if b.shape.rank is not None else b.shape} "
              f"(transpose_a={transpose_a}, transpose_b={transpose_b})")
    for name, x in (("a", a), ("b", b)):
        if x.shape.rank is not None and x.shape.rank < 2:
            raise ValueError(f"matmul: a and b need rank 2 or more ([..., M, K] and "
                             f"[..., K, N]); {name} has rank {x.shape.rank}: {shapes}")
    if a.shape.rank is None or b.shape.rank is None:
        return a, b
    k_a = a.shape[-2] if transpose_a else a.shape[-1]
    k_b = b.shape[-1] if transpose_b else b.shape[-2]
    if k_a is not None and k_b is not None:
        if k_a != k_b:
            raise ValueError(f"matmul: the reduction length K of a ({k_a}) and of b ({k_b}) "
                             f"differ: {shapes}")
    else:
        k_a = tf.shape(a)[-2 if transpose_a else -1]
        k_b = tf.shape(b)[-1 if transpose_b else -2]
        check = tf.debugging.Assert(
            tf.equal(k_a, k_b),
            ["matmul: the reduction length K of a and of b differ: shapes", tf.shape(a),
             "and", tf.shape(b), f"(transpose_a={transpose_a}, transpose_b={transpose_b})"])
        with tf.control_dependencies([check]):
            a = tf.identity(a)
    if b.shape.rank > 2:
        try:
            tf.broadcast_static_shape(a.shape[:-2], b.shape[:-2])
        except ValueError:
            raise ValueError(f"matmul: the batch dimensions of a and b do not broadcast: "
                             f"{shapes}") from None
    return a, b


def _quantize_along_k(x, fmt, k_axis):
    """`products.rounded_operand(x, fmt)`; a block format's blocks run along the GEMM's
    reduction axis K (`k_axis`), whatever axis the format names (as the layers block
    each GEMM's operands, `tfhfp8.gemm.axes`)."""
    if axes.axis_dependent(fmt):
        fmt = dataclasses.replace(fmt, axis=k_axis)
    return products.rounded_operand(x, fmt)


def _matmul(a, b, accs, a_fmt, b_fmt, grad_fmt, seed, stats, round_grad=True):
    """`a @ b` (operands already in their formats `a_fmt`, `b_fmt`) and its gradient
    GEMMs (see `products.three_gemms`); `round_grad`: the output gradient is rounded
    to `grad_fmt` first (the layers round it themselves)."""

    def forward(a, b, accumulator, seed):
        c, *counts = products.product(a, b, accumulator, a_fmt, b_fmt, seed)
        return (c, None, *counts)

    def input_gradient(dc, a, b, _, accumulator, seed):
        da, *counts = products.product(dc, tf.linalg.matrix_transpose(b), accumulator,
                                       grad_fmt, b_fmt, seed)
        return (_reduce_to(da, tf.shape(a), a.shape.rank), *counts)

    def weight_gradient(dc, a, b, _, accumulator, seed):
        if b.shape.rank == 2 and a.shape.rank > 2:
            # The batch of `a` folds into the reduction of the kernel gradient.
            a2 = tf.reshape(a, [-1, tf.shape(a)[-1]])
            dc2 = tf.reshape(dc, [-1, tf.shape(dc)[-1]])
            return products.product(tf.transpose(a2), dc2, accumulator, a_fmt, grad_fmt, seed)
        db, *counts = products.product(tf.linalg.matrix_transpose(a), dc, accumulator, a_fmt,
                                       grad_fmt, seed)
        return (_reduce_to(db, tf.shape(b), b.shape.rank), *counts)

    return products.three_gemms(forward, input_gradient, weight_gradient, accs, seed, stats,
                                grad_fmt if round_grad else None)(a, b)


def _reduce_to(g, shape, rank):
    """Sums the dimensions that batch broadcasting added or widened back to an
    operand's shape (a tensor `shape`, `rank` its length)."""
    extra = g.shape.rank - rank
    if extra > 0:
        g = tf.reduce_sum(g, axis=list(range(extra)))
    g_shape = tf.shape(g)
    axes = tf.where((shape[:-2] == 1) & (g_shape[:-2] != 1))[:, 0]
    return tf.reshape(tf.reduce_sum(g, axis=tf.cast(axes, tf.int32), keepdims=True), shape)


def layer_matmul(x, kernel, accumulators, formats, seed, stats):
    """A layer's `x @ kernel` (see `tfhfp8.gemm`: operands and output gradient already
    rounded by the layer); `formats`: those of `x`, `kernel` and the output gradient."""
    a_fmt, w_fmt, e_fmt = formats
    return _matmul(x, kernel, accumulators, a_fmt, w_fmt, e_fmt, seed, stats, round_grad=False)
