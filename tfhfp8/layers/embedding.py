"""Embedding with its table stored in the policy's weight format."""

import keras
from keras import ops

from tfhfp8.layers.emulation import EmulatedLayer


@keras.saving.register_keras_serializable(package="tfhfp8")
class Embedding(EmulatedLayer, keras.layers.Embedding):
    """`keras.layers.Embedding` whose table is read in the policy's weight format.

    A lookup is no GEMM: only the weights (and their gradient) are quantized.

    >>> import numpy as np, tfhfp8
    >>> layer = tfhfp8.layers.Embedding(100, 8, policy="hfp8")
    >>> layer(np.array([[1, 2, 3]])).shape
    (1, 3, 8)
    """

    OPERANDS = (0, 1)

    def _check_accumulation(self):
        pass  # a lookup sums nothing: the policy's accumulation= does not apply

    def call(self, inputs):
        if inputs.dtype not in ("int32", "int64"):
            inputs = ops.cast(inputs, "int32")
        step = self._rounding_step()
        table = self._forward(self._backward(self.embeddings, "weight_gradients", step),
                              "weights", step)
        return ops.cast(ops.take(table, inputs, axis=0), dtype=self.compute_dtype)
