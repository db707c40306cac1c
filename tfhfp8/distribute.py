"""Gradients communicated in a low-precision format: the emulated all-reduce.

In data-parallel training every replica computes a gradient and an all-reduce sums
them. Hardware that communicates in 8 or 16 bits rounds what it sends and every partial
sum it forms. `GradientCommunication` defines that arithmetic exactly, and
`GradientCommunicationOptimizer` makes Keras training under `tf.distribute`
(`MirroredStrategy`, `MultiWorkerMirroredStrategy`) use it instead of the FP32
all-reduce (the arithmetic, and its sources: `tfhfp8.all_reduce`):

```python
import keras, tensorflow as tf, tfhfp8

strategy = tf.distribute.MirroredStrategy()
with strategy.scope():
    model = tfhfp8.quantize_model(keras_model, "hfp8")
    optimizer = tfhfp8.distribute.GradientCommunicationOptimizer(
        keras.optimizers.SGD(0.1), tfhfp8.distribute.GradientCommunication("float8_e5m2"))
    model.compile(optimizer, "sparse_categorical_crossentropy")
model.fit(x, y, batch_size=128)
```

**Distribution**: every replica gathers all replicas' float32 gradients (one gather per
step of all gradients concatenated) and computes the same emulated reduction, so the
result is exact and identical everywhere whatever the real collective does. On one
machine (every replica local, `MirroredStrategy`) the gather is a `merge_call` on the
replicas' values (no collective op); across workers it is the public
`tf.distribute.ReplicaContext.all_gather`.
"""

import keras
import tensorflow as tf

from tfhfp8 import _compat
# The arithmetic, handed on: tfhfp8.distribute.GradientCommunication, get, names, ...
from tfhfp8.all_reduce import (ALGORITHMS, PRESETS, REGISTRY, SCALINGS,  # noqa: F401
                               GradientCommunication, get, names, serialize)
from tfhfp8.optimizers import WrappedOptimizer
from tfhfp8.replicas import gather_replicas  # noqa: F401 (its former home)


# -- Keras integration -------------------------------------------------------------------
def prepare_multi_worker_fit(model):
    """Works around two Keras 3 bugs that stop `model.fit` under
    `tf.distribute.MultiWorkerMirroredStrategy` (keras-team/keras#20585); not specific
    to emulation. Call it once on the model, in each worker; returns the model.

    - Before the first step Keras reduces the first batch across workers to build the
      model ("Attempt to convert a value (PerReplica ...)"): the model is built from
      the first local replica's batch instead (`tfhfp8/_compat.py`).
    - After each step it averages the logs across workers along an axis they do not
      have ("Invalid reduction dimension 0 for input with 0 dimensions"): the steps
      return their scalar logs with a length-1 axis (`tfhfp8/_compat.py`).

    Only for MultiWorkerMirroredStrategy (on one machine, MirroredStrategy needs none).
    """
    _compat.build_from_first_replica(model)
    _compat.logs_with_replica_axis(model)
    return model


def _innermost(optimizer):
    """The optimizer that applies the update (inside LossScaleOptimizer-like wrappers)."""
    while hasattr(optimizer, "inner_optimizer"):
        optimizer = optimizer.inner_optimizer
    return optimizer


@keras.saving.register_keras_serializable(package="tfhfp8")
class GradientCommunicationOptimizer(WrappedOptimizer):
    """Wraps a Keras optimizer so that its gradient all-reduce under `tf.distribute` is
    the emulated `communication` instead of the real FP32 sum.

    The real all-reduce is not run: every replica gathers all replicas' gradients and
    computes the emulated sum itself (see the module docstring), then the inner
    optimizer applies it (master-weight rounding included). Wrap it in a
    `keras.optimizers.LossScaleOptimizer` (or `tfhfp8.loss_scaling.
    DynamicLossScaleOptimizer`) for whole-model loss scaling, or the other way round;
    per-layer loss scaling (`Policy(..., loss_scaling=...)`) works as usual. Stochastic
    rounding counts steps with the inner optimizer's `iterations`, saved with the
    optimizer. Outside a strategy, or with one replica, the communication still
    rounds the one replica's gradient (N = 1: `Q(s * g) / s`).

    Args:
      inner_optimizer: the `keras.optimizers.Optimizer` to wrap.
      communication: a `GradientCommunication`, a preset name (`names()`) or a config.
    """

    def __init__(self, inner_optimizer, communication="float32", name=None, **kwargs):
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"inner_optimizer must be a keras.optimizers.Optimizer, got "
                            f"{inner_optimizer!r}")
        if kwargs:
            raise ValueError("GradientCommunicationOptimizer takes no optimizer arguments "
                             f"(set them on the inner optimizer), got {sorted(kwargs)}")
        communication = get(communication)
        if communication is None:
            raise TypeError("communication must be a GradientCommunication, a name or a "
                            "config, got None")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self.communication = communication
        target = _innermost(inner_optimizer)
        _compat.replace_gradient_all_reduce(target, self._all_reduce_with(target))

    def _all_reduce_with(self, target):
        communication = self.communication

        def all_reduce(grads_and_vars):
            grads_and_vars = list(grads_and_vars)
            present = [i for i, (g, _) in enumerate(grads_and_vars) if g is not None]
            grads = [tf.convert_to_tensor(grads_and_vars[i][0]) for i in present]
            step = tf.cast(tf.convert_to_tensor(target.iterations), tf.int64)
            reduced = communication.all_reduce(grads, step)
            out = list(grads_and_vars)
            for i, g in zip(present, reduced):
                out[i] = (g, grads_and_vars[i][1])
            return out

        return all_reduce

    def build(self, var_list):
        self.inner_optimizer.build(var_list)
        super().build(var_list)

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with tf.name_scope(self.name):
                self.build(trainable_variables)
            self.built = True
        self.inner_optimizer.apply(grads, trainable_variables=trainable_variables)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        raise NotImplementedError("GradientCommunicationOptimizer runs on the TensorFlow "
                                  "backend (tf.distribute) only")

    def get_config(self):
        return {"name": self.name,
                "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
                "communication": serialize(self.communication)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"),
                                                      custom_objects=custom_objects)
        return cls(inner, **config)
