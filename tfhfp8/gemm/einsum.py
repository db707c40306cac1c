"""Two-operand einsums with emulated sums: a batched GEMM over the contracted labels,
`K` running over them in the order of the first operand's subscripts; the gradient
einsums `dC,B->A` and `A,dC->B` likewise."""

import tensorflow as tf

from tfhfp8 import formats
from tfhfp8.gemm import axes, products


def einsum_terms(equation, rank_a, rank_b):
    """`(a, b, c)`: the subscripts of `equation` (`"A,B->C"`, `...` spelled out for
    operands of these ranks). A ValueError for equations that are not one GEMM: a
    label repeated within a term or summed within one operand alone."""
    a, b, c = axes.GemmAxes(equation, rank_a, rank_b).terms
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


def einsum_product(a, b, terms, accumulator, a_fmt, b_fmt, seed):
    """`(c, swamped, overflows, additions)`: `einsum(a, b)` (`terms`: the subscripts of
    `a`, `b`, `c`, from `einsum_terms`) as one batched GEMM (see `products.product`):
    batch labels (in all three terms), M (a and c), K (a and b, in a's order), N (b and
    c)."""
    ta, tb, tc = terms
    batch = [x for x in tc if x in ta and x in tb]
    m = [x for x in ta if x in tc and x not in tb]
    k = [x for x in ta if x in tb and x not in tc]
    n = [x for x in tb if x in tc and x not in ta]
    if accumulator.kind == "fused" and [x for x in tb if x in k] != k and any(
            isinstance(fmt, formats.BlockScaled) for fmt in (a_fmt, b_fmt)):
        # Each operand's blocks run along its reduction axes merged in its own order
        # (tfhfp8.gemm.axes); a matrix unit's block scales need them in one order.
        raise NotImplementedError(
            f"einsum {ta},{tb}->{tc}: block-scaled operands of a fused accumulator "
            f"({accumulator}) need the reduction axes {k} in the same order in both "
            "operands")
    sa, sb = tf.shape(a), tf.shape(b)
    size = {x: sa[ta.index(x)] for x in ta}
    size.update({x: sb[tb.index(x)] for x in tb if x not in size})

    def prod(labels):
        return tf.reduce_prod(tf.stack([size[x] for x in labels])) if labels else 1

    a3 = tf.reshape(tf.transpose(a, [ta.index(x) for x in batch + m + k]),
                    [-1, prod(m), prod(k)])
    b3 = tf.reshape(tf.transpose(b, [tb.index(x) for x in batch + k + n]),
                    [-1, prod(k), prod(n)])
    c, swamped, overflows, additions = products.product(a3, b3, accumulator, a_fmt, b_fmt, seed)
    order = batch + m + n
    c = tf.reshape(c, tf.stack([size[x] for x in order]) if order else [])
    return tf.transpose(c, [order.index(x) for x in tc]), swamped, overflows, additions


def _einsum(a, b, terms, accs, a_fmt, b_fmt, grad_fmt, seed, stats):
    ta, tb, tc = terms

    def forward(a, b, accumulator, seed):
        c, *counts = einsum_product(a, b, terms, accumulator, a_fmt, b_fmt, seed)
        return (c, None, *counts)

    def input_gradient(dc, a, b, _, accumulator, seed):
        return einsum_product(dc, b, (tc, tb, ta), accumulator, grad_fmt, b_fmt, seed)

    def weight_gradient(dc, a, b, _, accumulator, seed):
        return einsum_product(a, dc, (ta, tc, tb), accumulator, a_fmt, grad_fmt, seed)

    return products.three_gemms(forward, input_gradient, weight_gradient, accs, seed,
                                stats)(a, b)


def layer_einsum(a, b, equation, accumulators, formats, seed, stats):
    """A two-operand einsum of a layer (EinsumDense, attention's products); `formats`:
    those of `a`, `b` and the output gradient."""
    a, b = tf.convert_to_tensor(a), tf.convert_to_tensor(b)
    a_fmt, b_fmt, e_fmt = formats
    return _einsum(a, b, einsum_terms(equation, a.shape.rank, b.shape.rank), accumulators,
                   a_fmt, b_fmt, e_fmt, seed, stats)
