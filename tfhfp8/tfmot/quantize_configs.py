"""The tfmot quantizers and per-layer configs of the bridge (`tfhfp8.tfmot`): what one
annotated GEMM layer rounds, and the policy checks the bridge makes.

Imported through `tfhfp8.tfmot`, which first checks that tf-keras and tfmot can be used.
"""

import keras  # Keras 3, as in tfhfp8's layers (tf.keras is tf_keras here)
import tensorflow as tf
import tf_keras
import tensorflow_model_optimization as _tfmot

from tfhfp8 import formats as _formats
from tfhfp8 import policy as _policy
from tfhfp8.quantization import check_rounding_and_saturate, quantize, quantize_gradient

_keras = _tfmot.quantization.keras
_register = tf_keras.utils.register_keras_serializable(package="tfhfp8")

# The GEMM layers the bridge emulates: tf-keras class name -> attribute of the kernel.
# Their call() computes the GEMM, then `if use_bias: + bias`, then `activation`.
GEMM_LAYERS = {"Dense": "kernel", "Conv1D": "kernel", "Conv2D": "kernel", "Conv3D": "kernel"}


def check_policy(policy):
    """`policy` as a Policy, or a ValueError naming what the bridge does not carry over
    (per-GEMM loss scaling, emulated accumulation) and what to use instead."""
    policy = _policy.get(policy)
    if policy.loss_scaling is not None:
        raise ValueError(f"policy {policy.name!r} has loss_scaling="
                         f"{policy.loss_scaling!r}, which tfhfp8.tfmot does not support: use "
                         "a policy without loss_scaling and tf.keras.mixed_precision."
                         "LossScaleOptimizer for global loss scaling")
    if getattr(policy, "accumulates", False):
        raise ValueError(f"policy {policy.name!r} emulates accumulation "
                         f"(accumulation={policy.accumulation!r}), which tfhfp8.tfmot does "
                         "not support: use accumulation=None (FP32 sums) here, or "
                         "tfhfp8's Keras 3 layers")
    return policy


@_register
class Quantizer(_keras.quantizers.Quantizer):
    """A tfmot quantizer: the tensor rounded to `format` in the forward pass (the gradient
    passing straight through) and its gradient rounded to `gradient_format` in the
    backward pass (`tfhfp8.quantize_gradient`). Either may be None (FP32).

    Formats as `tfhfp8.quantize` takes them (a name, `FloatFormat`, `DynamicFixedPoint`,
    `BlockScaled`). `tfhfp8.tfmot.Quantizer("float8_e4m3b11fnuz")` rounds activations or
    weights to 1-4-3; `Quantizer(gradient_format="float8_e5m2")` rounds errors to 1-5-2.
    """

    def __init__(self, format=None, gradient_format=None, rounding="nearest_even",
                 gradient_rounding="nearest_even", saturate=True):
        self.format = None if format is None else _formats.get(format)
        self.gradient_format = (None if gradient_format is None
                                else _formats.get(gradient_format))
        # Checked now, not in the first training step.
        check_rounding_and_saturate(rounding, saturate)
        check_rounding_and_saturate(gradient_rounding, saturate)
        self.rounding, self.gradient_rounding = rounding, gradient_rounding
        self.saturate = saturate

    def build(self, tensor_shape, name, layer):
        return {}  # no state: every format here is fixed or scaled from the tensor itself

    def __call__(self, inputs, training, weights, **kwargs):
        x = inputs
        if self.gradient_format is not None:
            x = quantize_gradient(x, self.gradient_format, rounding=self.gradient_rounding,
                                  saturate=self.saturate)
        if self.format is not None:
            x = quantize(x, self.format, rounding=self.rounding, saturate=self.saturate)
        return x

    def get_config(self):
        return {"format": _formats.serialize(self.format),
                "gradient_format": _formats.serialize(self.gradient_format),
                "rounding": self.rounding, "gradient_rounding": self.gradient_rounding,
                "saturate": self.saturate}

    def __eq__(self, other):
        return isinstance(other, Quantizer) and self.get_config() == other.get_config()

    def __ne__(self, other):
        return not self == other


def _roles(policy):
    """The quantizers of one GEMM layer under `policy`: activations, weights, errors."""
    r = policy.rounding
    return (Quantizer(policy.activations, None, r["activations"], saturate=policy.saturate),
            Quantizer(policy.weights, policy.weight_gradients, r["weights"],
                      r["weight_gradients"], saturate=policy.saturate),
            Quantizer(None, policy.errors, gradient_rounding=r["errors"],
                      saturate=policy.saturate))


@_register
class ErrorsBiasActivation:
    """Stands in for a GEMM layer's activation while tfmot runs it: `Q_e` on the
    gradient of the GEMM's output, then the FP32 bias, then the layer's activation.

    tf-keras layers add the bias before the activation, inside `call`; the bridge hands
    them a bias of -0.0 (`x + -0.0 == x` for every float, signed zeros included) and adds
    the real one here, after `Q_e`, so that the bias gradient is not rounded, as in
    tfhfp8's layers. Serialized as the original activation (as tfmot's own
    `QuantizeAwareActivation`), so saved models hold plain layers.
    """

    def __init__(self, activation, bias, errors, bias_shape=None):
        self.activation, self.bias, self.errors = activation, bias, errors
        self.bias_shape = bias_shape

    def __call__(self, outputs):
        outputs = self.errors(outputs, training=True, weights={})
        if self.bias is not None:
            bias = self.bias if self.bias_shape is None else tf.reshape(self.bias,
                                                                        self.bias_shape)
            # Keras 3's add, as tfhfp8's layers (it turns a bias-shaped add into
            # tf.nn.bias_add, whose gradient sums in its own order).
            outputs = keras.ops.add(outputs, bias)
        return self.activation(outputs)

    def get_config(self):
        return {"activation": tf_keras.activations.serialize(self.activation,
                                                             use_legacy_format=True)}

    @classmethod
    def from_config(cls, config):
        return tf_keras.activations.deserialize(config["activation"], use_legacy_format=True)


@_register
class NoOpQuantizeConfig(_keras.QuantizeConfig):
    """Layers other than GEMMs stay FP32, as under `tfhfp8.quantize_model`.

    Also the base of `QuantizeConfig`: tfhfp8 quantizes a GEMM's inputs and errors in
    layers of its own (`Scheme`'s `QuantizeLayer`, `ErrorsBiasActivation`), never
    through tfmot's activation or output quantizers."""

    def get_weights_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}


@_register
class QuantizeConfig(NoOpQuantizeConfig):
    """The tfmot `QuantizeConfig` of one GEMM layer (Dense, Conv1D/2D/3D) under a tfhfp8
    policy (a preset name, a `tfhfp8.Policy` or its config): its kernel through
    `Q_w(Q_g(.))`, and `Q_e` on the gradient of its GEMM output (see
    `ErrorsBiasActivation`). `Q_a` on the layer's inputs is a `QuantizeLayer` that
    `Scheme` inserts before the layer: use this config through `Scheme`.
    """

    def __init__(self, policy="hfp8"):
        self.policy = check_policy(policy)
        self._activations, self._weights, self._errors = _roles(self.policy)

    @staticmethod
    def _kernel_attribute(layer):
        name = type(layer).__name__
        if name not in GEMM_LAYERS:
            raise ValueError(f"tfhfp8.tfmot.QuantizeConfig: layer {layer.name!r} is a {name}; "
                             f"supported GEMM layers: {', '.join(GEMM_LAYERS)}")
        return GEMM_LAYERS[name]

    def get_weights_and_quantizers(self, layer):
        kernel = getattr(layer, self._kernel_attribute(layer))
        pairs = [(kernel, self._weights)]
        if getattr(layer, "use_bias", False):
            pairs.append((layer.bias, Quantizer()))  # FP32; added after Q_e
        return pairs

    def set_quantize_weights(self, layer, quantize_weights):
        setattr(layer, self._kernel_attribute(layer), quantize_weights[0])
        bias = quantize_weights[1] if len(quantize_weights) > 1 else None
        if bias is not None:
            layer.bias = tf.fill(tf.shape(bias), tf.constant(-0.0, bias.dtype))
        activation = layer.activation
        activation = getattr(activation, "original_activation", activation)
        hook = ErrorsBiasActivation(activation, bias, self._errors, _bias_shape(layer))
        hook.original_activation = activation
        layer.activation = hook

    def input_quantizer(self):
        """The quantizer of the layer's inputs (`Q_a`)."""
        return self._activations

    def master_weight_constraint(self, inner=None):
        """The constraint rounding the layer's weights after each step, or `inner`."""
        fmt = self.policy.master_weights
        if fmt is None:
            return inner
        return MasterWeightRounding(fmt, self.policy.rounding["master_weights"], inner)

    def get_config(self):
        return {"policy": _policy.serialize(self.policy)}

    def __eq__(self, other):
        return isinstance(other, QuantizeConfig) and self.policy == other.policy

    def __ne__(self, other):
        return not self == other


def _bias_shape(layer):
    """The shape the bias is broadcast from, as the Keras 3 layer adds it: the
    shape decides the order in which TensorFlow sums the bias gradient."""
    rank = getattr(layer, "rank", 1)
    channels_first = getattr(layer, "data_format", None) == "channels_first"
    if type(layer).__name__ in ("Conv2D", "Conv3D"):  # Keras 3's BaseConv.call
        return [1, -1] + [1] * rank if channels_first else [1] * (rank + 1) + [-1]
    # tfhfp8's Dense and Conv1D (EmulatedLayer._bias_and_activation)
    return [1, -1] + [1] * rank if channels_first else None


@_register
class MasterWeightRounding(tf_keras.constraints.Constraint):
    """Rounds a weight to `format` after each optimizer step (after any `inner`
    constraint): the policy's master weights."""

    def __init__(self, format, rounding="nearest_even", inner=None):
        self.format = _formats.get(format)
        self.rounding = rounding
        if isinstance(inner, dict):
            inner = tf_keras.constraints.deserialize(inner, use_legacy_format=True)
        self.inner = inner

    def __call__(self, w):
        if self.inner is not None:
            w = self.inner(w)
        return quantize(w, self.format, rounding=self.rounding, saturate=True)

    def get_config(self):
        return {"format": _formats.serialize(self.format), "rounding": self.rounding,
                "inner": None if self.inner is None else tf_keras.constraints.serialize(
                    self.inner, use_legacy_format=True)}
