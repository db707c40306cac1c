"""MultiHeadAttention with its projections and both attention products emulated."""

import functools

import keras
from keras import ops

from tfhfp8 import _compat, gemm
from tfhfp8.layers.einsum_dense import EinsumDense
from tfhfp8.layers.emulation import EmulatedLayer


@keras.saving.register_keras_serializable(package="tfhfp8")
class MultiHeadAttention(_compat.AttentionHooks, EmulatedLayer, keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` with every GEMM in the formats of `policy`.

    The query/key/value/output projections are emulated `EinsumDense` layers, and the
    two attention products, `QK^T` and `attention . V`, are GEMMs whose operands are
    quantized as activations and whose output gradients as errors. The softmax stays
    FP32. Attention always takes the explicit path (no fused dot-product kernel).

    >>> import numpy as np, tfhfp8
    >>> layer = tfhfp8.layers.MultiHeadAttention(num_heads=2, key_dim=4, policy="hfp8")
    >>> x = np.ones((1, 5, 8), "float32")
    >>> layer(x, x).shape
    (1, 5, 8)
    """

    GEMMS = ("scores", "context")
    OPERANDS = (2, 0)  # both products multiply two activations

    _BLOCKED_GEMMS_ACCUMULATE = True

    def _accumulating_op(self, name):
        spec = self.attention_spec()
        equation = spec.scores_equation if name == "scores" else spec.combine_equation

        return functools.partial(gemm.layer_einsum, equation=equation)

    def _check_accumulation(self):
        super()._check_accumulation()
        # The policy checked activations x weights, errors x weights and activations x
        # errors; both attention products multiply two activations, and their input
        # gradient errors x activations.
        if not self.policy.quantize_attention:
            return
        policy, accs = self.policy, self.policy.accumulation
        try:
            gemm.check_operands(accs["forward"], policy.activations, policy.activations,
                                ("activations", "activations"))
            gemm.check_operands(accs["input_gradient"], policy.errors, policy.activations,
                                ("errors", "activations"))
        except ValueError as error:
            raise ValueError(f"MultiHeadAttention's attention products: {error}") from None

    def build(self, query_shape, value_shape, key_shape=None):
        # The projections are built as tfhfp8 EinsumDense layers with this policy.
        projection = functools.partial(EinsumDense, policy=self.policy)
        with _compat.attention_projection_class(projection):
            super().build(query_shape, value_shape, key_shape)

    def compute_attention(self, query, key, value, attention_mask=None, training=None):
        """The attention of the projected `query`, `key` and `value` (each
        `(batch, ..., heads, dim)`): `(output, scores)`, with both products emulated."""
        spec = self.attention_spec()
        query = ops.multiply(query, ops.cast(spec.scale, query.dtype))
        # quantize_attention=False (NVFP4's recipe): both products in FP32.
        product = self.emulated_gemm if self.policy.quantize_attention else (
            lambda op, operands, name, equation: op(*operands))
        scores = product(functools.partial(ops.einsum, spec.scores_equation),
                         [key, query], name="scores", equation=spec.scores_equation)
        scores = spec.masked_softmax(scores, attention_mask)
        dropped = spec.dropout(scores, training)
        output = product(functools.partial(ops.einsum, spec.combine_equation),
                         [dropped, value], name="context", equation=spec.combine_equation)
        return output, scores
