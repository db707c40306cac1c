"""Which axes each operand of a GEMM is blocked along, in the forward and both
backward GEMMs.

A block-scaled operand is only useful to a matrix unit when its blocks run along the
axis the GEMM reduces over: each dot product then multiplies blocks whose scales can
be applied once per block. A layer's forward GEMM and its two backward GEMMs reduce
over different axes (for a Dense layer `y = x W`, `x` of shape `(tokens, in)`):

| GEMM | operands, blocked along |
|---|---|
| forward `y = x W` | `x` along `in`, `W` along `in` (its axis 0) |
| input gradient `dx = dy W^T` | `dy` along `out`, `W` along `out` (its axis 1) |
| weight gradient `dW = x^T dy` | `x` along `tokens`, `dy` along `tokens` |

So `x`, `W` and `dy` are each quantized twice, once per GEMM that reads them, as
block-scaled hardware does (OCP MX v1.0 §6, Rouhani et al. 2023 §3; the question of
triton-lang/triton#8839). Every bilinear GEMM of an emulated layer is described by an
einsum equation `A,B->C`; for an operand, the reduction axes of a GEMM are the letters
it shares with the GEMM's other operand and that the GEMM's result lacks:

- forward `C = A.B`: letters in `A` and `B`, not in `C`;
- `dA = einsum(C, B -> A)`: letters in `C` and `B`, not in `A`;
- `dB = einsum(A, C -> B)`: letters in `A` and `C`, not in `B` (the batch axes).

When there are several (an EinsumDense over two axes, the batch and time axes of a
weight gradient), they are merged, in the operand's order, into one axis that the
blocks run along (`quantize_along`). Convolutions become such GEMMs through their
patches (`tfhfp8.layers.convolution`; the `dx` GEMM's result, the patches'
gradient, is summed back into the input positions in FP32): a convolution's forward
GEMM reduces over kernel window x input channels, in `(window, channels)` order
(TensorFlow's kernel layout), its `dx` GEMM over output channels and its `dW` GEMM
over batch x output positions; a depthwise convolution's forward GEMM over the window
of each channel and its `dx` GEMM over the depth multiplier; a transposed
convolution, a convolution's input gradient, swaps them (forward over input
channels, `dx` over the output gradient's patches, window x filters).

>>> spec = GemmAxes("...i,io->...o", 3, 2)
>>> spec.forward, spec.input_grad, spec.kernel_grad
(((2,), (0,)), ((2,), (1,)), ((0, 1), (0, 1)))
"""

import dataclasses
import string

import tensorflow as tf

from tfhfp8 import formats


def axis_dependent(fmt):
    """True for formats whose result depends on the axis 1D blocks run along."""
    if isinstance(fmt, formats.BlockScaled):
        return not (fmt.per_tensor or fmt.tiles)
    return isinstance(fmt, formats.DynamicFixedPoint) and fmt.block_size is not None


def tiled(fmt):
    """True for a format of 2D tiles (`BlockScaled(..., block_shape=(rows, cols))`): a
    layer quantizes such an operand once, tiled in the layout `[K, rest]` of its
    forward GEMM (`quantize_tiled`), for all the GEMMs that read it (Transformer
    Engine's 128 x 128 weights serve the forward and the `dx` GEMM alike)."""
    return isinstance(fmt, formats.BlockScaled) and fmt.tiles


def _expand(equation, rank_a, rank_b):
    """The equation with `...` replaced by explicit letters (same letters in every
    term, aligned on the right as einsum broadcasts)."""
    inputs, output = equation.replace(" ", "").split("->")
    a, b = inputs.split(",")
    used = set(equation)
    free = [c for c in string.ascii_letters if c not in used]

    def ellipsis_rank(term, rank):
        return rank - (len(term) - 3) if "..." in term else 0

    n = max(ellipsis_rank(a, rank_a), ellipsis_rank(b, rank_b))
    letters = "".join(free[:n])

    def fill(term, rank):
        if "..." not in term:
            return term
        k = rank - (len(term) - 3)
        return term.replace("...", letters[n - k:])

    a, b = fill(a, rank_a), fill(b, rank_b)
    if "..." in output:
        output = output.replace("...", letters)
    return a, b, output


@dataclasses.dataclass(frozen=True)
class GemmAxes:
    """The reduction axes of both operands in each of a bilinear op's three GEMMs.

    `forward`, `input_grad`, `kernel_grad`: pairs of axis tuples. In `forward`, the
    axes of `(A, B)`; in `input_grad` (`dA = dC . B`), those of `(dC, B)`; in
    `kernel_grad` (`dB = A . dC`), those of `(A, dC)`. `input_grad_equation` and
    `kernel_grad_equation` compute the two backward GEMMs with `tf.einsum`.
    """

    equation: str
    rank_a: int
    rank_b: int

    def __post_init__(self):
        if "->" not in self.equation or self.equation.count(",") != 1:
            raise ValueError(f"GemmAxes needs an equation 'A,B->C', got {self.equation!r}")
        a, b, c = _expand(self.equation, self.rank_a, self.rank_b)
        if len(a) != self.rank_a or len(b) != self.rank_b:
            raise ValueError(f"equation {self.equation!r} does not match operands of rank "
                             f"{self.rank_a} and {self.rank_b}")
        object.__setattr__(self, "terms", (a, b, c))

    @staticmethod
    def _axes(term, letters):
        return tuple(i for i, ch in enumerate(term) if ch in letters)

    def _contracted(self, x, y, z):
        """The axes of terms `x` and `y` over the labels they share and `z` lacks (the
        reduction of the GEMM `x, y -> z`)."""
        k = set(x) & set(y) - set(z)
        return self._axes(x, k), self._axes(y, k)

    @property
    def forward(self):
        a, b, c = self.terms
        return self._contracted(a, b, c)

    @property
    def input_grad(self):
        a, b, c = self.terms
        return self._contracted(c, b, a)

    @property
    def kernel_grad(self):
        a, b, c = self.terms
        return self._contracted(a, c, b)

    @property
    def input_grad_equation(self):
        a, b, c = self.terms
        return f"{c},{b}->{a}"

    @property
    def kernel_grad_equation(self):
        a, b, c = self.terms
        return f"{a},{c}->{b}"


def _in_layout(x, perm, merged_shape, quantize):
    """`quantize` applied to `x` transposed by `perm` and reshaped to `merged_shape(s)`
    (`s`: the transposed shape); the result in `x`'s layout."""
    moved_at_all = perm != list(range(len(perm)))
    moved = tf.transpose(x, perm) if moved_at_all else x
    shape = tf.shape(moved)
    y = tf.reshape(quantize(tf.reshape(moved, merged_shape(shape))), shape)
    return tf.transpose(y, [perm.index(i) for i in range(len(perm))]) if moved_at_all else y


def quantize_along(x, axes, quantize_last):
    """`quantize_last(t)` (blocks along t's last axis) applied with `axes` of `x`
    merged, in order, into that last axis; the result in `x`'s layout.

    With no axis (an operand the GEMM does not reduce, e.g. an outer product), every
    element is its own block.
    """
    rank = x.shape.rank
    axes = tuple(a % rank for a in axes)
    if not axes:
        return tf.squeeze(quantize_last(x[..., None]), -1)
    lead = rank - len(axes)
    return _in_layout(x, [i for i in range(rank) if i not in axes] + list(axes),
                      lambda shape: tf.concat([shape[:lead], [-1]], 0), quantize_last)


def quantize_tiled(x, axes, quantize_2d):
    """`quantize_2d(t)` (tiles over t's two axes) applied to `x` laid out as `[K, rest]`:
    `axes` (a GEMM's reduction axes) merged, in order, into the first axis, the others
    into the second; the result in `x`'s layout."""
    rank = x.shape.rank
    axes = tuple(a % rank for a in axes)
    return _in_layout(x, list(axes) + [i for i in range(rank) if i not in axes],
                      lambda shape: tf.stack([tf.reduce_prod(shape[:len(axes)]), -1]),
                      quantize_2d)
