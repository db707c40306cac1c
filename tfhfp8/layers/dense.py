"""Dense with emulated GEMM precision."""

import keras
from keras import ops

from tfhfp8 import gemm
from tfhfp8.layers.emulation import EmulatedLayer


@keras.saving.register_keras_serializable(package="tfhfp8")
class Dense(EmulatedLayer, keras.layers.Dense):
    """`keras.layers.Dense` whose matmul runs in the formats of `policy`.

    Same arguments as `keras.layers.Dense`, plus `policy` (a `tfhfp8.Policy`, a preset
    name or None for the global policy). The bias is added in FP32.

    >>> import numpy as np, tfhfp8
    >>> layer = tfhfp8.layers.Dense(4, policy="hfp8")
    >>> layer(np.ones((2, 3), "float32")).shape
    (2, 4)
    """

    _BLOCKED_GEMMS_ACCUMULATE = True

    def _accumulating_op(self, name):
        return gemm.layer_matmul

    def call(self, inputs, training=None):
        x = self.emulated_gemm(ops.matmul, [inputs], [self.kernel], equation="...i,io->...o")
        return self._bias_and_activation(x)
