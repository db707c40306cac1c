"""tfhfp8's formats inside tensorflow-model-optimization (tfmot) quantization-aware training.

tfmot 0.8 works with legacy tf-keras only: install the extra (`pip install
"tfhfp8[tfmot]"`, which brings `tensorflow-model-optimization` and the `tf-keras` release
of your TensorFlow) and set `TF_USE_LEGACY_KERAS=1` before TensorFlow is imported. That
switches `tf.keras` to tf-keras for the whole process, so run tfmot code in its own
process; `import tfhfp8` alone never imports tfmot nor touches `tf.keras`.

    import os; os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf, tensorflow_model_optimization as tfmot, tfhfp8.tfmot

    annotate = tfmot.quantization.keras.quantize_annotate_layer
    model = tf.keras.Sequential([
        tf.keras.Input((28, 28, 1)),
        annotate(tf.keras.layers.Conv2D(16, 3, activation="relu")),
        tf.keras.layers.MaxPooling2D(), tf.keras.layers.Flatten(),
        annotate(tf.keras.layers.Dense(64, activation="relu")),
        annotate(tf.keras.layers.Dense(10))])
    qat = tfmot.quantization.keras.quantize_apply(model, scheme=tfhfp8.tfmot.Scheme("hfp8"))

Each annotated GEMM layer (Dense, Conv1D/2D/3D) then computes what the Keras 3 layer
`tfhfp8.layers.<Layer>(policy=...)` computes, bit for bit, outputs and gradients:
`Q_a` on its inputs (a `QuantizeLayer` the scheme inserts before it), `Q_w(Q_g(W))` on
its kernel, `Q_e` (`tfhfp8.quantize_gradient`) on the gradient of the GEMM's output
(before the FP32 bias and the activation), and the policy's master-weight rounding after
each optimizer step (a kernel and bias constraint). As `tfhfp8.quantize_model`, a policy
with `exempt_first_last` keeps the first and last annotated GEMM layers in its
`exempt_format`; other layers stay FP32.

Not carried over: per-GEMM loss scaling (a policy with `loss_scaling` is a ValueError:
use tf-keras' `LossScaleOptimizer`), emulated accumulation (`accumulation=`, also a
ValueError), and the checkpointed stochastic-rounding seeds of
tfhfp8's layers (stochastic rounding here draws from TensorFlow's random state).
Save quantized models as `.h5` and load them inside `tfhfp8.tfmot.quantize_scope()`:
tfmot's models (its default scheme's too) do not reload from tf-keras' `.keras` format.
"""

import importlib.util
import os

_HOW = ('pip install "tfhfp8[tfmot]" (tensorflow-model-optimization and the tf-keras '
        'release of your TensorFlow), then set TF_USE_LEGACY_KERAS=1 before TensorFlow is '
        'imported, e.g. `TF_USE_LEGACY_KERAS=1 python train.py`, and run the tfmot code in '
        'its own process (the setting switches tf.keras for the whole process)')


def _require():
    """Checks that tf-keras and tfmot can be used here, or says what to do instead.
    Imports neither before all checks pass (tfmot would change this process's Keras)."""
    if os.environ.get("TF_USE_LEGACY_KERAS", "").lower() not in ("1", "true", "yes"):
        raise ImportError("tfhfp8.tfmot needs tensorflow-model-optimization, which works only "
                          "with legacy tf-keras: TF_USE_LEGACY_KERAS is not set. " + _HOW)
    for module in ("tf_keras", "tensorflow_model_optimization"):
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"tfhfp8.tfmot: {module} is not installed. " + _HOW)
    import tensorflow as tf
    if not tf.keras.__name__.startswith("tf_keras"):
        raise ImportError("tfhfp8.tfmot: tf.keras is Keras 3 in this process although "
                          "TF_USE_LEGACY_KERAS is set now: TensorFlow reads it when tf.keras "
                          "is first used. " + _HOW)


_require()

import keras  # noqa: E402  (Keras 3, as in tfhfp8's layers; tf.keras is tf_keras here)
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
import tensorflow_model_optimization as _tfmot  # noqa: E402

from tfhfp8 import _compat  # noqa: E402
from tfhfp8 import formats as _formats  # noqa: E402
from tfhfp8 import policy as _policy  # noqa: E402
from tfhfp8.quantization import _check_arguments, quantize, quantize_gradient  # noqa: E402

_keras = _tfmot.quantization.keras
_transforms = _keras.graph_transformations.transforms
_model_transformer = _keras.graph_transformations.model_transformer
_register = tf_keras.utils.register_keras_serializable(package="tfhfp8")

# The GEMM layers the bridge emulates: tf-keras class name -> attribute of the kernel.
# Their call() computes the GEMM, then `if use_bias: + bias`, then `activation`.
GEMM_LAYERS = {"Dense": "kernel", "Conv1D": "kernel", "Conv2D": "kernel", "Conv3D": "kernel"}


def _check_policy(policy):
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
        _check_arguments(rounding, saturate)
        _check_arguments(gradient_rounding, saturate)
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
        self.policy = _check_policy(policy)
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


class Registry(_keras.QuantizeRegistry):
    """Every layer has a config: GEMM layers `QuantizeConfig(policy)`, others none."""

    def __init__(self, policy="hfp8"):
        self.policy = _check_policy(policy)

    def supports(self, layer):
        return True

    def get_quantize_config(self, layer):
        if type(layer).__name__ in GEMM_LAYERS:
            return QuantizeConfig(self.policy)
        return NoOpQuantizeConfig()


class _QuantizeInputs(_transforms.Transform):
    """GEMM layer `L` with a tfhfp8 `QuantizeConfig` => `QuantizeLayer(Q_a)` -> `L`, `L`'s
    kernel and bias constrained to the policy's master-weight format."""

    def __init__(self, layer_quantize_map):
        self.layer_quantize_map = layer_quantize_map

    def pattern(self):
        return _transforms.LayerPattern("|".join(GEMM_LAYERS))

    def replacement(self, match_layer):
        config = match_layer.layer["config"]
        quantize_config = self.layer_quantize_map.get(config["name"], {}).get(
            "quantize_config")
        if not isinstance(quantize_config, QuantizeConfig):
            return match_layer  # another scheme's layer: left as it is
        for key in ("kernel_constraint", "bias_constraint"):
            inner = config.get(key)
            constraint = quantize_config.master_weight_constraint(inner)
            if constraint is not None and constraint is not inner:
                config[key] = tf_keras.constraints.serialize(constraint,
                                                            use_legacy_format=True)
        inputs = _quantize_layer_class()(quantize_config.input_quantizer(),
                                         name=f"{config['name']}_inputs")
        inputs_config = tf_keras.layers.serialize(inputs, use_legacy_format=True)
        inputs_config["name"] = inputs.name
        return _transforms.LayerNode(
            match_layer.layer, weights=match_layer.weights,
            input_layers=[_transforms.LayerNode(inputs_config)],
            metadata=match_layer.metadata, names_and_weights=match_layer.names_and_weights)

    def custom_objects(self):
        return {"QuantizeLayer": _quantize_layer_class(), "Quantizer": Quantizer,
                "MasterWeightRounding": MasterWeightRounding}


def _quantize_layer_class():
    return _compat.tfmot_quantize_layer()


class LayoutTransform(_keras.QuantizeLayoutTransform):
    """Gives annotated GEMM layers without a config the policy's `QuantizeConfig` (the
    first and last of them the exempt policy's, when the policy exempts them), and puts
    `Q_a` before each GEMM layer with a tfhfp8 config."""

    def __init__(self, policy="hfp8"):
        self.policy = _check_policy(policy)

    def apply(self, model, layer_quantize_map):
        layer_quantize_map = {name: dict(entry) for name, entry in layer_quantize_map.items()}
        gemms = [layer.name for layer in model.layers
                 if layer.name in layer_quantize_map
                 and type(layer).__name__ in GEMM_LAYERS
                 and layer_quantize_map[layer.name].get("quantize_config") is None]
        exempt = ({gemms[0], gemms[-1]} if gemms and self.policy.exempt_first_last
                  else set())
        for name in gemms:
            policy = self.policy.for_exempt_layer() if name in exempt else self.policy
            layer_quantize_map[name]["quantize_config"] = QuantizeConfig(policy)
        return _model_transformer.ModelTransformer(
            model, [_QuantizeInputs(layer_quantize_map)], set(layer_quantize_map),
            layer_quantize_map).transform()


class Scheme(_keras.QuantizeScheme):
    """A tfmot `QuantizeScheme` training in a tfhfp8 policy (preset name, `tfhfp8.Policy`
    or config), for `tfmot.quantization.keras.quantize_apply(model, scheme=...)`."""

    def __init__(self, policy="hfp8"):
        self.policy = _check_policy(policy)

    def get_layout_transformer(self):
        return LayoutTransform(self.policy)

    def get_quantize_registry(self):
        return Registry(self.policy)


def quantize_scope():
    """`tfmot.quantization.keras.quantize_scope` with the bridge's classes, for
    `tf.keras.models.load_model` of a saved quantized model."""
    return _keras.quantize_scope({
        "Quantizer": Quantizer, "QuantizeConfig": QuantizeConfig,
        "NoOpQuantizeConfig": NoOpQuantizeConfig, "MasterWeightRounding": MasterWeightRounding,
        "ErrorsBiasActivation": ErrorsBiasActivation, "QuantizeLayer": _quantize_layer_class()})


__all__ = ["Quantizer", "QuantizeConfig", "NoOpQuantizeConfig", "MasterWeightRounding",
           "ErrorsBiasActivation", "Registry", "LayoutTransform", "Scheme", "quantize_scope",
           "GEMM_LAYERS"]
