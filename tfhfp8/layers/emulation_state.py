"""The state of an emulated layer: what it creates after `build`, and how it is saved.

`EmulationState` is a mixin of `EmulatedLayer`: the stochastic-rounding step counter,
master-weight rounding attached to the trainable weights, the per-GEMM loss-scaling
and delayed-scaling variables (and the per-tensor scales they give), the optional
statistics, and the saving and loading of that state in `.keras` and `.weights.h5`
files.
"""

import functools

import keras
import tensorflow as tf

from tfhfp8 import _compat, accumulation, gemm, loss_scaling
from tfhfp8 import policy as policy_lib
from tfhfp8.formats import roundings
from tfhfp8.ops import tf_fp32_scales
from tfhfp8.rounding import MasterWeightRounding, stochastic_seed


class _RoundingStep(tf.Module):
    """Holds the layer's stochastic-rounding step counter out of Keras' tracking, so that
    it is not one of the layer's weights (`get_weights`, `set_weights` and weight copies
    stay as in Keras); `EmulatedLayer` saves and loads it itself in `.keras` and
    `.weights.h5` files. A `tf.Module`, so that TensorFlow's tracking, which Keras'
    ignores, sees it: `tf.train.Checkpoint(model=...)` saves and restores the counter
    (as `<layer>/_rounding_step_holder/variable`)."""

    KEY = "rounding_step"  # its key in the layer's saved variables

    def __init__(self, layer):
        super().__init__(name=None)
        self.variable = keras.Variable(
            0, dtype="int64", trainable=False, aggregation="only_first_replica",
            name=f"{layer.name}_{self.KEY}")

    def advance(self):
        """Counts one more use (a GEMM's forward pass) and returns the new count."""
        self.variable.assign_add(1)
        return tf.convert_to_tensor(self.variable.value)


class EmulationState:
    """Mixin: the state an `EmulatedLayer` creates after `build`, and its saving."""

    def after_build(self):
        """Creates the rounding step counter and the loss-scaling state, and attaches
        master-weight rounding."""
        self._create_rounding_step()
        self._attach_master_weight_rounding()
        self._create_error_state()
        self._create_scaling_state()

    def _create_rounding_step(self):
        if self._sums_stochastically() or any(
                self.policy.formats[role] is not None
                and roundings.is_stochastic(self.policy.rounding[role])
                for role in policy_lib.LAYER_ROLES):
            self._rounding_step_holder = _RoundingStep(self)

    def _sums_stochastically(self):
        """True when an emulated accumulator of the policy rounds stochastically."""
        return self.policy.accumulates and any(
            acc.kind == "float" and acc.rounding == "stochastic"
            for acc in self.policy.accumulation.values())

    def _attach_master_weight_rounding(self):
        fmt = self.policy.master_weights
        if fmt is None:
            return
        holder = getattr(self, "_rounding_step_holder", None)
        for variable in (v for v in self.weights if v.trainable):
            if not isinstance(variable.constraint, MasterWeightRounding):
                seed = None if holder is None else functools.partial(
                    lambda path: stochastic_seed(tf.convert_to_tensor(holder.variable.value),
                                                 self.name, "master_weights", path),
                    variable.path.split("/")[-1])
                variable.constraint = MasterWeightRounding(
                    fmt, self.policy.rounding["master_weights"], variable.constraint, seed)

    def _create_error_state(self):
        """Per GEMM: the loss-scaling variables, when the policy scales errors; and
        `loss_scaling_rule`, the rule the policy's loss-scaling spec names (or None)."""
        self.loss_scaling_rule = loss_scaling.from_spec(self.policy.loss_scaling)
        self.error_state = {name: {} for name in self.GEMMS}
        if self.policy.errors is not None and self.loss_scaling_rule is not None:
            for name in self.GEMMS:
                self.error_state[name] = self.loss_scaling_rule.create_state(self, name)
                for key, variable in self.error_state[name].items():
                    # Attributes, so that tf.train.Checkpoint tracks them too.
                    setattr(self, f"_{name}_{key}", variable)

    def _create_scaling_state(self):
        """Per GEMM operand in a delayed per-tensor format: its amax history and scale
        (Keras' float8 layers: `inputs_amax_history`, `inputs_scale`, ...)."""
        self.scaling_state = {}
        inputs, kernels = self.OPERANDS
        operands = ([("activations", i) for i in range(inputs)]
                    + [("weights", i) for i in range(kernels)] + [("errors", 0)])
        for gemm_name in self.GEMMS:
            for role, index in operands:
                fmt = self.policy.formats[role]
                if not getattr(fmt, "delayed", False):
                    continue
                tag = f"{gemm_name}_{role}{index}"
                add = lambda suffix, shape, value: self.add_weight(
                    name=f"{tag}_{suffix}", shape=shape, dtype="float32", trainable=False,
                    initializer=keras.initializers.Constant(value),
                    aggregation="only_first_replica")
                state = {"scale": add("scale", (), 1.0),
                         "amax_history": add("amax_history", (fmt.amax_history,), 0.0)}
                self.scaling_state[(gemm_name, role, index)] = state
                for key, variable in state.items():
                    setattr(self, f"_{tag}_{key}", variable)  # tracked by tf.train.Checkpoint

    def _delayed_scale(self, x, role, gemm_name="gemm", index=0, update=True):
        """The scale of a delayed per-tensor format (None for any other format): the
        one in the layer's state; when `update` and this is a training pass (or a
        backward one), the state then takes the next scale and `x`'s amax, as Keras'
        float8 layers do (`compute_float8_scale` from the history before this step,
        `compute_float8_amax_history`)."""
        state = getattr(self, "scaling_state", {}).get((gemm_name, role, index))
        if state is None:
            return None
        fmt = self.policy.formats[role]
        scale = tf.convert_to_tensor(state["scale"].value)
        if update and (role == "errors" or _compat.gradients_may_be_recorded()):
            history = tf.convert_to_tensor(state["amax_history"].value)
            state["scale"].assign(
                tf_fp32_scales.tensor_scale(tf.reduce_max(history), fmt, scale))
            state["amax_history"].assign(
                tf_fp32_scales.next_amax_history(history, tf_fp32_scales.tensor_amax(x)))
        return scale

    def _tensor_scale(self, x, role, *key):
        """The FP32 scale of a per-tensor scaled role's format for `x` (the delayed one
        of `_delayed_scale`, or that of `x`'s own amax, as `quantize` would take it);
        None for any other format."""
        scale = self._delayed_scale(x, role, *key)
        if scale is None and gemm.is_tensor_scaled(self.policy.formats[role]):
            scale = tf_fp32_scales.current_scale(x, self.policy.formats[role])
        return scale

    def enable_error_stats(self):
        """Records, per GEMM and backward pass, the fraction of errors that underflowed
        to zero or saturated in `Q_e` (`error_state[gemm]["underflow"|"saturation"]`).

        With emulated accumulation, also per GEMM and GEMM kind the numbers of
        additions, of swamped additions (a non-zero addend lost entirely) and of INT32
        overflows of the last pass (`accumulation_state[gemm]["<kind>/<count>"]`).

        Called by `tfhfp8.callbacks.QuantizationStats` (inside the model's distribution
        strategy scope); takes effect in functions traced afterwards. Without it, no
        statistic is computed or stored. The statistics are not model weights.
        """
        if self.policy.accumulates and not hasattr(self, "accumulation_state"):
            # Per GEMM and kind: swamped additions, all additions, INT32 overflows.
            self.accumulation_state = {
                name: {f"{kind}/{key}": tf.Variable(
                    0, dtype=tf.int64, trainable=False,
                    name=f"{self.name}_{name}_{kind}_{key}",
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                    for kind in accumulation.GEMM_KINDS
                    for key in ("swamped", "additions", "overflows")}
                for name in self.GEMMS}
        if self.policy.errors is None or self.collect_stats:
            return
        for name in self.GEMMS:
            for stat in ("underflow", "saturation"):
                self.error_state[name][stat] = tf.Variable(
                    0.0, trainable=False, name=f"{self.name}_{name}_{stat}",
                    aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self.collect_stats = True

    def emulation_variables(self):
        """The layer's loss-scaling and delayed-scaling state: saved with the model,
        not copied as weights."""
        return [v for state in getattr(self, "error_state", {}).values()
                for key, v in state.items() if key not in ("underflow", "saturation")] + [
            v for state in getattr(self, "scaling_state", {}).values()
            for v in (state["scale"], state["amax_history"])]

    # Keras' Dense, EinsumDense, convolution and Embedding layers save only their
    # kernel and bias: the loss-scaling state is appended after them (other layers,
    # MultiHeadAttention, save every variable of their own, the state included).
    # The rounding step counter is saved under its own key (files saved before it
    # existed load with the counter at 0).
    def save_own_variables(self, store):
        saved = {}
        super().save_own_variables(saved)
        for key, value in saved.items():
            store[key] = value
        saved_ids = {id(value) for value in saved.values()}
        for variable in self.emulation_variables():
            if id(variable) not in saved_ids:
                store[str(len(store.keys()))] = variable
        holder = getattr(self, "_rounding_step_holder", None)
        if holder is not None:
            store[_RoundingStep.KEY] = holder.variable

    def load_own_variables(self, store):
        holder = getattr(self, "_rounding_step_holder", None)
        if _RoundingStep.KEY in store.keys():
            if holder is not None:
                holder.variable.assign(store[_RoundingStep.KEY])
            store = _Without(store, _RoundingStep.KEY)
        super().load_own_variables(store)
        state = self.emulation_variables()
        first = len(store.keys()) - len(state)
        for i, variable in enumerate(state):
            variable.assign(store[str(first + i)])


class _Without:
    """A read-only view of a saved-variables store without one key."""

    def __init__(self, store, key):
        self._store, self._key = store, key

    def keys(self):
        return [k for k in self._store.keys() if k != self._key]

    def __getitem__(self, key):
        if key == self._key:
            raise KeyError(key)
        return self._store[key]

    def __contains__(self, key):
        return key != self._key and key in self._store.keys()

    def __len__(self):
        return len(self.keys())


def record_error_stats(state, scaled, quantized, fmt):
    """Sets `state["underflow"]` to the fraction of the non-zero `scaled` errors that
    `quantized` made zero, and `state["saturation"]` to the fraction beyond `fmt.max`."""
    nonzero = tf.math.count_nonzero(scaled, dtype=tf.float32)
    lost = tf.math.count_nonzero((quantized == 0) & (scaled != 0), dtype=tf.float32)
    state["underflow"].assign(lost / tf.maximum(nonzero, 1.0))
    if hasattr(fmt, "max"):
        beyond = tf.math.count_nonzero(tf.abs(scaled) > fmt.max, dtype=tf.float32)
        total = tf.cast(tf.maximum(tf.size(scaled), 1), tf.float32)
        state["saturation"].assign(beyond / total)
