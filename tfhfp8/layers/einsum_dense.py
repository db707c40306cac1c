"""EinsumDense with emulated GEMM precision."""

import functools

import keras
import numpy as np
from keras import ops

from tfhfp8 import gemm
from tfhfp8.layers.emulation import EmulatedLayer


@keras.saving.register_keras_serializable(package="tfhfp8")
class EinsumDense(EmulatedLayer, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` whose einsum runs in the formats of `policy`.

    >>> import numpy as np, tfhfp8
    >>> layer = tfhfp8.layers.EinsumDense("ab,bc->ac", output_shape=4, policy="hfp8")
    >>> layer(np.ones((2, 3), "float32")).shape
    (2, 4)
    """

    def backward_fan_in(self, kernel):
        """The product of the kernel dimensions the input gradient sums over: those
        whose labels are not in the input (`"ab,bc->ac"`: `c`, the units)."""
        inputs, kernel_labels = self.equation.split("->")[0].split(",")
        return max(1, int(np.prod([size for label, size in zip(kernel_labels, kernel.shape)
                                   if label not in inputs])))

    _BLOCKED_GEMMS_ACCUMULATE = True

    def _accumulating_op(self, name):
        return functools.partial(gemm.layer_einsum, equation=self.equation)

    def call(self, inputs, training=None):
        x = self.emulated_gemm(functools.partial(ops.einsum, self.equation), [inputs],
                               [self.kernel], equation=self.equation)
        return self._bias_and_activation(x)
