"""GEMMs with emulated accumulation: `tfhfp8.matmul` and the convolutions of the layers.

Every product here is one GEMM `C[o] = sum_k A[m, k] B[k, n]` summed as a
`tfhfp8.Accumulator` says, on the C++ kernels when they are loaded and the TF-ops
implementation (`tfhfp8.ops.tf_accumulate`, compiled by XLA) otherwise; the
gradients are GEMMs of their own with their own accumulators:
`dA = dC @ B^T` (`"input_gradient"`), `dB = A^T @ dC` (`"weight_gradient"`).
A convolution is the GEMM of its input patches (`K = kernel positions x in_channels`,
in that order); its input gradient is itself a convolution of the output gradient
(dilated by the strides) with the flipped kernel, whose reduction runs over
`kernel positions x out_channels`, and its kernel gradient the GEMM of the patches
with the output gradient (`K = batch x output positions`). A transposed convolution
is the input gradient of the convolution it transposes (forward), that convolution
itself (its input gradient) and the same kernel-gradient GEMM with the roles of input
and output swapped. A two-operand einsum is a batched GEMM over its contracted labels,
`K` running over them in the order of the first operand's subscripts (the gradient
einsums `dC,B->A` and `A,dC->B` likewise).
"""

import dataclasses
import numpy as np
import tensorflow as tf

from tfhfp8 import accumulation, formats, ops, portable_conv
from tfhfp8.ops import tf_backend
from tfhfp8.quantization import _as_float_tensor, _seed_tensor, quantize

GEMM_KINDS = ("forward", "input_gradient", "weight_gradient")


def accumulators(accumulator):
    """`{"forward", "input_gradient", "weight_gradient"} -> Accumulator` from one
    accumulator (used for all three) or a dict of some of them (the others FP32)."""
    if isinstance(accumulator, dict):
        unknown = set(accumulator) - set(GEMM_KINDS)
        if unknown:
            raise ValueError(f"accumulation: unknown GEMM kinds {sorted(unknown)}; the kinds "
                             f"are {GEMM_KINDS}")
        result = {}
        for kind in GEMM_KINDS:
            try:
                result[kind] = accumulation.get(accumulator.get(kind))
            except (ValueError, TypeError) as error:
                raise type(error)(f"accumulation[{kind!r}]: {error}") from None
        return result
    try:
        acc = accumulation.get(accumulator)
    except (ValueError, TypeError) as error:
        raise type(error)(f"accumulation: {error}") from None
    return {kind: acc for kind in GEMM_KINDS}


def check_operands(accumulator, first, second, names):
    """A ValueError naming the operand whose format `accumulator` cannot take."""
    if accumulator.kind == "float":
        for name, fmt in zip(names, (first, second)):
            accumulation.check_operand(name, fmt)
    elif accumulator.kind == "int32":
        for name, fmt in zip(names, (first, second)):
            if not (isinstance(fmt, formats.DynamicFixedPoint) and fmt.axis is None
                    and fmt.block_size is None and fmt.bits <= 32):
                raise ValueError(
                    f"{name}: the 'int32' accumulator multiplies the integer mantissas of "
                    f"dynamic fixed point operands with one exponent per tensor "
                    f"(DynamicFixedPoint(bits, axis=None)); got {fmt!r}")


def _mantissas(x, fmt):
    """(int32 mantissas, shared exponent) of `x`, already rounded to the per-tensor DFP
    `fmt`: the exponent the quantizer picks for `x` itself, so every value is exact."""
    exponent, _ = tf_backend.shared_exponents(x, fmt, "nearest_even")
    exponent = tf.reshape(exponent, [])
    scale = tf.pow(tf.constant(2.0, tf.float64), tf.cast(-exponent, tf.float64))
    return tf.cast(tf.cast(x, tf.float64) * scale, tf.int32), exponent


def _as_3d(a, b):
    """`a`, `b` as `[B, M, K]`, `[B, K, N]` (batch dims broadcast) and the shape of the
    product. With a 2-D `b`, the batch of `a` folds into M (same output order)."""
    a_shape, b_shape = tf.shape(a), tf.shape(b)
    if b.shape.rank == 2:
        out_shape = tf.concat([a_shape[:-1], b_shape[-1:]], 0)
        rows = tf.reduce_prod(a_shape[:-1])  # not -1: ambiguous when K = 0
        return tf.reshape(a, tf.stack([1, rows, a_shape[-1]])), b[None], out_shape
    batch = tf.broadcast_dynamic_shape(a_shape[:-2], b_shape[:-2])
    a = tf.broadcast_to(a, tf.concat([batch, a_shape[-2:]], 0))
    b = tf.broadcast_to(b, tf.concat([batch, b_shape[-2:]], 0))
    out_shape = tf.concat([batch, a_shape[-2:-1], b_shape[-1:]], 0)
    batches = tf.reduce_prod(batch, keepdims=True)  # not -1: ambiguous when empty
    return (tf.reshape(a, tf.concat([batches, a_shape[-2:]], 0)),
            tf.reshape(b, tf.concat([batches, b_shape[-2:]], 0)), out_shape)


def _product(a, b, accumulator, a_fmt, b_fmt, seed):
    """(a @ b, swamped, overflows, additions) for operands already in their formats;
    `additions`: the number of inner additions (outputs x K)."""
    zero = tf.constant(0, tf.int64)
    if accumulator.kind == "float32":
        return tf.linalg.matmul(a, b), zero, zero, zero
    # The kernels have no gradient of their own (custom gradients are around them):
    # nothing of their loops is recorded.
    a3, b3, out_shape = _as_3d(tf.stop_gradient(a), tf.stop_gradient(b))
    additions = tf.cast(tf.size(a3), tf.int64) * tf.cast(tf.shape(b3)[-1], tf.int64)
    if accumulator.kind == "float":
        c, swamped = ops.accumulating_matmul(a3, b3, *accumulator.kernel_arguments(), seed)
        return tf.reshape(c, out_shape), swamped, zero, additions
    ma, ea = _mantissas(a3, a_fmt)
    mb, eb = _mantissas(b3, b_fmt)
    c, overflows = ops.int32_matmul(ma, mb, accumulator.chunk_size or 0, accumulator.overflow)
    scale = tf.pow(tf.constant(2.0, tf.float64), tf.cast(ea + eb, tf.float64))
    c = tf.cast(tf.cast(c, tf.float64) * scale, tf.float32)
    return tf.reshape(c, out_shape), zero, overflows, additions


class Stats:
    """Where a GEMM's statistics go: int64 counts per GEMM kind, added to variables
    (`{"swamped", "additions", "overflows"}`) when given."""

    def __init__(self, variables=None):
        self.variables = variables

    def record(self, kind, swamped, overflows, additions):
        if not self.variables:
            return
        for key, value in (("swamped", swamped), ("overflows", overflows),
                           ("additions", additions)):
            variable = self.variables.get(f"{kind}/{key}")
            if variable is not None:
                variable.assign(tf.cast(value, variable.dtype))


# -- matmul ------------------------------------------------------------------------------
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
        second-last after the transposes), whatever axis they name. A float accumulator needs formats whose products are exact in
        float32 (`FloatFormat` with at most 11 mantissa bits, `DynamicFixedPoint` with
        at most 13 bits); `"int32"` needs per-tensor `DynamicFixedPoint` formats.
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
    accs = accumulators(accumulator)
    a_format = None if a_format is None else formats.get(a_format)
    b_format = None if b_format is None else formats.get(b_format)
    grad_format = None if grad_format is None else formats.get(grad_format)
    a_given, b_given = a_format, b_format  # None: an operand of unknown format
    check_operands(accs["forward"], a_given, b_given, ("a_format", "b_format"))
    accs = _without_unformatted_gradient(accs, accumulator, grad_format)
    check_operands(accs["input_gradient"], grad_format, b_given,
                   ("grad_format", "b_format"))
    check_operands(accs["weight_gradient"], a_given, grad_format,
                   ("a_format", "grad_format"))
    a = tf.cast(_as_float_tensor(a, "matmul: a"), tf.float32)
    b = tf.cast(_as_float_tensor(b, "matmul: b"), tf.float32)
    a, b = _checked_shapes(a, b, transpose_a, transpose_b)
    if transpose_a:
        a = tf.linalg.matrix_transpose(a)
    if transpose_b:
        b = tf.linalg.matrix_transpose(b)
    if a_format is not None:
        a = _quantize_along_k(a, a_format, -1)
    if b_format is not None:
        b = _quantize_along_k(b, b_format, -2)
    seed = _seed_tensor(seed) if any(acc.kind == "float" and acc.rounding == "stochastic"
                                     for acc in accs.values()) else tf.zeros([], tf.int64)
    return _matmul(a, b, accs, a_given, b_given, grad_format, seed, stats or Stats())


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
    """`x` rounded to `fmt` (nearest even, saturating); a block format's blocks run along
    the GEMM's reduction axis K (`k_axis`), whatever axis the format names (as the
    layers block each GEMM's operands, `tfhfp8.layers.gemm_axes`)."""
    from tfhfp8.layers import gemm_axes  # noqa: PLC0415 (layers import this module)
    if gemm_axes.axis_dependent(fmt):
        fmt = dataclasses.replace(fmt, axis=k_axis)
    return quantize(x, fmt, saturate=True)


def _without_unformatted_gradient(accs, accumulator, grad_format):
    """One accumulator without `grad_format`: the gradient GEMMs sum in FP32 (their
    operand has no format); asked for by a dict, it is a ValueError."""
    if grad_format is not None:
        return accs
    emulated = [kind for kind in GEMM_KINDS[1:] if accs[kind].emulates]
    if emulated and isinstance(accumulator, dict):
        raise ValueError(
            f"grad_format: the GEMMs {emulated} emulate their sums, so the output "
            "gradient must be rounded to a format (grad_format) before them")
    float32 = accumulation.get("float32")
    return {**accs, **{kind: float32 for kind in emulated}}


def _matmul(a, b, accs, a_fmt, b_fmt, grad_fmt, seed, stats, round_grad=True):
    @tf.custom_gradient
    def product(a, b):
        c, swamped, overflows, n_c = _product(a, b, accs["forward"], a_fmt, b_fmt, seed)
        stats.record("forward", swamped, overflows, n_c)

        def grad(dc):
            if grad_fmt is not None and round_grad:
                dc = quantize(dc, grad_fmt, saturate=True)
            da, s1, o1, n_da = _product(dc, tf.linalg.matrix_transpose(b), accs["input_gradient"],
                                  grad_fmt, b_fmt, seed + 1)
            stats.record("input_gradient", s1, o1, n_da)
            if b.shape.rank == 2 and a.shape.rank > 2:
                # The batch of `a` folds into the reduction of the kernel gradient.
                a2 = tf.reshape(a, [-1, tf.shape(a)[-1]])
                dc2 = tf.reshape(dc, [-1, tf.shape(dc)[-1]])
                db, s2, o2, n_db = _product(tf.transpose(a2), dc2, accs["weight_gradient"],
                                      a_fmt, grad_fmt, seed + 2)
            else:
                db, s2, o2, n_db = _product(tf.linalg.matrix_transpose(a), dc,
                                      accs["weight_gradient"], a_fmt, grad_fmt, seed + 2)
                db = _reduce_to(db, tf.shape(b), b.shape.rank)
            da = _reduce_to(da, tf.shape(a), a.shape.rank)
            stats.record("weight_gradient", s2, o2, n_db)
            return da, db

        return c, grad

    return product(a, b)


def _reduce_to(g, shape, rank):
    """Sums the dimensions that batch broadcasting added or widened back to an
    operand's shape (a tensor `shape`, `rank` its length)."""
    extra = g.shape.rank - rank
    if extra > 0:
        g = tf.reduce_sum(g, axis=list(range(extra)))
    g_shape = tf.shape(g)
    axes = tf.where((shape[:-2] == 1) & (g_shape[:-2] != 1))[:, 0]
    return tf.reshape(tf.reduce_sum(g, axis=tf.cast(axes, tf.int32), keepdims=True), shape)


# -- einsum ------------------------------------------------------------------------------
def einsum_terms(equation, rank_a, rank_b):
    """`(a, b, c)`: the subscripts of `equation` (`"A,B->C"`, `...` spelled out for
    operands of these ranks). A ValueError for equations that are not one GEMM: a
    label repeated within a term or summed within one operand alone."""
    from tfhfp8.layers import gemm_axes  # noqa: PLC0415 (layers import this module)
    a, b, c = gemm_axes.GemmAxes(equation, rank_a, rank_b).terms
    for term in (a, b, c):
        if len(set(term)) != len(term):
            raise ValueError(f"equation {equation!r}: a label repeated in {term!r} (a trace "
                             "or diagonal) is not a GEMM")
    alone = (set(a) ^ set(b)) - set(c)
    if alone or set(c) - set(a) - set(b):
        raise ValueError(f"equation {equation!r}: labels {sorted(alone or set(c))} are summed "
                         "within one operand or come from none; emulated sums need one "
                         "GEMM 'A,B->C'")
    return a, b, c


def _einsum_product(a, b, terms, accumulator, a_fmt, b_fmt, seed):
    """`einsum(a, b)` as one batched GEMM (see `_product`): batch labels (in all three
    terms), M (a and c), K (a and b, in a's order), N (b and c)."""
    ta, tb, tc = terms
    batch = [x for x in tc if x in ta and x in tb]
    m = [x for x in ta if x in tc and x not in tb]
    k = [x for x in ta if x in tb and x not in tc]
    n = [x for x in tb if x in tc and x not in ta]
    sa, sb = tf.shape(a), tf.shape(b)
    size = {x: sa[ta.index(x)] for x in ta}
    size.update({x: sb[tb.index(x)] for x in tb if x not in size})

    def prod(labels):
        return tf.reduce_prod(tf.stack([size[x] for x in labels])) if labels else 1

    a3 = tf.reshape(tf.transpose(a, [ta.index(x) for x in batch + m + k]),
                    [-1, prod(m), prod(k)])
    b3 = tf.reshape(tf.transpose(b, [tb.index(x) for x in batch + k + n]),
                    [-1, prod(k), prod(n)])
    c, swamped, overflows, additions = _product(a3, b3, accumulator, a_fmt, b_fmt, seed)
    order = batch + m + n
    c = tf.reshape(c, tf.stack([size[x] for x in order]) if order else [])
    return tf.transpose(c, [order.index(x) for x in tc]), swamped, overflows, additions


def _einsum(a, b, terms, accs, a_fmt, b_fmt, grad_fmt, seed, stats):
    ta, tb, tc = terms

    @tf.custom_gradient
    def product(a, b):
        c, swamped, overflows, n_c = _einsum_product(a, b, terms, accs["forward"], a_fmt,
                                                     b_fmt, seed)
        stats.record("forward", swamped, overflows, n_c)

        def grad(dc):
            da, s1, o1, n_da = _einsum_product(dc, b, (tc, tb, ta), accs["input_gradient"],
                                               grad_fmt, b_fmt, seed + 1)
            stats.record("input_gradient", s1, o1, n_da)
            db, s2, o2, n_db = _einsum_product(a, dc, (ta, tc, tb), accs["weight_gradient"],
                                               a_fmt, grad_fmt, seed + 2)
            stats.record("weight_gradient", s2, o2, n_db)
            return da, db

        return c, grad

    return product(a, b)


# -- convolutions ------------------------------------------------------------------------
def _pads(size, kernel, stride, dilation, padding):
    """(output size, pad before, pad after) of one spatial dimension, as TF pads."""
    span = (kernel - 1) * dilation + 1
    if padding == "valid":
        out = max((size - span) // stride + 1, 0)
        return out, 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + span - size, 0)
    return out, total // 2, total - total // 2


def _patches(x, kernel_size, strides, dilations, pads):
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


def conv(x, kernel, strides=1, padding="valid", dilation_rate=1, accumulator="float32",
         x_format=None, kernel_format=None, grad_format=None, seed=None, stats=None):
    """N-d convolution (1, 2 or 3 spatial dims, channels last) as a GEMM of patches,
    each of its three GEMMs summed by its accumulator (see `matmul` for the arguments).
    `kernel`: `[*kernel_size, in_channels, out_channels]`; `padding`: `"valid"` or
    `"same"` (TF's pads)."""
    accs = accumulators(accumulator)
    x_given = None if x_format is None else formats.get(x_format)
    k_given = None if kernel_format is None else formats.get(kernel_format)
    grad_fmt = None if grad_format is None else formats.get(grad_format)
    check_operands(accs["forward"], x_given, k_given, ("x_format", "kernel_format"))
    accs = _without_unformatted_gradient(accs, accumulator, grad_fmt)
    check_operands(accs["input_gradient"], grad_fmt, k_given, ("grad_format", "kernel_format"))
    check_operands(accs["weight_gradient"], x_given, grad_fmt, ("x_format", "grad_format"))
    rank = kernel.shape.rank - 2
    strides, dilations = _tuple(strides, rank), _tuple(dilation_rate, rank)
    padding = padding.lower()
    x = tf.convert_to_tensor(x, tf.float32)
    if x_given is not None:
        x = quantize(x, x_given, saturate=True)
    if k_given is not None:
        kernel = quantize(kernel, k_given, saturate=True)
    seed = _seed_tensor(seed) if any(acc.kind == "float" and acc.rounding == "stochastic"
                                     for acc in accs.values()) else tf.zeros([], tf.int64)
    return _conv(x, tf.convert_to_tensor(kernel, tf.float32), strides, dilations, padding,
                 accs, x_given, k_given, grad_fmt, seed, stats or Stats())


def _tuple(value, rank):
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * rank


class _Geometry:
    """A convolution's geometry: channels-last input of `spatial` size, `kernel_size`,
    `strides`, `dilations`, TF's `pads` and the output size `outs`; `groups` input
    and output channel groups (channel `c` of group `c // (channels / groups)`)."""

    def __init__(self, spatial, kernel_size, strides, dilations, padding, groups=1):
        rank = len(strides)
        self.spatial, self.kernel_size = list(spatial), tuple(kernel_size)
        self.strides, self.dilations, self.groups = strides, dilations, groups
        geometry = [_pads(spatial[i], kernel_size[i], strides[i], dilations[i], padding)
                    for i in range(rank)]
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


def _conv_forward(x, kernel, geo, accumulator, x_fmt, k_fmt, seed):
    """The convolution of channels-last `x` with `kernel` `[*kernel_size, C_in/G,
    C_out]`: the GEMM of its patches, K = kernel positions x input channels (of the
    group). Returns (y, patch rows `[R, kpos * C_in]`, swamped, overflows, additions)."""
    c_in = kernel.shape[-2] * geo.groups
    patches, _ = _patches(x, geo.kernel_size, geo.strides, geo.dilations, geo.pads)
    rows = tf.reshape(patches, [-1, geo.kpos * c_in])
    y, swamped, overflows, additions = _product(
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
    full_pads = _backward_pads(geo.spatial, geo.kernel_size, geo.strides, geo.dilations,
                               geo.pads, geo.outs)
    dpatches, _ = _patches(portable_conv.zero_insert(dy, geo.strides), geo.kernel_size,
                           (1,) * rank, geo.dilations, full_pads)
    flipped = tf.reverse(kernel, list(range(rank)))  # [*k, C_in/G, C_out]
    flipped = tf.reshape(flipped, [geo.kpos, c_in_g, g, c_out // g])
    flipped = tf.transpose(flipped, [2, 0, 3, 1])  # [G, kpos, C_out/G, C_in/G]
    flipped = tf.reshape(flipped, [g, geo.kpos * (c_out // g), c_in_g])
    if g == 1:
        flipped = flipped[0]
    drows = geo.split(tf.reshape(dpatches, [-1, geo.kpos * c_out]), c_out)
    dx, swamped, overflows, additions = _product(drows, flipped, accumulator, dy_fmt, k_fmt,
                                                 seed)
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
    dw, swamped, overflows, additions = _product(a, b, accumulator, x_fmt, dy_fmt, seed)
    if g > 1:  # [G, kpos * C_in/G, C_out/G] -> [kpos, C_in/G, C_out]
        dw = tf.reshape(dw, [g, geo.kpos, c_in // g, c_out // g])
        dw = tf.reshape(tf.transpose(dw, [1, 2, 0, 3]), [geo.kpos, c_in // g, c_out])
    return tf.reshape(dw, kernel_shape), swamped, overflows, additions


def _conv(x, kernel, strides, dilations, padding, accs, x_fmt, k_fmt, grad_fmt, seed, stats,
          round_grad=True, groups=1):
    rank = len(strides)
    geo = _Geometry(x.shape[1:1 + rank], kernel.shape[:rank], strides, dilations, padding,
                    groups)

    @tf.custom_gradient
    def convolution(x, kernel):
        y, rows, swamped, overflows, n_y = _conv_forward(x, kernel, geo, accs["forward"],
                                                         x_fmt, k_fmt, seed)
        stats.record("forward", swamped, overflows, n_y)

        def grad(dy):
            if grad_fmt is not None and round_grad:
                dy = quantize(dy, grad_fmt, saturate=True)
            dw, s2, o2, n_dw = _conv_kernel_grad(rows, dy, kernel.shape, geo,
                                                 accs["weight_gradient"], x_fmt, grad_fmt,
                                                 seed + 2)
            stats.record("weight_gradient", s2, o2, n_dw)
            dx, s1, o1, n_dx = _conv_input_grad(dy, kernel, geo, accs["input_gradient"],
                                                grad_fmt, k_fmt, seed + 1)
            stats.record("input_gradient", s1, o1, n_dx)
            return dx, dw

        return y, grad

    return convolution(x, kernel)


def _transpose_length(size, kernel, stride, dilation, padding, output_padding):
    """Keras' output size of a transposed convolution (its TF backend's
    `compute_conv_transpose_output_shape`)."""
    span = (kernel - 1) * dilation + 1
    if padding == "valid":
        extra = max(span, stride) - span if output_padding is None else output_padding
        return (size - 1) * stride + span + extra
    if output_padding is None:
        return size * stride
    return (size - 1) * stride + span % 2 + output_padding


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
        spatial = [_transpose_length(x.shape[1 + i], kernel.shape[i], strides[i], dilations[i],
                                     padding, None if output_padding is None
                                     else output_padding[i])
                   for i in range(rank)]
    spatial = list(spatial)
    geo = _Geometry(spatial, kernel.shape[:rank], strides, dilations, padding)
    if list(geo.outs) != list(x.shape[1:1 + rank]):
        raise ValueError(f"transposed convolution: an output of size {spatial} does not "
                         f"convolve back to the input's {list(x.shape[1:1 + rank])} (strides "
                         f"{strides}, padding {padding!r}, output_padding {output_padding})")

    @tf.custom_gradient
    def convolution(x, kernel):
        y, swamped, overflows, n_y = _conv_input_grad(x, kernel, geo, accs["forward"], x_fmt,
                                                      k_fmt, seed)
        stats.record("forward", swamped, overflows, n_y)

        def grad(dy):
            dx, rows, s1, o1, n_dx = _conv_forward(dy, kernel, geo, accs["input_gradient"],
                                                   grad_fmt, k_fmt, seed + 1)
            stats.record("input_gradient", s1, o1, n_dx)
            dw, s2, o2, n_dw = _conv_kernel_grad(rows, x, kernel.shape, geo,
                                                 accs["weight_gradient"], grad_fmt, x_fmt,
                                                 seed + 2)
            stats.record("weight_gradient", s2, o2, n_dw)
            return dx, dw

        return y, grad

    return convolution(x, kernel)


def _backward_pads(spatial, kernel_size, strides, dilations, pads, outs):
    """Pads of the stride-dilated output gradient for the input-gradient convolution."""
    full = []
    for i in range(len(strides)):
        reach = (kernel_size[i] - 1) * dilations[i]
        padded = spatial[i] + pads[i][0] + pads[i][1]
        right = padded - ((outs[i] - 1) * strides[i] + 1 + reach)
        full.append((reach, reach + right))
    return full


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
    geometry = [_pads(spatial[i], kernel_size[i], strides[i], dilations[i], padding)
                for i in range(rank)]
    pads = [(g[1], g[2]) for g in geometry]

    @tf.custom_gradient
    def convolution(x, kernel):
        patches, outs = _patches(x, kernel_size, strides, dilations, pads)
        rows = tf.transpose(tf.reshape(patches, [-1, kpos, channels]), [2, 0, 1])
        kern = tf.transpose(tf.reshape(kernel, [kpos, channels, mult]), [1, 0, 2])
        y, swamped, overflows, n_y = _product(rows, kern, accs["forward"], x_fmt, k_fmt, seed)
        stats.record("forward", swamped, overflows, n_y)
        batch = tf.shape(x)[0]
        y = tf.reshape(tf.transpose(y, [1, 0, 2]),
                       tf.concat([[batch], outs, [channels * mult]], 0))

        def grad(dy):
            dy_c = tf.transpose(tf.reshape(dy, [-1, channels, mult]), [1, 0, 2])
            dw, s2, o2, n_dw = _product(tf.transpose(rows, [0, 2, 1]), dy_c,
                                        accs["weight_gradient"], x_fmt, grad_fmt, seed + 2)
            stats.record("weight_gradient", s2, o2, n_dw)
            dw = tf.reshape(tf.transpose(dw, [1, 0, 2]), kernel.shape)
            full = _backward_pads(spatial, kernel_size, strides, dilations, pads, outs)
            dpatches, _ = _patches(portable_conv.zero_insert(dy, strides), kernel_size,
                                   (1,) * rank, dilations, full)
            drows = tf.reshape(dpatches, [-1, kpos, channels, mult])
            drows = tf.reshape(tf.transpose(drows, [2, 0, 1, 3]), [channels, -1, kpos * mult])
            flipped = tf.reshape(tf.reverse(kernel, list(range(rank))), [kpos, channels, mult])
            flipped = tf.reshape(tf.transpose(flipped, [1, 0, 2]), [channels, kpos * mult, 1])
            dx, s1, o1, n_dx = _product(drows, flipped, accs["input_gradient"], grad_fmt,
                                        k_fmt, seed + 1)
            stats.record("input_gradient", s1, o1, n_dx)
            padded_shape = [spatial[i] + pads[i][0] + pads[i][1] for i in range(rank)]
            dx = tf.reshape(tf.transpose(dx[..., 0], [1, 0]),
                            tf.concat([[batch], padded_shape, [channels]], 0))
            crop = tuple(slice(pads[i][0], pads[i][0] + spatial[i]) for i in range(rank))
            return dx[(slice(None),) + crop], dw

        return y, grad

    return convolution(x, kernel)


# -- the emulated layers' GEMMs -----------------------------------------------------------
# Their operands are already rounded by the layer (`Q_a`, `Q_w`), the output gradient
# by `Q_e` (possibly divided by a power-of-two loss scale: products stay exact), and
# the policy checked the formats: the GEMMs run on them as they are.
def layer_matmul(x, kernel, accumulators, formats, seed, stats):
    a_fmt, w_fmt, e_fmt = formats
    return _matmul(x, kernel, accumulators, a_fmt, w_fmt, e_fmt, seed, stats,
                   round_grad=False)


def layer_conv(x, kernel, strides, padding, dilation_rate, data_format, accumulators,
               formats, seed, stats, groups=1):
    """A Keras convolution (`data_format` `"channels_last"` or `"channels_first"`)."""
    a_fmt, w_fmt, e_fmt = formats
    rank = kernel.shape.rank - 2
    if data_format == "channels_first":
        x = tf.transpose(x, [0] + list(range(2, rank + 2)) + [1])
    y = _conv(x, kernel, _tuple(strides, rank), _tuple(dilation_rate, rank), padding.lower(),
              accumulators, a_fmt, w_fmt, e_fmt, seed, stats, round_grad=False, groups=groups)
    if data_format == "channels_first":
        y = tf.transpose(y, [0, rank + 1] + list(range(1, rank + 1)))
    return y


def layer_depthwise_conv(x, kernel, strides, padding, dilation_rate, data_format,
                         accumulators, formats, seed, stats):
    """A Keras depthwise convolution (kernel `[*kernel_size, channels, multiplier]`)."""
    a_fmt, w_fmt, e_fmt = formats
    rank = kernel.shape.rank - 2
    if data_format == "channels_first":
        x = tf.transpose(x, [0] + list(range(2, rank + 2)) + [1])
    y = _depthwise(x, kernel, _tuple(strides, rank), _tuple(dilation_rate, rank),
                   padding.lower(), accumulators, a_fmt, w_fmt, e_fmt, seed, stats)
    if data_format == "channels_first":
        y = tf.transpose(y, [0, rank + 1] + list(range(1, rank + 1)))
    return y


def layer_conv_transpose(x, kernel, strides, padding, output_padding, dilation_rate,
                         data_format, accumulators, formats, seed, stats, spatial=None):
    """A Keras transposed convolution (kernel `[*kernel_size, filters, in_channels]`;
    `spatial`: the output's spatial size, e.g. from the layer's
    `compute_output_shape`)."""
    a_fmt, w_fmt, e_fmt = formats
    rank = kernel.shape.rank - 2
    if data_format == "channels_first":
        x = tf.transpose(x, [0] + list(range(2, rank + 2)) + [1])
    y = _conv_transpose(tf.convert_to_tensor(x), tf.convert_to_tensor(kernel),
                        _tuple(strides, rank), _tuple(dilation_rate, rank), padding.lower(),
                        None if output_padding is None else _tuple(output_padding, rank),
                        accumulators, a_fmt, w_fmt, e_fmt, seed, stats, spatial)
    if data_format == "channels_first":
        y = tf.transpose(y, [0, rank + 1] + list(range(1, rank + 1)))
    return y


def layer_einsum(a, b, equation, accumulators, formats, seed, stats):
    """A two-operand einsum of a layer (EinsumDense, attention's products); `formats`:
    those of `a`, `b` and the output gradient."""
    a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
    a_fmt, b_fmt, e_fmt = formats
    return _einsum(a, b, einsum_terms(equation, a.shape.rank, b.shape.rank), accumulators,
                   a_fmt, b_fmt, e_fmt, seed, stats)
