"""Calibration and evaluation data: arrays, data sets and iterables as re-iterable batches."""

import itertools
import math
import numbers
import warnings

import numpy as np
import tensorflow as tf

from tfhfp8 import _compat

#: At most this many batches are read from calibration data of unknown length (a
#: generator or other iterator, a `tf.data.Dataset` of unknown cardinality) when no
#: `steps` is given: an endless generator stops there (with a warning) instead of running,
#: and being cached, forever. Users change it as `tfhfp8.calibration.DEFAULT_MAX_STEPS`
#: (the package reads and writes this one); it is read when data is wrapped.
DEFAULT_MAX_STEPS = 1000


def _default_max_steps():
    return DEFAULT_MAX_STEPS


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


class Batches:
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
            self.steps = _default_max_steps()
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

    @property
    def num_batches(self):
        """The number of batches: `length` when known, else (a one-shot iterator) how
        many were read so far; None for other data of unknown length."""
        if self.length is not None:
            return self.length
        return None if self._cache is None else len(self._cache)

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


def input_specs(model):
    """The model's symbolic inputs as a flat list, or None when it has none (subclassed)."""
    graph = _compat.functional_graph(model)
    if graph is not None:
        return tf.nest.flatten(_compat.graph_inputs(graph))
    try:
        return list(model.inputs)
    except (AttributeError, ValueError):
        return None


def check_batch(specs, x, index, what):
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


def to_tensors(x):
    return tf.nest.map_structure(
        lambda a: a if isinstance(a, tf.Tensor) else tf.convert_to_tensor(np.asarray(a)), x)


def check_finite(x, index, what):
    """A ValueError when a floating-point input array of batch `index` has NaN or inf."""
    for array in tf.nest.flatten(x):
        if (array.dtype.is_floating or array.dtype.is_complex) and not bool(
                tf.reduce_all(tf.math.is_finite(tf.abs(array) if array.dtype.is_complex
                                                else array))):
            raise ValueError(
                f"{what}: batch {index} contains NaN or infinite values; BatchNorm "
                "statistics computed from it would not be finite (the model is left "
                "unchanged). Remove or replace those values first")
