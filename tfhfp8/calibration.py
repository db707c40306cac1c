"""Post-training quantization: BatchNorm re-calibration, BatchNorm folding and `ptq`.

Sun et al. (HFP8, NeurIPS 2019) quantize a pretrained model's weights and activations
directly to 1-4-3 and recover its accuracy "by simply fine-tuning batch normalization
statistics": calibration batches run through the quantized model, the moving means and
variances of the BatchNormalization layers are re-estimated, no weight changes.

- `recalibrate_batchnorm(model, data)` re-estimates the statistics in place. The
  default mode, `"exact"`, gives each BatchNormalization layer exactly the statistics its
  input has at inference time over the whole calibration set: layers are processed in
  topological order, everything before a layer in inference mode, the BatchNorm layers
  before it already re-calibrated, sums accumulated in float64 across batches (a
  numerically sound parallel merge of per-batch means and centred sums of squares).
  `"one_pass"` (all BatchNorm layers in training mode at once, per-batch statistics
  averaged over batches) and `"momentum"` (the usual exponential moving average) are
  the cheaper, approximate alternatives.
- `fold_batchnorm(model)` folds each BatchNormalization into the convolution or dense
  layer right before it (FP32 arithmetic, float64 intermediate), for an inference graph.
- `ptq(model, policy, calibration_data)` = `quantize_model(model, policy.inference())`,
  re-calibration, optionally folding; `evaluate_ptq(...)` measures accuracy (or top-1
  agreement with the FP32 model) before quantization, after it and after re-calibration.

>>> import numpy as np, keras, tfhfp8
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
...                           keras.layers.BatchNormalization()])
>>> x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
>>> quantized = tfhfp8.ptq(model, "hfp8", calibration_data=x, verbose=0)
>>> bool(np.allclose(quantized.layers[1].moving_mean.numpy(),
...                  quantized.layers[0](x).numpy().mean(axis=0), atol=1e-5))
True
"""

import itertools
import math
import numbers
import time
import warnings

import keras
import numpy as np
import tensorflow as tf
from keras.src.models.functional import Functional  # no public alias for the check

from tfhfp8 import policy as policy_lib
from tfhfp8.conversion import _copy_weights, quantize_model

__all__ = [
    "DEFAULT_MAX_STEPS",
    "MODES",
    "evaluate_ptq",
    "fold_batchnorm",
    "ptq",
    "recalibrate_batchnorm",
]

#: Re-calibration modes of `recalibrate_batchnorm`.
MODES = ("exact", "one_pass", "momentum")

#: At most this many batches are read from calibration data of unknown length (a
#: generator or other iterator, a `tf.data.Dataset` of unknown cardinality) when no
#: `steps` is given: an endless generator stops there (with a warning) instead of running,
#: and being cached, forever.
DEFAULT_MAX_STEPS = 1000

_BN = keras.layers.BatchNormalization


# ----------------------------------------------------------------------------------------
# Calibration and evaluation data
# ----------------------------------------------------------------------------------------

def _is_array(value):
    return isinstance(value, (np.ndarray, tf.Tensor)) or (
        hasattr(value, "shape") and hasattr(value, "__array__") and not isinstance(value, dict))


def _is_inputs(value):
    """A whole data set's x: an array, a dict of arrays, or a list/tuple of arrays."""
    if _is_array(value):
        return True
    if isinstance(value, dict):
        return bool(value) and all(_is_array(v) for v in value.values())
    return False


def _split(element):
    """(x, y) of one batch or data set: a tuple is (x,), (x, y) or (x, y, sample_weight)."""
    if isinstance(element, tuple):
        if not 1 <= len(element) <= 3:
            raise ValueError(
                f"a tuple must be (x,), (x, y) or (x, y, sample_weight); got {len(element)} "
                "elements")
        return element[0], (element[1] if len(element) > 1 else None)
    return element, None


class _Batches:
    """Re-iterable batches `(x, y)` (y None without labels) of user data.

    Accepts a NumPy array (or tensor, or dict of them), a tuple `(x, y)`, a
    `tf.data.Dataset` of batches, a sequence of batches (list, `keras.utils.PyDataset`)
    or any other iterable of batches. A one-shot iterator (a generator) is cached in
    memory as it is read, so that it can be replayed. At most `steps` batches; data of
    unknown length without `steps` stops at `DEFAULT_MAX_STEPS` batches (a warning says
    so when there was more), so that the cache stays bounded.
    """

    def __init__(self, data, steps=None, batch_size=32, what="calibration data"):
        self.what = what
        if steps is not None and (isinstance(steps, bool) or not isinstance(
                steps, numbers.Integral) or steps < 1):
            raise ValueError(f"{what}: steps must be a positive integer or None, got {steps!r}")
        if isinstance(batch_size, bool) or not isinstance(
                batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"{what}: batch_size must be a positive integer, got {batch_size!r}")
        self.steps = None if steps is None else int(steps)
        self.batch_size = int(batch_size)
        self._cache = None
        self._more = False
        if data is None:
            raise ValueError(f"{what} is missing (got None)")
        if isinstance(data, (str, bytes)):
            raise TypeError(f"{what} must be arrays or batches, got a string")

        if isinstance(data, tf.data.Dataset):
            self._kind, self._data = "dataset", data
            cardinality = int(data.cardinality())
            if cardinality == 0:
                raise ValueError(f"{what} is empty: the tf.data.Dataset has no element")
            if cardinality == tf.data.INFINITE_CARDINALITY and self.steps is None:
                raise ValueError(f"{what}: the tf.data.Dataset is infinite (repeat()); "
                                 "give steps= to limit the number of batches")
            self.length = cardinality if cardinality >= 0 else None
        elif _is_inputs(data) or (isinstance(data, tuple) and data and (
                _is_inputs(data[0]) or isinstance(data[0], (list, tuple)))):
            self._kind = "arrays"
            x, y = _split(data)
            sizes = {int(a.shape[0]) if len(a.shape) else -1
                     for a in tf.nest.flatten(x) + ([] if y is None else tf.nest.flatten(y))}
            if -1 in sizes:
                raise ValueError(f"{what}: got a scalar where arrays with a batch axis "
                                 "were expected")
            if len(sizes) != 1:
                raise ValueError(f"{what}: the arrays have different numbers of examples "
                                 f"(first axis): {sorted(sizes)}")
            self.num_examples = sizes.pop()
            if self.num_examples == 0:
                raise ValueError(f"{what} is empty: the arrays have 0 examples")
            self._data = (x, y)
            self.length = math.ceil(self.num_examples / self.batch_size)
        elif hasattr(data, "__len__") and hasattr(data, "__getitem__") and not isinstance(
                data, dict):
            self._kind, self._data = "sequence", data
            self.length = len(data)
            if self.length == 0:
                raise ValueError(f"{what} is empty: the sequence of batches has no element")
        elif hasattr(data, "__iter__"):
            self._kind, self._data = "iterable", data
            self.length = None
            try:
                one_shot = iter(data) is data
            except TypeError:
                one_shot = False
            if one_shot:
                self._cache = []
                self._cache_done = False
        else:
            raise TypeError(
                f"{what} must be a NumPy array, a tuple (x, y), a tf.data.Dataset or an "
                f"iterable of batches; got {type(data).__name__}")
        self._default_limit = self.length is None and self.steps is None
        if self._default_limit:
            self.steps = DEFAULT_MAX_STEPS
        if self.length is not None and self.steps is not None:
            self.length = min(self.length, self.steps)
        elif self.length is None and not self._default_limit:
            self.length = self.steps

    def _elements(self):
        if self._kind == "arrays":
            x, y = self._data
            for start in range(0, self.num_examples, self.batch_size):
                stop = start + self.batch_size
                yield (tf.nest.map_structure(lambda a: a[start:stop], x),
                       None if y is None else tf.nest.map_structure(lambda a: a[start:stop], y))
        elif self._kind == "sequence":
            for i in range(len(self._data)):
                yield _split(self._data[i])
        elif self._cache is None:  # a data set or a re-iterable object
            for element in self._data:
                yield _split(element)
        else:  # a one-shot iterator: replay what was read, then read on
            yield from list(self._cache)
            if self._cache_done:
                return
            for element in self._data:
                if self.steps is not None and len(self._cache) >= self.steps:
                    self._more = True  # read one batch ahead: there was more
                    break
                batch = _split(element)
                self._cache.append(batch)
                yield batch
            self._cache_done = True

    def __iter__(self):
        if not self._default_limit:
            return itertools.islice(self._elements(), self.steps)
        return self._limited()

    def _limited(self):
        """At most `steps` (the default limit) batches; warns once if there were more."""
        elements = self._elements()
        yield from itertools.islice(elements, self.steps)
        if self._default_limit is True:  # look one batch ahead, once
            self._default_limit = "checked"
            if next(elements, None) is not None or self._more:
                warnings.warn(
                    f"{self.what}: stopped after {self.steps} batches "
                    f"(tfhfp8.calibration.DEFAULT_MAX_STEPS): the data has no known length "
                    "and no steps= was given; pass steps= to read more or fewer",
                    stacklevel=3)


def _input_specs(model):
    """The model's symbolic inputs as a flat list, or None when it has none (subclassed)."""
    for owner in (model, getattr(model, "_functional", None)):
        struct = getattr(owner, "_inputs_struct", None)
        if struct is not None:
            return tf.nest.flatten(struct)
    try:
        return list(model.inputs)
    except (AttributeError, ValueError):
        return None


def _check_batch(specs, x, index, what):
    """A ValueError naming the problem when batch `index` does not fit the model inputs."""
    if specs is None:
        return
    arrays = tf.nest.flatten(x)
    for array in arrays:
        dtype = getattr(array, "dtype", None)
        kind = None if dtype is None else np.dtype(
            dtype.as_numpy_dtype if isinstance(dtype, tf.DType) else dtype).kind
        if kind in ("c", "U", "S", "O"):
            raise TypeError(
                f"{what}: batch {index} has {dtype} values; the model takes real numbers "
                "(complex values would lose their imaginary part)" if kind == "c" else
                f"{what}: batch {index} has {dtype} values; the model takes numbers")
    if len(arrays) != len(specs):
        raise ValueError(
            f"{what}: batch {index} has {len(arrays)} input array(s), the model takes "
            f"{len(specs)} ({', '.join(s.name for s in specs)})")
    for array, spec in zip(arrays, specs):
        shape = tuple(array.shape) if hasattr(array, "shape") else np.shape(array)
        expected = tuple(spec.shape)
        if len(shape) == len(expected) and all(
                e is None or s is None or int(s) == int(e) for s, e in zip(shape, expected)):
            continue
        hint = ""
        if len(shape) == len(expected) - 1:
            hint = (" - unbatched data? The first axis is the batch axis (for a "
                    "tf.data.Dataset, call .batch(n))")
        raise ValueError(
            f"{what}: batch {index} has shape {shape} but the model input "
            f"{spec.name!r} expects {expected} (None: any size){hint}")


def _to_tensors(x):
    return tf.nest.map_structure(
        lambda a: a if isinstance(a, tf.Tensor) else tf.convert_to_tensor(np.asarray(a)), x)


# ----------------------------------------------------------------------------------------
# The model's graph: BatchNormalization layers and their order
# ----------------------------------------------------------------------------------------

def _graph(model):
    """The Functional graph a model runs, or None (subclassed or unbuilt Sequential)."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, Functional):
        return model
    return None


def _is_model(layer):
    return isinstance(layer, keras.Model)


def _flat_layers(model):
    """Every layer, nested models (of any kind) flattened, in tracking order."""
    for layer in model._flatten_layers(include_self=False, recursive=False):
        if _is_model(layer):
            yield from _flat_layers(layer)
        else:
            yield layer


def _sorted_nodes(graph):
    for depth in sorted(graph._nodes_by_depth, reverse=True):
        yield from graph._nodes_by_depth[depth]


def _analyse(model, input_depth, depths):
    """BatchNorm depths of `model` (in place into `depths`); returns its output depth.

    The depth of a tensor is the largest number of BatchNormalization layers on a path
    from the model inputs to it; a BatchNormalization layer's depth is that of its input.
    A layer's input therefore depends only on BatchNorm layers of smaller depth: all
    layers of one depth can be re-calibrated in one pass. Nested Functional and
    Sequential models are analysed recursively; a nested subclassed model is taken as a
    chain of its BatchNorm layers in tracking order.
    """
    graph = _graph(model)
    if graph is None:
        depth = input_depth
        for layer in _flat_layers(model):
            if isinstance(layer, _BN):
                depths[id(layer)] = (layer, max(depths.get(id(layer), (None, -1))[1], depth))
                depth += 1
        return depth
    tensor_depth = {id(t): input_depth for t in graph.inputs}
    for node in _sorted_nodes(graph):
        if node.is_input or node.operation is None:
            continue
        operation = node.operation
        depth = max((tensor_depth.get(id(t), input_depth) for t in node.input_tensors),
                    default=input_depth)
        if isinstance(operation, _BN):
            previous = depths.get(id(operation), (None, -1))[1]
            depths[id(operation)] = (operation, max(previous, depth))
            out = depth + 1
        elif _is_model(operation):
            out = _analyse(operation, depth, depths)
        else:
            out = depth
        for t in node.output_tensors:
            tensor_depth[id(t)] = out
    return max((tensor_depth.get(id(t), input_depth) for t in graph.outputs),
               default=input_depth)


def _contained_batchnorms(layer):
    if isinstance(layer, _BN):
        return [layer]
    if _is_model(layer):
        return [sub for sub in _flat_layers(layer) if isinstance(sub, _BN)]
    return []


def _batchnorm_layers(model):
    """[(layer, depth)] of every BatchNormalization layer the model runs."""
    depths = {}
    _analyse(model, 0, depths)
    return sorted(depths.values(), key=lambda item: item[1])


def _pruned_model(model, layers):
    """A model from the inputs to the outputs of the top-level nodes that run `layers`.

    Calling it runs every layer of `layers` (inside nested models too) and skips what
    comes after. Falls back to the whole model when it has no Functional graph.
    """
    graph = _graph(model)
    if graph is None:
        return model
    wanted = {id(layer) for layer in layers}
    outputs = []
    for node in _sorted_nodes(graph):
        if node.is_input or node.operation is None:
            continue
        if any(id(bn) in wanted for bn in _contained_batchnorms(node.operation)):
            outputs.extend(node.output_tensors)
    if not outputs:
        return model
    return keras.Model(inputs=graph._inputs_struct, outputs=outputs)


# ----------------------------------------------------------------------------------------
# Probes: BatchNormalization layers that record the statistics of their inputs
# ----------------------------------------------------------------------------------------

def _batch_moments64(bn, inputs, mask):
    """(count, mean, centred sum of squares) of one batch per channel, in float64."""
    x = tf.cast(inputs, tf.float64)
    axes = list(bn._reduction_axes)
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


class _Accumulator:
    """Per-channel count, mean and centred sum of squares, merged batch by batch (Chan)."""

    def __init__(self, channels):
        zeros = np.zeros([channels], np.float64)
        self.count = tf.Variable(zeros, trainable=False, dtype=tf.float64)
        self.mean = tf.Variable(zeros, trainable=False, dtype=tf.float64)
        self.m2 = tf.Variable(zeros, trainable=False, dtype=tf.float64)

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
        zeros = np.zeros([channels], np.float64)
        self.count = tf.Variable(zeros, trainable=False, dtype=tf.float64)
        self.mean = tf.Variable(zeros, trainable=False, dtype=tf.float64)
        self.variance = tf.Variable(zeros, trainable=False, dtype=tf.float64)

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


class _Probes:
    """Temporarily replaces `call` of BatchNorm layers by a probe (restored on exit)."""

    def __init__(self, layers, make_call):
        self.layers, self.make_call = layers, make_call

    def __enter__(self):
        for layer in self.layers:
            original = layer.call
            layer.call = self.make_call(layer, original)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            if "call" in layer.__dict__:
                object.__delattr__(layer, "call")
        return False


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


# ----------------------------------------------------------------------------------------
# recalibrate_batchnorm
# ----------------------------------------------------------------------------------------

def _run_passes(model, batches, passes, progbar, what):
    """Runs each (layers, make_call, finish) pass over all batches, then `finish(layers)`."""
    specs = _input_specs(model)
    done = 0
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")  # a new tf.function per pass is by design: no retracing warnings
    try:
        for layers, make_call, finish in passes:
            runner = _pruned_model(model, layers)
            with _Probes(layers, make_call):
                step = tf.function(lambda x, runner=runner: (runner(x, training=False), None)[1],
                                   reduce_retracing=True)
                count = 0
                for x, _ in batches:
                    _check_batch(specs, x, count, what)
                    x = _to_tensors(x)
                    _check_finite(x, count, what)
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


def _check_finite(x, index, what):
    """A ValueError when a floating-point input array of batch `index` has NaN or inf."""
    for array in tf.nest.flatten(x):
        if (array.dtype.is_floating or array.dtype.is_complex) and not bool(
                tf.reduce_all(tf.math.is_finite(tf.abs(array) if array.dtype.is_complex
                                                else array))):
            raise ValueError(
                f"{what}: batch {index} contains NaN or infinite values; BatchNorm "
                "statistics computed from it would not be finite (the model is left "
                "unchanged). Remove or replace those values first")


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
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(
            momentum, numbers.Real) or not 0.0 <= float(momentum) < 1.0):
        raise ValueError(f"momentum must be None or a number in [0, 1), got {momentum!r}")
    if not model.built:
        raise ValueError("the model is not built: call it on data or give it an Input first")
    found = _batchnorm_layers(model)
    if not found:
        raise ValueError(
            f"the model {model.name!r} has no BatchNormalization layer: there are no "
            "statistics to re-calibrate")
    unbuilt = [layer.name for layer, _ in found if not layer.built]
    if unbuilt:
        raise ValueError(f"BatchNormalization layers {unbuilt} are not built")
    batches = data if isinstance(data, _Batches) else _Batches(data, steps, batch_size)
    layers = [layer for layer, _ in found]

    if mode == "exact":
        by_depth = {}
        for layer, depth in found:
            by_depth.setdefault(depth, []).append(layer)
        accumulators = {id(layer): _Accumulator(layer.moving_mean.shape[0])
                        for layer in layers}
        passes = [(by_depth[d], _exact_probe(accumulators), _set_statistics(accumulators))
                  for d in sorted(by_depth)]
    elif mode == "one_pass":
        accumulators = {id(layer): _BatchAverage(layer.moving_mean.shape[0])
                        for layer in layers}
        passes = [(layers, _one_pass_probe(accumulators), _set_statistics(accumulators))]
    else:
        passes = [(layers, _momentum_probe(momentum), _check_moving_statistics)]

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


# ----------------------------------------------------------------------------------------
# Folding BatchNormalization into the layer before it
# ----------------------------------------------------------------------------------------

_FOLDABLE = (
    keras.layers.Dense,
    keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
    keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
    keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose, keras.layers.Conv3DTranspose,
)


def _channel_axis(layer, rank):
    """The output channel axis (non-negative) of a foldable layer's output."""
    if isinstance(layer, keras.layers.Dense):
        return rank - 1
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else rank - 1


def _is_linear(activation):
    return activation is None or activation is keras.activations.linear or getattr(
        activation, "__name__", "") == "linear"


def _find_folds(model, folds):
    """Adds {id(bn): (bn, layer)} for every BatchNorm that can be folded into `layer`."""
    graph = _graph(model)
    if graph is None:
        return
    nodes = [n for n in _sorted_nodes(graph) if not n.is_input and n.operation is not None]
    calls, consumers = {}, {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for t in node.input_tensors:
            consumers[id(t)] = consumers.get(id(t), 0) + 1
    graph_outputs = {id(t) for t in graph.outputs}
    for node in nodes:
        bn = node.operation
        if _is_model(bn):
            _find_folds(bn, folds)
            continue
        if not isinstance(bn, _BN) or calls[id(bn)] != 1 or len(node.input_tensors) != 1:
            continue
        tensor = node.input_tensors[0]
        history = getattr(tensor, "_keras_history", None)
        if history is None or history.operation is None:
            continue
        layer = history.operation
        if (not isinstance(layer, _FOLDABLE) or _is_model(layer) or calls.get(id(layer)) != 1
                or consumers.get(id(tensor)) != 1 or id(tensor) in graph_outputs
                or not _is_linear(getattr(layer, "activation", None))):
            continue
        rank = len(tensor.shape)
        if bn.axis % rank != _channel_axis(layer, rank) or getattr(bn, "renorm", False):
            continue
        folds[id(bn)] = (bn, layer)


def _folded_weights(layer, bn):
    """The weights (in `layer.weights` order, with a bias) of `layer` followed by `bn`."""
    mean = bn.moving_mean.numpy().astype(np.float64)
    variance = bn.moving_variance.numpy().astype(np.float64)
    gamma = bn.gamma.numpy().astype(np.float64) if bn.scale else np.ones_like(mean)
    beta = bn.beta.numpy().astype(np.float64) if bn.center else np.zeros_like(mean)
    scale = gamma / np.sqrt(variance + bn.epsilon)
    shift = beta - mean * scale
    bias = layer.bias.numpy().astype(np.float64) if layer.use_bias else np.zeros_like(mean)
    if isinstance(layer, keras.layers.SeparableConv2D):
        weights = [layer.depthwise_kernel.numpy(),
                   layer.pointwise_kernel.numpy().astype(np.float64) * scale]
    elif isinstance(layer, keras.layers.DepthwiseConv2D):
        kernel = layer.kernel.numpy().astype(np.float64)  # (..., in, depth_multiplier)
        weights = [kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])]
    elif isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                            keras.layers.Conv3DTranspose)):
        kernel = layer.kernel.numpy().astype(np.float64)  # (..., out, in)
        weights = [kernel * scale[:, None]]
    else:
        weights = [layer.kernel.numpy().astype(np.float64) * scale]  # (..., out)
    weights.append(bias * scale + shift)
    return [w.astype(np.float32) for w in weights]


@keras.saving.register_keras_serializable(package="tfhfp8")
class FoldedBatchNormalization(keras.layers.Layer):
    """The identity left where `fold_batchnorm` folded a BatchNormalization layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True
        self.built = True

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs, training=None, mask=None):
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype, sparse=inputs.sparse)


def fold_batchnorm(model, verbose=False):
    """A copy of `model` with each BatchNormalization folded into the layer before it.

    A BatchNormalization layer is folded when its input is the output of a Dense or
    convolution layer (Conv1D/2D/3D, DepthwiseConv2D, SeparableConv2D, ConvTranspose)
    with no activation, whose output nothing else reads, both called once, the
    normalization axis being the layer's channel axis. The layer then computes
    `W' = W * s`, `b' = (b - moving_mean) * s + beta` with
    `s = gamma / sqrt(moving_variance + epsilon)` (computed in float64, stored in FP32),
    and the BatchNormalization becomes an identity layer (`FoldedBatchNormalization`)
    of the same name.
    Every other BatchNormalization layer is kept. Nested models are folded too; the
    input model is not modified. Works on FP32 and on emulated (`tfhfp8.layers`) models.

    In inference mode the result computes the same function (to FP32 rounding).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if _graph(model) is None:
        raise TypeError(
            f"fold_batchnorm rewrites Functional and Sequential models; "
            f"{type(model).__name__} has no graph to rewrite (subclassed or unbuilt)")
    folds = {}
    _find_folds(model, folds)
    into = {id(layer): bn for bn, layer in folds.values()}
    clones = {}

    def clone(layer):
        if id(layer) in folds:
            new = FoldedBatchNormalization(name=layer.name)
        else:
            config = layer.get_config()
            if id(layer) in into:
                config["use_bias"] = True
            new = layer.__class__.from_config(config)
        clones[id(layer)] = (layer, new)
        return new

    folded = keras.models.clone_model(model, clone_function=clone, recursive=True)
    for layer, new in clones.values():
        if id(layer) in folds:
            continue
        if id(layer) in into:
            new.set_weights(_folded_weights(layer, into[id(layer)]))
        else:
            new.set_weights(layer.get_weights())
    if verbose:
        names = ", ".join(f"{bn.name}->{layer.name}" for bn, layer in folds.values())
        print(f"fold_batchnorm: folded {len(folds)} BatchNormalization layer(s): {names}")
    return folded


# ----------------------------------------------------------------------------------------
# ptq and evaluate_ptq
# ----------------------------------------------------------------------------------------

_FOLD_ORDERS = (False, True, "after", "before")


def _inference_policy(policy):
    policy = policy_lib.get(policy)
    if any(policy.formats[role] is not None
           for role in ("errors", "weight_gradients", "master_weights")):
        policy = policy.inference()
    return policy


def _has_batchnorm(model):
    return any(isinstance(layer, _BN) for layer in _flat_layers(model))


def _calibrate_and_fold(model, quantized, policy, batches, fold, mode, momentum, exempt,
                        verbose):
    """Re-calibrates `quantized` (a quantized copy of `model`), folding as asked."""
    calibrate = batches is not None and _has_batchnorm(quantized)
    if fold == "before":
        folded = quantize_model(fold_batchnorm(model, verbose=verbose), policy, exempt=exempt)
        if batches is not None and _has_batchnorm(folded):
            recalibrate_batchnorm(folded, batches, mode=mode, momentum=momentum,
                                  verbose=verbose)
        return folded
    if calibrate:
        recalibrate_batchnorm(quantized, batches, mode=mode, momentum=momentum,
                              verbose=verbose)
    elif verbose and batches is not None:
        print("ptq: the model has no BatchNormalization layer: nothing to re-calibrate")
    if not fold:
        return quantized
    # "after": fold the re-calibrated statistics into the FP32 weights, then quantize the
    # folded weights; BatchNorm layers that could not be folded see slightly different
    # inputs now (Q(W*s) instead of Q(W)*s) and are re-calibrated once more.
    fp32 = keras.models.clone_model(model, recursive=True)
    _copy_weights(quantized, fp32)
    folded = quantize_model(fold_batchnorm(fp32, verbose=verbose), policy, exempt=exempt)
    if calibrate and _has_batchnorm(folded):
        recalibrate_batchnorm(folded, batches, mode=mode, momentum=momentum, verbose=verbose)
    return folded


def ptq(model, policy="hfp8", calibration_data=None, steps=None, *, fold_batchnorm=False,
        mode="exact", momentum=None, batch_size=32, exempt=None, verbose=1):
    """Post-training quantization: quantize, re-calibrate BatchNorm, optionally fold.

    1. `tfhfp8.quantize_model(model, policy.inference())`: weights and activations of
       every GEMM layer in the policy's formats (no backward formats are needed); the
       policy's exemptions apply (the `hfp8` and `fp8` presets keep the first and last
       GEMM layers in 16 bits: pass `tfhfp8.Policy("hfp8", exempt_first_last=False)` for
       every layer in 8 bits).
    2. `recalibrate_batchnorm` on the quantized model with `calibration_data` (skipped
       when it is None or the model has no BatchNormalization layer).
    3. With `fold_batchnorm`, an inference graph without foldable BatchNorm layers:
       - `True` or `"after"` (the default order): the re-calibrated statistics are folded
         into the FP32 weights (`fold_batchnorm`), the folded model is quantized again
         (so the folded weights are rounded once, `Q(W*s)`), and the BatchNorm layers
         that could not be folded are re-calibrated once more. Folding keeps the
         benefit of re-calibration, which is the point of PTQ here (the published
         implementation of the HFP8 recipe also folded after re-estimating).
       - `"before"`: fold in FP32 on the original model, then quantize, then
         re-calibrate the remaining BatchNorm layers; the folded ones keep their
         training-time statistics (re-calibration is not applicable to them).

    Args:
      model: a built FP32 Functional or Sequential model (not modified).
      policy: a `tfhfp8.Policy` or preset name (only its forward roles are used).
      calibration_data, steps, mode, momentum, batch_size: as in `recalibrate_batchnorm`.
      exempt: layer names kept in FP32 (`quantize_model`).
      verbose: progress bars and messages.

    Returns:
      The quantized (and re-calibrated, and folded) model.
    """
    if fold_batchnorm not in _FOLD_ORDERS:
        raise ValueError(f"fold_batchnorm must be one of {_FOLD_ORDERS}, got {fold_batchnorm!r}")
    policy = _inference_policy(policy)
    batches = None if calibration_data is None else (
        calibration_data if isinstance(calibration_data, _Batches)
        else _Batches(calibration_data, steps, batch_size))
    quantized = quantize_model(model, policy, exempt=exempt)
    return _calibrate_and_fold(model, quantized, policy, batches,
                               "after" if fold_batchnorm is True else fold_batchnorm,
                               mode, momentum, exempt, verbose)


def _first_output(outputs):
    return tf.nest.flatten(outputs)[0]


def _classes(outputs):
    outputs = np.asarray(outputs)
    if outputs.ndim >= 2 and outputs.shape[-1] > 1:
        return outputs.argmax(axis=-1)
    outputs = outputs.reshape(outputs.shape[0], -1)[:, 0] if outputs.ndim > 1 else outputs
    threshold = 0.5 if (outputs.min() >= 0 and outputs.max() <= 1) else 0.0
    return (outputs > threshold).astype(np.int64)


def _labels(y, num_classes):
    y = np.asarray(y)
    if y.ndim >= 2 and y.shape[-1] == num_classes and num_classes > 1:
        return y.argmax(axis=-1)  # one-hot
    return y.reshape(y.shape[0], -1)[:, 0] if y.ndim > 1 else y


def predict_classes(model, batches):
    """(top-1 classes, labels or None) of `model` in inference mode over `batches`."""
    specs = _input_specs(model)
    step = tf.function(lambda x: _first_output(model(x, training=False)),
                       reduce_retracing=True)
    predictions, labels = [], []
    for index, (x, y) in enumerate(batches):
        _check_batch(specs, x, index, batches.what)
        out = step(_to_tensors(x)).numpy()
        predictions.append(_classes(out))
        if y is not None:
            labels.append(_labels(tf.nest.flatten(y)[0], out.shape[-1] if out.ndim > 1 else 1))
        elif labels:
            raise ValueError(f"{batches.what}: batch {index} has no labels, earlier ones do")
    if not predictions:
        raise ValueError(f"{batches.what} is empty: it gave no batch")
    predictions = np.concatenate(predictions)
    if labels:
        labels = np.concatenate(labels)
        if labels.shape != predictions.shape:
            raise ValueError(f"{batches.what}: labels of shape {labels.shape} do not match "
                             f"the {predictions.shape[0]} predictions")
        return predictions, labels
    return predictions, None


def evaluate_ptq(model, policy="hfp8", calibration_data=None, eval_data=None, *, steps=None,
                 eval_steps=None, batch_size=32, fold_batchnorm=False, mode="exact",
                 momentum=None, exempt=None, verbose=0, return_model=False):
    """Accuracy (or agreement with FP32) before quantization, after it, after re-calibration.

    Args:
      model: the FP32 model (not modified).
      policy, calibration_data, steps, fold_batchnorm, mode, momentum, exempt: as in
        `ptq`.
      eval_data: evaluation inputs with labels (`(x, y)`, or a data set / batches of
        `(x, y)`; integer or one-hot labels) or without (`x` alone).
      eval_steps: at most this many evaluation batches.
      return_model: also return the re-calibrated quantized model, as `result["model"]`.

    Returns:
      A dict: `metric` (`"accuracy"` with labels, else `"agreement"`: the fraction of
      examples whose top-1 class equals the FP32 model's), `fp32`, `quantized`,
      `recalibrated` (the metric for the FP32 model, the quantized model without
      re-calibration and the re-calibrated (and folded) model; with `"agreement"`,
      `fp32` is 1.0), `agreement_quantized`, `agreement_recalibrated` (always),
      `num_examples`, `calibration_batches`, `calibration_seconds`, `policy`, `mode`,
      `fold_batchnorm`.
    """
    if fold_batchnorm not in _FOLD_ORDERS:
        raise ValueError(f"fold_batchnorm must be one of {_FOLD_ORDERS}, got {fold_batchnorm!r}")
    policy = _inference_policy(policy)
    evaluation = _Batches(eval_data, eval_steps, batch_size, what="evaluation data")
    batches = None if calibration_data is None else _Batches(calibration_data, steps,
                                                             batch_size)
    reference, labels = predict_classes(model, evaluation)
    quantized = quantize_model(model, policy, exempt=exempt)
    before, _ = predict_classes(quantized, evaluation)
    start = time.perf_counter()
    calibrated = _calibrate_and_fold(model, quantized, policy, batches,
                                     "after" if fold_batchnorm is True else fold_batchnorm,
                                     mode, momentum, exempt, verbose)
    seconds = time.perf_counter() - start
    after, _ = predict_classes(calibrated, evaluation)

    def agree(a, b):
        return float(np.mean(a == b))

    result = dict(
        metric="accuracy" if labels is not None else "agreement",
        policy=policy.name, mode=mode, fold_batchnorm=fold_batchnorm,
        num_examples=int(reference.shape[0]),
        calibration_batches=None if batches is None else (
            batches.length if batches.length is not None else
            (len(batches._cache) if batches._cache is not None else None)),
        calibration_seconds=seconds,
        agreement_quantized=agree(before, reference),
        agreement_recalibrated=agree(after, reference),
    )
    if labels is not None:
        result.update(fp32=agree(reference, labels), quantized=agree(before, labels),
                      recalibrated=agree(after, labels))
    else:
        result.update(fp32=1.0, quantized=result["agreement_quantized"],
                      recalibrated=result["agreement_recalibrated"])
    if return_model:
        result["model"] = calibrated
    return result
