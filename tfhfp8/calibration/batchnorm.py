"""Re-calibration of BatchNormalization statistics: `recalibrate_batchnorm`."""

import contextlib
import numbers
import warnings

import keras
import numpy as np
import tensorflow as tf

from tfhfp8.calibration.data import Batches, check_batch, check_finite, input_specs, to_tensors
from tfhfp8.calibration.graph import batchnorm_layers, pruned_model

#: Re-calibration modes of `recalibrate_batchnorm`.
MODES = ("exact", "one_pass", "momentum")


def _batch_moments64(bn, inputs, mask):
    """(count, mean, centred sum of squares) of one batch per channel, in float64."""
    x = tf.cast(inputs, tf.float64)
    rank = len(x.shape)
    axes = [i for i in range(rank) if i != bn.axis % rank]  # all but the channel axis
    if mask is None:
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float64)
        mean = tf.reduce_mean(x, axes)
        m2 = tf.reduce_sum(tf.square(x - tf.reduce_mean(x, axes, keepdims=True)), axes)
        count = tf.fill(tf.shape(mean), count)
    else:
        w = tf.cast(tf.broadcast_to(tf.expand_dims(tf.cast(mask, tf.bool), -1), tf.shape(x)),
                    tf.float64)
        count = tf.reduce_sum(w, axes)
        mean = tf.math.divide_no_nan(tf.reduce_sum(w * x, axes), count)
        centred = x - tf.reshape(mean, _broadcast_shape(bn, x))
        m2 = tf.reduce_sum(w * tf.square(centred), axes)
    return count, mean, m2


def _broadcast_shape(bn, x):
    rank = len(x.shape)
    shape = [1] * rank
    shape[bn.axis % rank] = -1
    return shape


def _channel_sums(channels, count=3):
    """`count` float64 variables of one value per channel, zero."""
    return [tf.Variable(np.zeros([channels], np.float64), trainable=False, dtype=tf.float64)
            for _ in range(count)]


class _Accumulator:
    """Per-channel count, mean and centred sum of squares, merged batch by batch (Chan)."""

    def __init__(self, channels):
        self.count, self.mean, self.m2 = _channel_sums(channels)

    def merge(self, count_b, mean_b, m2_b):
        count_a, mean_a, m2_a = (tf.identity(self.count), tf.identity(self.mean),
                                 tf.identity(self.m2))
        count = count_a + count_b
        fraction = tf.math.divide_no_nan(count_b, count)
        delta = mean_b - mean_a
        self.mean.assign(mean_a + delta * fraction)
        self.m2.assign(m2_a + m2_b + tf.square(delta) * count_a * fraction)
        self.count.assign(count)

    def result(self):
        count = self.count.numpy()
        return count, self.mean.numpy(), self.m2.numpy() / np.maximum(count, 1)


class _BatchAverage:
    """Weighted average over batches of per-batch means and variances (`one_pass`)."""

    def __init__(self, channels):
        self.count, self.mean, self.variance = _channel_sums(channels)

    def add(self, count, mean, variance):
        self.count.assign_add(count)
        self.mean.assign_add(count * tf.cast(mean, tf.float64))
        self.variance.assign_add(count * tf.cast(variance, tf.float64))

    def result(self):
        count = self.count.numpy()
        safe = np.maximum(count, 1e-300)
        return count, self.mean.numpy() / safe, self.variance.numpy() / safe


def _batch_normalize(bn, inputs, mean, variance):
    """What BatchNormalization computes in training mode, given the batch moments."""
    compute = inputs.dtype if inputs.dtype in (tf.float32, tf.float64) else tf.float32
    x = tf.cast(inputs, compute)
    out = keras.ops.batch_normalization(
        x, tf.cast(mean, compute), tf.cast(variance, compute), axis=bn.axis,
        offset=tf.cast(bn.beta, compute) if bn.center else None,
        scale=tf.cast(bn.gamma, compute) if bn.scale else None, epsilon=bn.epsilon)
    return tf.cast(out, bn.compute_dtype)


@contextlib.contextmanager
def _probes(layers, make_call):
    """Within the block, each BatchNormalization layer of `layers` runs the probe
    `make_call(layer, original_call)` instead of its own `call`.

    The probe is an attribute of the instance that shadows the class's `call` (a
    subclassed model has no graph a probe layer could be inserted into). It is removed
    on every exit from the block, exception or not, also when installing a later
    probe fails: the model is never left probed.
    """
    installed = []
    try:
        for layer in layers:
            layer.call = make_call(layer, layer.call)
            installed.append(layer)
        yield
    finally:
        for layer in installed:
            del layer.call


def _exact_probe(accumulators):
    def make_call(bn, original):
        accumulator = accumulators[id(bn)]

        def call(inputs, training=None, mask=None):
            accumulator.merge(*_batch_moments64(bn, inputs, mask))
            return original(inputs, training=False, mask=mask)
        return call
    return make_call


def _one_pass_probe(averages):
    def make_call(bn, original):
        average = averages[id(bn)]

        def call(inputs, training=None, mask=None):
            count, mean, m2 = _batch_moments64(bn, inputs, mask)
            variance = tf.math.divide_no_nan(m2, count)
            average.add(count, mean, variance)
            return _batch_normalize(bn, inputs, mean, variance)
        return call
    return make_call


def _momentum_probe(momentum):
    def make_call(bn, original):
        m = bn.momentum if momentum is None else float(momentum)

        def call(inputs, training=None, mask=None):
            count, mean, m2 = _batch_moments64(bn, inputs, mask)
            variance = tf.math.divide_no_nan(m2, count)
            dtype = bn.moving_mean.dtype
            bn.moving_mean.assign(bn.moving_mean * m + tf.cast(mean, dtype) * (1.0 - m))
            bn.moving_variance.assign(
                bn.moving_variance * m + tf.cast(variance, dtype) * (1.0 - m))
            return _batch_normalize(bn, inputs, mean, variance)
        return call
    return make_call


def _run_passes(model, batches, passes, progbar, what):
    """Runs each (layers, make_call, finish) pass over all batches, then `finish(layers)`."""
    specs = input_specs(model)
    done = 0
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # a new tf.function per pass is by design: no retracing warnings
    try:
        for layers, make_call, finish in passes:
            runner = pruned_model(model, layers)
            with _probes(layers, make_call):
                step = tf.function(lambda x, runner=runner: (runner(x, training=False), None)[1],
                                   reduce_retracing=True)
                count = 0
                for x, _ in batches:
                    check_batch(specs, x, count, what)
                    x = to_tensors(x)
                    check_finite(x, count, what)
                    step(x)
                    count += 1
                    done += 1
                    if progbar is not None:
                        progbar.update(done)
            if count == 0:
                raise ValueError(f"{what} is empty: it gave no batch")
            finish(layers)
    finally:
        logger.setLevel(level)


def _check_statistics(layer, mean, variance):
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(variance))):
        raise ValueError(
            f"BatchNormalization layer {layer.name!r}: the re-calibrated statistics are "
            "not finite (the model overflows on the calibration data?); the model is left "
            "unchanged")


def _check_moving_statistics(layers):
    for layer in layers:
        _check_statistics(layer, layer.moving_mean.numpy(), layer.moving_variance.numpy())


def _set_statistics(accumulators):
    def finish(layers):
        for layer in layers:
            count, mean, variance = accumulators[id(layer)].result()
            if not np.all(count > 0):
                warnings.warn(f"BatchNormalization layer {layer.name!r} saw no data "
                              "(not on a path from the inputs?): left unchanged",
                              stacklevel=4)
                continue
            _check_statistics(layer, mean, variance)
            layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(
                np.maximum(variance, 0.0).astype(layer.moving_variance.dtype))
    return finish


def _checked_batchnorm_layers(model, mode, momentum):
    """`batchnorm_layers(model)` after checking the arguments of `recalibrate_batchnorm`."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(
            momentum, numbers.Real) or not 0.0 <= float(momentum) < 1.0):
        raise ValueError(f"momentum must be None or a number in [0, 1), got {momentum!r}")
    if not model.built:
        raise ValueError("the model is not built: call it on data or give it an Input first")
    found = batchnorm_layers(model)
    if not found:
        raise ValueError(
            f"the model {model.name!r} has no BatchNormalization layer: there are no "
            "statistics to re-calibrate")
    unbuilt = [layer.name for layer, _ in found if not layer.built]
    if unbuilt:
        raise ValueError(f"BatchNormalization layers {unbuilt} are not built")
    return found


def _passes(found, mode, momentum):
    """The passes of `mode` over the data: `(layers, probe, finish)` each."""
    layers = [layer for layer, _ in found]
    if mode == "exact":
        by_depth = {}
        for layer, depth in found:
            by_depth.setdefault(depth, []).append(layer)
        accumulators = {id(layer): _Accumulator(layer.moving_mean.shape[0])
                        for layer in layers}
        return [(by_depth[d], _exact_probe(accumulators), _set_statistics(accumulators))
                for d in sorted(by_depth)]
    if mode == "one_pass":
        accumulators = {id(layer): _BatchAverage(layer.moving_mean.shape[0])
                        for layer in layers}
        return [(layers, _one_pass_probe(accumulators), _set_statistics(accumulators))]
    return [(layers, _momentum_probe(momentum), _check_moving_statistics)]


def recalibrate_batchnorm(model, data, steps=None, *, mode="exact", momentum=None,
                          batch_size=32, verbose=1):
    """Re-estimates the moving mean and variance of every BatchNormalization layer.

    Runs calibration data through `model` (typically a quantized model from
    `tfhfp8.quantize_model`) and sets the `moving_mean` and `moving_variance` of every
    BatchNormalization layer, nested models included. Nothing else changes: no weight
    update, no dropout (every other layer runs in inference mode).

    Args:
      model: a built Keras model (Functional, Sequential, nested, or subclassed).
      data: a NumPy array (or tensor, or dict of arrays) of inputs, a tuple `(x, y)`
        (labels ignored), a `tf.data.Dataset` of batches (elements `x` or `(x, y, ...)`),
        or an iterable of such batches (a generator is cached in memory, since the
        exact mode reads the data once per BatchNorm depth).
      steps: at most this many batches (None: all; required for an infinite
        `tf.data.Dataset`). Data of unknown length (a generator, an iterator) without
        `steps` stops after `DEFAULT_MAX_STEPS` (1000) batches, with a warning when
        there were more.
      mode:
        - `"exact"` (default): the statistics inference will see. For each
          BatchNormalization layer in topological order, moving mean and variance become
          the mean and population variance of its input over all calibration samples,
          with every layer before it in inference mode and the BatchNorm layers before it
          already re-calibrated. Sums are merged across batches in float64 (per-batch mean
          and centred sum of squares, Chan's parallel merge), never averaged per batch.
          Layers of the same BatchNorm depth (the largest number of BatchNorm layers on a
          path from the inputs) share a pass, and each pass runs the model only up to
          them: a chain of L BatchNorm layers costs L passes, about L/2 forward passes
          of the whole model per batch.
        - `"one_pass"`: one pass with every BatchNorm layer in training mode (each
          normalizes with its batch statistics, as during training; dropout stays off);
          the moving statistics become the per-batch means and variances averaged over
          the batches (weighted by batch size). About one forward pass; biased towards
          batch statistics, exact only in the limit of large batches.
        - `"momentum"`: the same pass, but the moving statistics are updated as in
          training: `moving = moving * momentum + batch * (1 - momentum)`.
      momentum: the momentum of `"momentum"` mode (None: each layer's own).
      batch_size: the batch size used to slice arrays (ignored for batched data).
      verbose: 1 shows a progress bar (`keras.utils.Progbar`), 0 is silent.

    Returns:
      The model (modified in place).

    All or nothing: when anything fails (the data, an exception raised by a generator,
    non-finite values), every BatchNorm statistic is restored to its value before the
    call and the exception propagates.

    Raises:
      ValueError: the model has no BatchNormalization layer, the data is empty, does
        not fit the model's inputs or contains NaN or infinite values (or the
        statistics computed from it are not finite), or an argument is invalid.
    """
    found = _checked_batchnorm_layers(model, mode, momentum)
    batches = data if isinstance(data, Batches) else Batches(data, steps, batch_size)
    layers = [layer for layer, _ in found]
    passes = _passes(found, mode, momentum)
    progbar = None
    if verbose:
        target = None if batches.length is None else batches.length * len(passes)
        progbar = keras.utils.Progbar(target, unit_name="batch")
        print(f"Re-calibrating {len(layers)} BatchNormalization layer(s) "
              f"({mode}, {len(passes)} pass(es) over the data)")
    # All or nothing: the statistics of later passes depend on those set by earlier
    # ones (and "momentum" updates them batch by batch), so a failure anywhere (bad
    # data, an exception in the user's generator, an interrupt) restores them all.
    saved = [(variable, variable.numpy()) for layer in layers
             for variable in (layer.moving_mean, layer.moving_variance)]
    try:
        _run_passes(model, batches, passes, progbar, batches.what)
    except BaseException:
        for variable, value in saved:
            variable.assign(value)
        raise
    return model
