"""Keras callbacks of tfhfp8 (a plain module of `keras.callbacks.Callback` classes).

>>> import numpy as np, keras, tfhfp8.callbacks
>>> x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
>>> callback = tfhfp8.callbacks.BatchNormRecalibration(x, when="train_end")
"""

import keras

from tfhfp8 import calibration
from tfhfp8.stats import QuantizationStats

__all__ = ["BatchNormRecalibration", "QuantizationStats"]


class BatchNormRecalibration(keras.callbacks.Callback):
    """Re-calibrates the BatchNormalization statistics of the model being trained.

    For quantization-aware fine-tuning: once training ends (or after every epoch), the
    moving mean and variance of every BatchNormalization layer are re-estimated from
    `data` with `tfhfp8.recalibrate_batchnorm` (by default the exact statistics the
    model will see at inference), so that they match the final (quantized) weights
    instead of an exponential average over weights that kept changing.

    Args:
      data: calibration data, as for `tfhfp8.recalibrate_batchnorm` (a NumPy array, a
        tuple `(x, y)`, a `tf.data.Dataset` or an iterable of batches). It is checked
        when the callback is made; a generator is read once and cached.
      steps: at most this many batches per re-calibration.
      when: `"train_end"` (`on_train_end`, the default) or `"epoch_end"`
        (`on_epoch_end`; note that Keras evaluates the validation data of an epoch
        before the epoch-end callbacks run, so that epoch's validation metrics are
        those before re-calibration).
      mode, momentum, batch_size: as in `tfhfp8.recalibrate_batchnorm`.
      verbose: 1 shows a progress bar for each re-calibration.
    """

    WHEN = ("train_end", "epoch_end")

    def __init__(self, data, steps=None, *, when="train_end", mode="exact", momentum=None,
                 batch_size=32, verbose=0):
        super().__init__()
        if when not in self.WHEN:
            raise ValueError(f"when must be one of {self.WHEN}, got {when!r}")
        if mode not in calibration.MODES:
            raise ValueError(f"mode must be one of {calibration.MODES}, got {mode!r}")
        self.when, self.mode, self.momentum, self.verbose = when, mode, momentum, verbose
        self.batches = calibration._Batches(data, steps, batch_size)
        self.calls = 0

    def _recalibrate(self):
        calibration.recalibrate_batchnorm(self.model, self.batches, mode=self.mode,
                                          momentum=self.momentum, verbose=self.verbose)
        self.calls += 1

    def on_epoch_end(self, epoch, logs=None):
        if self.when == "epoch_end":
            self._recalibrate()

    def on_train_end(self, logs=None):
        if self.when == "train_end":
            self._recalibrate()
