"""Error-quantization statistics of emulated layers: loss scales, underflow, saturation."""

import keras
import numpy as np
import tensorflow as tf

from tfhfp8.layers import EmulatedLayer, walk


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
    return values


class QuantizationStats(keras.callbacks.Callback):
    """Logs, per emulated GEMM and training step, the error scale in use and the
    fractions of errors that underflowed to zero or saturated in `Q_e`.

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
