"""The GEMM every product of `tfhfp8.gemm` runs on, its accumulators and statistics,
and the custom gradient that makes a product and its two gradient products three
GEMMs.

`product` is one (batched) GEMM `C[o] = sum_k A[m, k] B[k, n]` summed as a
`tfhfp8.Accumulator` says: `tf.linalg.matmul` for `"float32"`, otherwise the
accumulating kernels of `tfhfp8.ops` (the C++ kernels or the TF-ops ones: `ops` chooses).
`three_gemms` gives a product the gradients `dA` (`"input_gradient"`) and `dB`
(`"weight_gradient"`), GEMMs with their own accumulators.
"""

import dataclasses

import tensorflow as tf

from tfhfp8 import accumulation, formats, ops
from tfhfp8.ops import tf_backend, tf_fp32_scales
from tfhfp8.quantization import quantize, seed_tensor

GEMM_KINDS = ("forward", "input_gradient", "weight_gradient")


@dataclasses.dataclass(eq=False)
class TensorScaled:
    """A GEMM operand's per-tensor scaled format (`BlockScaled(..., block_size=None)`:
    Transformer Engine's and Keras' FP8) with the FP32 scale its values were rounded
    with: they are `fl(q * scale)`, `q` in the element format. A fused accumulator
    multiplies the elements `q`, as an FP8 tensor core multiplies the FP8 data, and
    multiplies the sum by the two operands' scales after it, as cuBLAS' epilogue
    applies `scale_a * scale_b` (the order of that epilogue's multiplications is not
    documented: here `sum * (scale_a * scale_b)`, in FP32). Other accumulators read
    the values and ignore the scale.

    `scale`: a float32 scalar tensor; None until known: an output gradient's is set by
    whoever rounds that gradient, before its GEMMs run.
    """

    format: formats.BlockScaled
    scale: tf.Tensor = None


def is_tensor_scaled(fmt):
    """True for a per-tensor scaled format (one FP32 scale, `BlockScaled` without
    blocks), whose GEMM operands go as `TensorScaled`."""
    return isinstance(fmt, formats.BlockScaled) and fmt.per_tensor


def rounded_operand(x, fmt):
    """`(x rounded to fmt, the format its GEMMs take)`: nearest even, saturating; a
    per-tensor scaled `fmt` with the scale of `x`'s amax, as a `TensorScaled`."""
    if not is_tensor_scaled(fmt):
        return quantize(x, fmt, saturate=True), fmt
    scale = tf_fp32_scales.current_scale(x, fmt)
    return quantize(x, fmt, saturate=True, scale=scale), TensorScaled(fmt, scale)


def _unscaled(fmt):
    """`(format, scale or None)` of an operand format (see `TensorScaled`)."""
    return (fmt.format, fmt.scale) if isinstance(fmt, TensorScaled) else (fmt, None)


def _fused_elements(x, fmt, scale, name):
    """`(values the instruction multiplies, their scale or None)`: for a per-tensor
    scaled `fmt`, the elements of `x` (see `TensorScaled`)."""
    if not is_tensor_scaled(fmt):
        return x, None
    if scale is None:
        raise ValueError(
            f"{name}: an operand in the per-tensor scaled format {fmt!r} reaches a fused "
            "accumulator without its scale (tfhfp8.gemm.TensorScaled), which it needs to "
            "multiply the FP8 elements as the tensor core does")
    return tf_fp32_scales.tensor_scaled_elements(x, fmt, scale), scale


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
    elif accumulator.kind == "fused":
        for name, fmt in zip(names, (first, second)):
            accumulator.input_type(name, fmt)
    elif accumulator.kind == "int32":
        for name, fmt in zip(names, (first, second)):
            if not (isinstance(fmt, formats.DynamicFixedPoint) and fmt.axis is None
                    and fmt.block_size is None and fmt.bits <= 32):
                raise ValueError(
                    f"{name}: the 'int32' accumulator multiplies the integer mantissas of "
                    f"dynamic fixed point operands with one exponent per tensor "
                    f"(DynamicFixedPoint(bits, axis=None)); got {fmt!r}")


def checked_formats(accumulator, first_format, second_format, grad_format, names):
    """`(accumulators, first, second, grad)` of a public GEMM (`matmul`, `conv`): the
    accumulators per GEMM kind (see `accumulators`) and the formats (None: not given),
    or a ValueError naming the argument (`names`: those of the first two formats) that
    its GEMMs' accumulators cannot take."""
    accs = accumulators(accumulator)
    first = None if first_format is None else formats.get(first_format)
    second = None if second_format is None else formats.get(second_format)
    grad = None if grad_format is None else formats.get(grad_format)
    check_operands(accs["forward"], first, second, names)
    accs = _without_unformatted_gradient(accs, accumulator, grad)
    check_operands(accs["input_gradient"], grad, second, ("grad_format", names[1]))
    check_operands(accs["weight_gradient"], first, grad, (names[0], "grad_format"))
    return accs, first, second, grad


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


def gemm_seed(seed, accs):
    """The int64 seed tensor of a public GEMM's stochastic accumulators (`seed` as in
    `tfhfp8.quantize`); zero when none of `accs` rounds stochastically."""
    if any(acc.kind == "float" and acc.rounding == "stochastic" for acc in accs.values()):
        return seed_tensor(seed)
    return tf.zeros([], tf.int64)


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


def product(a, b, accumulator, a_fmt, b_fmt, seed):
    """(a @ b, swamped, overflows, additions) for operands already in their formats;
    `additions`: the number of inner additions (outputs x K)."""
    zero = tf.constant(0, tf.int64)
    (a_fmt, a_scale), (b_fmt, b_scale) = _unscaled(a_fmt), _unscaled(b_fmt)
    if accumulator.kind == "float32":
        return tf.linalg.matmul(a, b), zero, zero, zero
    # The kernels have no gradient of their own (custom gradients are around them):
    # nothing of their loops is recorded.
    a3, b3, out_shape = _as_3d(tf.stop_gradient(a), tf.stop_gradient(b))
    additions = tf.cast(tf.size(a3), tf.int64) * tf.cast(tf.shape(b3)[-1], tf.int64)
    if accumulator.kind == "float":
        c, swamped = ops.accumulating_matmul(a3, b3, *accumulator.kernel_arguments(), seed)
        return tf.reshape(c, out_shape), swamped, zero, additions
    if accumulator.kind == "fused":
        a_type, b_type = accumulator.input_type("a", a_fmt), accumulator.input_type("b", b_fmt)
        if accumulator.truncates_inputs:  # TF32: the instruction ignores 13 mantissa bits
            a3 = quantize(a3, a_type, rounding="toward_zero")
            b3 = quantize(b3, b_type, rounding="toward_zero")
        else:
            a3, a_scale = _fused_elements(a3, a_fmt, a_scale, "a")
            b3, b_scale = _fused_elements(b3, b_fmt, b_scale, "b")
        c, swamped = ops.fused_matmul(a3, b3, *accumulator.kernel_arguments(a_type, b_type))
        scales = [s for s in (a_scale, b_scale) if s is not None]
        if scales:  # the epilogue: sum * (scale_a * scale_b)
            c = c * tf.reduce_prod(tf.stack(scales))
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



def three_gemms(forward, input_gradient, weight_gradient, accs, seed, stats,
                gradient_format=None):
    """A product `y = f(x, w)` and its gradients as three GEMMs: a function `(x, w) ->
    y` with a custom gradient, each GEMM summed by its accumulator in `accs` (by GEMM
    kind) with its stochastic seed (`seed`, `seed + 1` for the input gradient, `seed
    + 2` for the weight gradient), its statistics recorded in `stats` under its kind.

    - `forward(x, w, accumulator, seed)` -> `(y, saved, swamped, overflows,
      additions)`, `saved`: what the gradients reuse (None: nothing);
    - `input_gradient(dy, x, w, saved, accumulator, seed)`, then `weight_gradient(...)`
      (it may reuse what the first computed) -> `(dx or dw, swamped, overflows,
      additions)`.

    `gradient_format`: the format the output gradient is rounded to (nearest even,
    saturating) before the gradient GEMMs (a `TensorScaled` gets the scale used);
    None: they take it as it comes.
    """

    @tf.custom_gradient
    def gemms(x, w):
        y, saved, *counts = forward(x, w, accs["forward"], seed)
        stats.record("forward", *counts)

        def grad(dy):
            if isinstance(gradient_format, TensorScaled):
                dy, scaled = rounded_operand(dy, gradient_format.format)
                gradient_format.scale = scaled.scale  # read by the gradient GEMMs
            elif gradient_format is not None:
                dy = quantize(dy, gradient_format, saturate=True)
            dx, *counts = input_gradient(dy, x, w, saved, accs["input_gradient"], seed + 1)
            stats.record("input_gradient", *counts)
            dw, *counts = weight_gradient(dy, x, w, saved, accs["weight_gradient"], seed + 2)
            stats.record("weight_gradient", *counts)
            return dx, dw

        return y, grad

    return gemms
