"""MultiHeadAttention with its projections and both attention products emulated."""

import functools

import keras
from keras import ops

from tfhfp8.layers.einsum_dense import EinsumDense
from tfhfp8.layers.emulation import EmulatedLayer

_PROJECTIONS = ("_query_dense", "_key_dense", "_value_dense", "_output_dense", "_gate_dense")


@keras.saving.register_keras_serializable(package="tfhfp8")
class MultiHeadAttention(EmulatedLayer, keras.layers.MultiHeadAttention):
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

    def __init__(self, *args, policy=None, **kwargs):
        super().__init__(*args, **self._init_policy(policy, kwargs))
        self._flash_attention = False

    def _post_build(self):
        # Keras builds the projections as keras.layers.EinsumDense; our EinsumDense is
        # a drop-in subclass, so they are turned into it in place, variables and all.
        for name in _PROJECTIONS:
            projection = getattr(self, name, None)
            if projection is not None and not isinstance(projection, EinsumDense):
                projection.__class__ = EinsumDense
                projection.policy = self.policy
                projection._tracker.unlock()  # built and locked before the swap
                projection._attach_master_weight_rounding()
                projection._create_error_state()
                projection._tracker.lock()
        super()._post_build()

    def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                           return_attention_scores=False, use_causal_mask=False):
        # `call` passes use_causal_mask only to Keras' own implementation; here the
        # causal mask is already folded into attention_mask.
        query = ops.multiply(query, ops.cast(self._inverse_sqrt_key_dim, query.dtype))
        scores = self._gemm(
            functools.partial(ops.einsum, self._dot_product_equation), [key, query],
            name="scores")
        scores = self._masked_softmax(scores, attention_mask)
        dropped = self._dropout_layer(scores, training=training) if self._dropout > 0 else scores
        output = self._gemm(
            functools.partial(ops.einsum, self._combine_equation), [dropped, value],
            name="context")
        return output, scores
