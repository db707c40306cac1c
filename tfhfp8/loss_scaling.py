"""Loss scaling for low-precision errors: per layer, and dynamic for the whole model.

1-5-2 errors have a tiny range at the bottom (smallest subnormal 2^-16): without
scaling most gradients of a real network vanish in `Q_e`. Two complementary tools:

- Per-layer scales, set on a policy (`tfhfp8.Policy(..., loss_scaling="adaptive")`):
  each emulated GEMM computes `Q_e(s * dy) / s` with its own power-of-two `s`
  (`Adaptive`, Zhao et al. 2019, or `AbsMax`, the per-tensor FP8 rule). Powers of two
  make the scaling itself exact, and in FP32 containers a scale applied just before
  `Q_e` and removed just after is what scaled low-precision hardware computes.
- `DynamicLossScaleOptimizer`: Keras' dynamic loss scaling for the whole model plus
  a minimum-scale floor that can rise on a schedule (Mellempudi et al. 2019).
"""

import math
import numbers

import keras
import tensorflow as tf

from tfhfp8 import _compat, formats, registry, replicas


def _floor_pow2(x):
    """The largest power of two <= x (x >= 1, finite), as float32."""
    return tf.pow(2.0, tf.floor(tf.math.log(x) / math.log(2.0)))


def _range(fmt):
    """(u_min, u_max): the smallest and largest magnitudes of a float format."""
    return fmt.min_subnormal, fmt.max


@keras.saving.register_keras_serializable(package="tfhfp8")
class LossScaling:
    """Base class: a rule giving each emulated GEMM a power-of-two error scale.

    Subclasses implement `compute(dy, weights, fmt, state, fan_in)` returning a float32
    power-of-two scalar, and may add state variables in `create_state`. `fan_in` is the
    fan-in of the GEMM's backward (input-gradient) product: how many products of `dy`
    and `W` each element of the input gradient sums (`units` for a Dense layer,
    `filters * kh * kw` for a Conv2D layer); the layer computes it
    (`EmulatedLayer.backward_fan_in`).
    """

    def __init__(self, every=1, max_scale=2.0**24):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        if not max_scale >= 1 or math.log2(max_scale) % 1:
            raise ValueError(f"max_scale must be a power of two >= 1, got {max_scale!r}")
        self.every = every
        self.max_scale = float(max_scale)

    def create_state(self, layer, name):
        """Variables of one GEMM: its current scale and a step counter."""
        add = lambda suffix, dtype, value: layer.add_weight(
            name=f"{name}_{suffix}", shape=(), dtype=dtype, trainable=False,
            initializer=keras.initializers.Constant(value), aggregation="only_first_replica")
        return {"scale": add("loss_scale", "float32", 1.0), "step": add("scale_step", "int64", 0)}

    def scale(self, dy, weights, fmt, state, fan_in=1):
        """The scale for this backward pass, refreshed every `every` steps."""
        if not isinstance(fmt, formats.FloatFormat):
            return tf.constant(1.0)  # dynamic fixed point picks its own exponent
        dy = tf.cast(dy, tf.float32)
        weights = None if weights is None else tf.cast(weights, tf.float32)
        refresh = tf.equal(state["step"] % self.every, 0)
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            # Replicas agree on the smallest scale; collectives cannot sit in a cond.
            computed = replicas.reduce_over_replicas(
                self.compute(dy, weights, fmt, state, fan_in), tf.reduce_min)
            scale = tf.where(refresh, computed, state["scale"])
        else:
            scale = tf.cond(refresh, lambda: self.compute(dy, weights, fmt, state, fan_in),
                            lambda: tf.identity(state["scale"]))
        state["scale"].assign(scale)
        state["step"].assign_add(1)
        return scale

    def compute(self, dy, weights, fmt, state, fan_in):
        raise NotImplementedError

    def _bounded(self, scale):
        scale = tf.clip_by_value(scale, 1.0, self.max_scale)
        scale = tf.where(tf.math.is_finite(scale), scale, tf.ones_like(scale))
        return _floor_pow2(scale)

    def get_config(self):
        return {"every": self.every, "max_scale": self.max_scale}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


@keras.saving.register_keras_serializable(package="tfhfp8")
class Adaptive(LossScaling):
    """Adaptive layer-wise loss scaling (Zhao et al., arXiv 1910.12385).

    For the incoming gradient `g` and the weights `W` of a GEMM whose backward product
    (the input gradient) sums `N` terms per element:

        sigma_o = sqrt((var_g + mean_g^2) (var_W + mean_W^2)) sqrt(N / 2)
        a_low = max(1, u_min / (sqrt(2) erfinv(underflow_rate) sigma_o))
        a_up = (u_max / N) / (max|g| max|W|)
        s = 2^floor(log2(min(a_low, a_up, max_scale)))

    so that at most `underflow_rate` of the outputs underflow (under a Gaussian
    assumption) and none overflow; `u_min`, `u_max` are the error format's smallest
    and largest magnitudes. `N` is the fan-in of the BACKWARD product, as in Zhao et
    al.'s reference implementation (kumasento/gradient-scaling, `ada_loss`,
    `AdaLossChainer.get_fan_in`): the units of a Dense layer, `filters * kh * kw` for a
    Conv2D kernel `(kh, kw, in, filters)` -- not the forward fan-in `in * kh * kw`.
    GEMMs without weights (attention products) use `W = 1`, `N = 1`. Under
    `tf.distribute`, every replica uses the smallest replica scale.

    Args:
      underflow_rate: target fraction of underflowing values (`n_uf`), in (0, 1).
      every: recompute the scale every `every` backward passes (kept in between).
      max_scale: upper bound of a scale (a power of two).
    """

    def __init__(self, underflow_rate=1e-3, every=1, max_scale=2.0**24):
        super().__init__(every=every, max_scale=max_scale)
        if not 0 < underflow_rate < 1:
            raise ValueError(f"underflow_rate must be in (0, 1), got {underflow_rate!r}")
        self.underflow_rate = float(underflow_rate)
        with tf.init_scope():  # a Python constant, even if built inside a tf.function
            self._erfinv = float(tf.math.erfinv(tf.constant(self.underflow_rate, tf.float64)))

    def compute(self, dy, weights, fmt, state, fan_in):
        u_min, u_max = _range(fmt)
        second_moment = lambda t: tf.math.reduce_variance(t) + tf.square(tf.reduce_mean(t))
        if weights is None:
            w_moment, w_max, n = tf.constant(1.0), tf.constant(1.0), 1.0
        else:
            w_moment = second_moment(weights)
            w_max = tf.reduce_max(tf.abs(weights))
            n = float(max(1, fan_in))
        sigma = tf.sqrt(second_moment(dy) * w_moment) * math.sqrt(0.5 * n)
        a_low = tf.maximum(1.0, u_min / (math.sqrt(2.0) * self._erfinv * sigma))
        a_up = (u_max / n) / (tf.reduce_max(tf.abs(dy)) * w_max)
        return self._bounded(tf.minimum(a_low, a_up))

    def get_config(self):
        return {"underflow_rate": self.underflow_rate, **super().get_config()}


@keras.saving.register_keras_serializable(package="tfhfp8")
class AbsMax(LossScaling):
    """Per-tensor scaling from the gradient's absolute maximum (FP8 recipe).

    `s = 2^floor(log2(u_max / amax / 2^margin))`, where `amax` is `max|dy|` of the
    current backward pass (`history=None`) or the largest of the previous `history`
    passes (delayed scaling, as NVIDIA Transformer Engine does).
    """

    def __init__(self, history=None, margin=0, every=1, max_scale=2.0**24):
        super().__init__(every=every, max_scale=max_scale)
        if history is not None and (isinstance(history, bool) or not isinstance(history, int)
                                    or history < 1):
            raise ValueError(f"history must be None or an integer >= 1, got {history!r}")
        self.history, self.margin = history, int(margin)

    def create_state(self, layer, name):
        state = super().create_state(layer, name)
        if self.history:
            state["amax"] = layer.add_weight(
                name=f"{name}_amax_history", shape=(self.history,), trainable=False,
                initializer="zeros", aggregation="only_first_replica")
        return state

    def compute(self, dy, weights, fmt, state, fan_in):
        amax = replicas.reduce_over_replicas(tf.reduce_max(tf.abs(dy)), tf.reduce_max)
        if self.history:
            history = state["amax"]
            past = tf.reduce_max(history)
            history.assign(tf.concat([[amax], history[:-1]], axis=0))
            amax = tf.where(past > 0, past, amax)  # the first step has no history
        return self._bounded(_range(fmt)[1] / amax / 2.0**self.margin)

    def get_config(self):
        return {"history": self.history, "margin": self.margin, **super().get_config()}


def _from_plain_config(config):
    """Files saved before the registry: `{"class_name": "Adaptive", "config": {...}}`."""
    classes = {cls.__name__: cls for cls in REGISTRY.entries.values()}
    if config.get("class_name") in classes:
        return classes[config["class_name"]](**config.get("config", {}))
    return None


REGISTRY = registry.Registry("loss_scaling", LossScaling, {"adaptive": Adaptive, "absmax": AbsMax},
                             from_plain_config=_from_plain_config)


def names():
    """Names of the per-layer loss-scaling rules."""
    return REGISTRY.names()


def get(identifier):
    """A LossScaling from None, a name (`"adaptive"`, `"absmax"`), a config or itself."""
    return None if identifier is None else REGISTRY.get(identifier)


def serialize(loss_scaling):
    """The Keras config of `loss_scaling` (None stays None)."""
    return REGISTRY.serialize(loss_scaling)


def from_spec(spec):
    """The rule a `tfhfp8.loss_scaling_spec.LossScalingSpec` names, built with its
    arguments (None stays None): what a layer scales its errors with."""
    if spec is None:
        return None
    cls = keras.saving.get_registered_object(spec.rule)
    if not (isinstance(cls, type) and issubclass(cls, LossScaling)):
        raise ValueError(f"loss_scaling: {spec.rule!r} is not a registered "
                         f"tfhfp8.loss_scaling.LossScaling class (known: {', '.join(names())})")
    return cls.from_config(spec.config)


def _parse_schedule(schedule):
    """`min_scale_schedule` as a sorted list of `(int step, float floor)`."""
    if schedule is None:
        return []
    usage = ("min_scale_schedule must be a list of (step, floor) pairs, e.g. "
             "[(1000, 2.0**6)], with integer steps >= 0 and positive floors")
    if isinstance(schedule, (str, bytes, dict)) or not hasattr(schedule, "__iter__"):
        raise TypeError(f"{usage}; got {schedule!r}")
    pairs = []
    for item in schedule:
        if isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) != 2:
            raise ValueError(f"{usage}; got the item {item!r}")
        step, value = item
        if (isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0
                or isinstance(value, bool) or not isinstance(value, numbers.Real)
                or not 0 < value < math.inf):
            raise ValueError(f"{usage}; got the item {item!r}")
        pairs.append((int(step), float(value)))
    return sorted(pairs)


@keras.saving.register_keras_serializable(package="tfhfp8")
class DynamicLossScaleOptimizer(_compat.LossScaleHooks,
                                keras.optimizers.LossScaleOptimizer):
    """Enhanced dynamic loss scaling (Mellempudi et al. 2019) for Keras 3 optimizers.

    Keras' dynamic loss scaling (double after `dynamic_growth_steps` clean steps,
    halve and skip the step on inf/NaN), but the scale never drops below a floor:
    `min_scale`, or the last `(step, floor)` of `min_scale_schedule` whose step has
    been reached, which lets the floor rise as gradients shrink during training.
    `skipped_steps` counts the steps skipped on inf/NaN. Works together with
    per-layer scales, which adapt to whatever magnitude reaches each layer.

    >>> import keras, tfhfp8
    >>> optimizer = tfhfp8.loss_scaling.DynamicLossScaleOptimizer(
    ...     keras.optimizers.SGD(0.1), initial_scale=2.0**10, min_scale=2.0**4,
    ...     min_scale_schedule=[(1000, 2.0**6)])
    """

    def __init__(self, inner_optimizer, initial_scale=2.0**15, dynamic_growth_steps=2000,
                 min_scale=1.0, min_scale_schedule=None, name=None, **kwargs):
        super().__init__(inner_optimizer, initial_scale=initial_scale,
                         dynamic_growth_steps=dynamic_growth_steps, name=name, **kwargs)
        schedule = _parse_schedule(min_scale_schedule)
        if (isinstance(min_scale, bool) or not isinstance(min_scale, numbers.Real)
                or not 0 < min_scale < math.inf):
            raise ValueError(f"min_scale must be a positive finite number, got {min_scale!r}")
        self.min_scale = float(min_scale)
        self.min_scale_schedule = schedule

    def build(self, var_list):
        super().build(var_list)
        self.skipped_steps = self.add_variable(
            shape=(), dtype="int", initializer="zeros", aggregation="none",
            name="skipped_steps")

    def floor(self):
        """The minimum scale at the current step."""
        floor = tf.constant(self.min_scale)
        step = tf.cast(self.iterations, tf.int64)
        for start, value in self.min_scale_schedule:
            floor = tf.where(step >= start, tf.constant(value), floor)
        return floor

    def after_non_finite_step(self):
        """Counts the skipped step and keeps the halved scale at or above the floor."""
        self.skipped_steps.assign_add(1)
        self.dynamic_scale.assign(tf.maximum(self.dynamic_scale, self.floor()))

    def after_finite_step(self):
        """Keeps the scale (doubled or not) at or above the floor."""
        self.dynamic_scale.assign(tf.maximum(self.dynamic_scale, self.floor()))

    def get_config(self):
        config = super().get_config()
        config.update(min_scale=self.min_scale, min_scale_schedule=self.min_scale_schedule)
        return config
