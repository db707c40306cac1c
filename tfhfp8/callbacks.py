"""Keras callbacks of tfhfp8 (a plain module of `keras.callbacks.Callback` classes).

>>> import numpy as np, keras, tfhfp8.callbacks
>>> x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
>>> callback = tfhfp8.callbacks.BatchNormRecalibration(x, when="train_end")
"""

import keras
import numpy as np
import tensorflow as tf

from tfhfp8 import calibration
from tfhfp8.layers import EmulatedLayer, walk

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
        self.batches = calibration.Batches(data, steps, batch_size)
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


def emulated_layers(model):
    """Every EmulatedLayer of a model, sublayers (e.g. attention projections) included."""
    return [layer for layer in walk(model, sublayers=True) if isinstance(layer, EmulatedLayer)]


def latest(model):
    """`{"<layer>/<gemm>/<stat>": value}` for every recorded scale and statistic."""
    values = {}
    for layer in emulated_layers(model):
        for gemm, state in getattr(layer, "error_state", {}).items():
            for key in ("scale", "underflow", "saturation"):
                if key in state:
                    values[f"{layer.name}/{gemm}/{key}"] = float(state[key].numpy())
        for gemm, state in getattr(layer, "accumulation_state", {}).items():
            for kind in ("forward", "input_gradient", "weight_gradient"):
                additions = int(state[f"{kind}/additions"].numpy())
                if additions:  # an emulated sum ran (FP32 sums record nothing)
                    values[f"{layer.name}/{gemm}/{kind}/swamping"] = (
                        int(state[f"{kind}/swamped"].numpy()) / additions)
                    values[f"{layer.name}/{gemm}/{kind}/int32_overflows"] = float(
                        state[f"{kind}/overflows"].numpy())
    return values


class QuantizationStats(keras.callbacks.Callback):
    """Logs, per emulated GEMM and training step, the error scale in use and the
    fractions of errors that underflowed to zero or saturated in `Q_e`; with emulated
    accumulation (`Policy(accumulation=...)`), per GEMM kind (`forward`,
    `input_gradient`, `weight_gradient`) the fraction of additions whose non-zero
    addend was lost entirely (`.../swamping`) and the number of INT32 overflows
    (`.../int32_overflows`).

    Per-step values are kept in `self.steps` (`{key: [value per step]}`); each
    epoch's mean is added to the epoch logs (so to `History`); with `log_dir`, every
    step is also written to TensorBoard. Statistics are computed only while this
    callback is attached: it switches them on and retraces the train function.

    >>> import keras, tfhfp8
    >>> stats = tfhfp8.callbacks.QuantizationStats()
    >>> # model.fit(x, y, callbacks=[stats]); stats.steps["dense/gemm/underflow"]
    """

    def __init__(self, log_dir=None, every=1):
        super().__init__()
        self.log_dir, self.every = log_dir, int(every)
        self.steps = {}
        self._epoch = {}
        self._writer = None
        self._step = 0

    def on_train_begin(self, logs=None):
        with self.model.distribute_strategy.scope():
            for layer in emulated_layers(self.model):
                layer.enable_error_stats()
        self.model.make_train_function(force=True)  # retrace with statistics on
        if self.log_dir:
            try:
                import tensorboard  # noqa: F401  (tf.summary.scalar needs it)
            except ImportError as error:
                raise ImportError("QuantizationStats(log_dir=...) writes TensorBoard logs: "
                                  "pip install tensorboard") from error
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = {}

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step % self.every:
            return
        values = latest(self.model)
        for key, value in values.items():
            self.steps.setdefault(key, []).append(value)
            self._epoch.setdefault(key, []).append(value)
        if self._writer is not None:
            with self._writer.as_default(step=self._step):
                for key, value in values.items():
                    tf.summary.scalar(key, value)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update({key: float(np.mean(v)) for key, v in self._epoch.items()})

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()
