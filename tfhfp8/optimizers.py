"""The weight-update side of low-precision training: optimizer state and master weights.

`LowPrecisionOptimizer(optimizer, policy)` wraps any Keras 3 optimizer. After every step
of the wrapped optimizer (computed in FP32):

- every slot of the optimizer (SGD's momentum, Adam's and AdamW's first and second
  moments, any variable the optimizer creates besides its step counter and learning
  rate) is rounded to `policy.optimizer_states` with `policy.rounding["optimizer_states"]`,
  as QPyTorch's `OptimLP` does;
- every trainable weight it updates is rounded to `policy.master_weights`:
  `W <- Q_m(W + dW)` with `policy.rounding["master_weights"]`: `"nearest_even"`,
  `"stochastic"`, or `"kahan"`, Kahan-compensated summation with a compensation
  buffer per weight (Zamirai et al., "Revisiting BFloat16 Training"): the part of
  `W + dW + c` the stored weight cannot hold is kept in `c` (itself stored in the
  master format) and added to the next update, so small updates accumulate instead of
  being lost.

With `master_weights` and `optimizer_states` in 16 bits, no FP32 copy of any weight
or state survives a step: pure 16-bit training is emulated (FP32 containers holding
16-bit values). Stochastic rounding draws its seeds from the optimizer's step counter,
which is saved with the optimizer, so a resumed run rounds as the uninterrupted one.

>>> import keras, tfhfp8
>>> policy = tfhfp8.Policy(master_weights="bfloat16", optimizer_states="bfloat16",
...                        rounding={"master_weights": "kahan"})
>>> optimizer = tfhfp8.optimizers.LowPrecisionOptimizer(
...     keras.optimizers.SGD(0.1, momentum=0.9), policy)

To combine it with dynamic loss scaling, wrap it in the loss-scale optimizer
(`keras.optimizers.LossScaleOptimizer(LowPrecisionOptimizer(...))`), which skips the
whole low-precision step on inf/NaN. (`LowPrecision` is this optimizer's former name,
deprecated; saved files that use it load.)
"""

import contextlib
import warnings

import keras
import tensorflow as tf

from tfhfp8 import _compat
from tfhfp8 import policy as policy_lib
from tfhfp8.quantization import quantize
from tfhfp8.formats import roundings
from tfhfp8.rounding import MasterWeightRounding, stochastic_seed

_FORWARDED = ("weight_decay", "clipnorm", "global_clipnorm", "clipvalue", "use_ema",
              "loss_scale_factor", "gradient_accumulation_steps")


class WrappedOptimizer(keras.optimizers.Optimizer):
    """What an optimizer that wraps another (`inner_optimizer`) shows of it: its
    learning rate, step counter, loss scaling and final variable values."""

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    @property
    def variables(self):
        """This optimizer's own variables, then the wrapped optimizer's."""
        return _compat.own_optimizer_variables(self) + self.inner_optimizer.variables


class LowPrecisionOptimizer(WrappedOptimizer):
    """Keeps `optimizer`'s state and the weights it updates in the formats of `policy`.

    Args:
      optimizer: the `keras.optimizers.Optimizer` that computes the update (in FP32).
        Not a `LossScaleOptimizer`: wrap this one in it instead.
      policy: a `tfhfp8.Policy` (or a preset name or config) naming
        `optimizer_states`, `master_weights` or both, with their roundings.
      name: the optimizer's name.

    Raises:
      TypeError: `optimizer` is not a Keras optimizer.
      ValueError: `optimizer` is a loss-scale optimizer, the policy names neither
        `optimizer_states` nor `master_weights`, or a base-optimizer argument
        (`weight_decay`, `clipnorm`, ...) is given here instead of to `optimizer`.
    """

    def __init__(self, optimizer, policy=None, name=None, **kwargs):
        if not isinstance(optimizer, keras.optimizers.Optimizer):
            raise TypeError(f"optimizer must be a keras.optimizers.Optimizer, got "
                            f"{optimizer!r}")
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            raise ValueError(
                "optimizer must not be a LossScaleOptimizer: wrap the low-precision "
                "optimizer in it instead, keras.optimizers.LossScaleOptimizer("
                "tfhfp8.optimizers.LowPrecisionOptimizer(optimizer, policy)), so that a "
                "step skipped on inf/NaN skips the rounding too")
        if isinstance(optimizer, LowPrecisionOptimizer):
            raise ValueError("optimizer is already a LowPrecisionOptimizer")
        for key in _FORWARDED:  # Keras passes its defaults back when deserializing
            value = kwargs.pop(key, None)
            if value not in (None, False):
                raise ValueError(f"LowPrecisionOptimizer does not take {key}={value!r}: "
                                 "set it on the wrapped optimizer")
        kwargs.pop("learning_rate", None)
        for key in ("ema_momentum", "ema_overwrite_frequency"):
            kwargs.pop(key, None)
        if kwargs:
            raise ValueError(f"LowPrecisionOptimizer got unexpected arguments "
                             f"{sorted(kwargs)}")
        policy = policy_lib.get(policy) if policy is not None else None
        if policy is None or (policy.optimizer_states is None
                              and policy.master_weights is None):
            raise ValueError(
                "policy must name optimizer_states or master_weights (or both), e.g. "
                "tfhfp8.Policy(optimizer_states='float16', master_weights='float16'); "
                f"got {policy!r}, with which LowPrecisionOptimizer would change nothing")
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = optimizer
        self.policy = policy


    # -- state ----------------------------------------------------------------------
    def build(self, var_list):
        """Builds the wrapped optimizer, then one compensation buffer per weight when the
        master weights use Kahan summation."""
        self.inner_optimizer.build(var_list)
        compensations = ()
        if self._kahan:
            compensations = tuple(self.add_variable_from_reference(v, "kahan_compensation")
                                  for v in var_list)
        # Already tracked in self._variables (saved, checkpointed); kept out of Keras'
        # attribute tracking, which would list them a second time.
        _compat.set_untracked(self, "_compensations", compensations)
        _compat.set_untracked(self, "_weights", tuple(var_list))
        _compat.set_untracked(self, "_indices", {id(v): i for i, v in enumerate(var_list)})
        super().build(var_list)

    @property
    def _kahan(self):
        return (self.policy.master_weights is not None
                and self.policy.rounding["master_weights"] == "kahan")

    def slots(self):
        """The wrapped optimizer's state rounded to `optimizer_states`: every float
        variable it holds except its step counter and learning rate."""
        inner = self.inner_optimizer
        excluded = {id(inner.iterations), id(inner.learning_rate)}
        return [v for v in inner.variables
                if id(v) not in excluded and "float" in str(v.dtype)]

    # -- the step -------------------------------------------------------------------
    def apply(self, grads, trainable_variables=None):
        if not self.built:
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        variables = (self._weights if trainable_variables is None
                     else list(trainable_variables))
        with self._master_rounding_of_layers_off(variables):
            self.inner_optimizer.apply(grads, trainable_variables)
        self._round(variables)

    @contextlib.contextmanager
    def _master_rounding_of_layers_off(self, variables):
        """While the wrapped optimizer steps, the rounding that emulated layers attach
        to their weights (`MasterWeightRounding`) stays out of the way when this
        optimizer rounds the master weights itself: one rounding per step, and Kahan
        summation sees the unrounded `W + dW`. (Constraints are read when the step is
        traced; user constraints still apply.)"""
        replaced = []
        if self.policy.master_weights is not None:
            for variable in variables:
                if isinstance(variable.constraint, MasterWeightRounding):
                    replaced.append((variable, variable.constraint))
                    variable.constraint = variable.constraint.inner
        try:
            yield
        finally:
            for variable, constraint in replaced:
                variable.constraint = constraint

    def _round(self, variables):
        """Rounds the slots and the master weights, each on its own device(s)."""
        slots = self.slots() if self.policy.optimizer_states is not None else []
        masters = variables if self.policy.master_weights is not None else []

        def round_all(strategy):
            for i, slot in enumerate(slots):
                strategy.extended.update(_value(slot), self._round_slot, args=(i,),
                                         group=False)
            for variable in masters:
                strategy.extended.update(_value(variable), self._round_master,
                                         args=(self._indices[id(variable)],), group=False)

        context = tf.distribute.get_replica_context()
        if context is None:  # cross-replica context
            round_all(tf.distribute.get_strategy())
        else:
            context.merge_call(round_all)

    def _quantize(self, value, role, index):
        rounding = self.policy.rounding[role]
        if rounding == "kahan":
            rounding = "nearest_even"
        seed = None
        if roundings.is_stochastic(rounding):  # the step (saved with the optimizer), role, index
            step = tf.cast(tf.convert_to_tensor(self.iterations), tf.int64)
            seed = stochastic_seed(step, "tfhfp8.optimizers", role, index)
        return quantize(value, self.policy.formats[role], rounding=rounding, saturate=True,
                        seed=seed)

    def _round_slot(self, slot, index):
        return slot.assign(self._quantize(tf.convert_to_tensor(slot), "optimizer_states",
                                          index))

    def _round_master(self, variable, index):
        value = tf.convert_to_tensor(variable)
        if not self._kahan:
            return variable.assign(self._quantize(value, "master_weights", index))
        # Kahan: y = W + dW + c exactly as the FP32 step left it plus the carried
        # compensation; the weight keeps Q(y), the compensation what Q(y) lost.
        compensation = self._compensations[index]
        total = value + tf.convert_to_tensor(compensation)
        rounded = self._quantize(total, "master_weights", index)
        compensation.assign(self._quantize(total - rounded, "master_weights", index))
        return variable.assign(rounded)

    # -- serialization ----------------------------------------------------------------
    def get_config(self):
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "policy": policy_lib.serialize(self.policy),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        optimizer = keras.saving.deserialize_keras_object(
            config.pop("optimizer"), custom_objects=custom_objects)
        return cls(optimizer, policy_lib.get(config.pop("policy")), **config)


# Saved files name the class "tfhfp8>LowPrecision" (its name until the rename): both
# names load it; the last registration is the one written.
keras.saving.register_keras_serializable("tfhfp8", "LowPrecision")(LowPrecisionOptimizer)
keras.saving.register_keras_serializable("tfhfp8")(LowPrecisionOptimizer)


def __getattr__(name):
    """`LowPrecision`: the former name of `LowPrecisionOptimizer`, deprecated."""
    if name == "LowPrecision":
        warnings.warn("tfhfp8.optimizers.LowPrecision is deprecated: use "
                      "tfhfp8.optimizers.LowPrecisionOptimizer", DeprecationWarning,
                      stacklevel=2)
        return LowPrecisionOptimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _value(variable):
    """The backend variable behind a Keras variable (what `tf.distribute` updates); a
    `tf.Variable` itself (whose `value` is a method)."""
    return variable.value if isinstance(variable, keras.Variable) else variable
