"""Rounding shared by the layers, the weight update and the all-reduce.

- `stochastic_seed(step, *names)`: the seed of one stochastically rounded tensor, from a
  saved step counter and the tensor's name (layer, GEMM, role, operand, ...), so that a
  resumed run rounds as the uninterrupted one.
- `MasterWeightRounding`: the constraint that rounds a stored weight after each
  optimizer step, `W <- Q_m(W + dW)` (the weight update's; the layers attach it to
  their weights so that any Keras optimizer applies it, and
  `tfhfp8.optimizers.LowPrecisionOptimizer` does the rounding itself instead).
"""

import zlib

import keras
import tensorflow as tf

from tfhfp8.formats import roundings
from tfhfp8.quantization import quantize


def stochastic_seed(step, *names):
    """A stochastic-rounding seed: `step` in the high 32 bits, a stable hash of `names`
    in the low 32 bits.

    Args:
      step: an int64 scalar tensor (a saved step counter), or None.
      names: what tells the tensor apart from the others rounded at the same step
        (joined with "/" and hashed with CRC-32, stable across processes).

    Returns:
      An int64 scalar tensor for `tfhfp8.quantize(..., seed=)`; None when `step` is None.
    """
    if step is None:
        return None
    key = zlib.crc32("/".join(str(name) for name in names).encode())
    return tf.bitwise.bitwise_or(tf.bitwise.left_shift(step, tf.constant(32, tf.int64)),
                                 tf.constant(key, tf.int64))


class MasterWeightRounding(keras.constraints.Constraint):
    """Rounds a variable to `fmt` after each optimizer step (then any user constraint).

    `seed`: None, or a function returning the stochastic-rounding seed of this step.
    """

    def __init__(self, fmt, rounding, inner=None, seed=None):
        self.fmt, self.rounding, self.inner, self.seed = fmt, rounding, inner, seed

    def __call__(self, w):
        if self.rounding == "kahan":
            raise ValueError(
                "master_weights rounding 'kahan' keeps a compensation buffer per weight, "
                "which the optimizer holds: compile the model with "
                "tfhfp8.optimizers.LowPrecisionOptimizer(optimizer, policy), whose policy names "
                "master_weights")
        if self.inner is not None:
            w = self.inner(w)
        seed = None if self.seed is None or not roundings.is_stochastic(self.rounding) else (
            self.seed())
        return quantize(w, self.fmt, rounding=self.rounding, saturate=True, seed=seed)
