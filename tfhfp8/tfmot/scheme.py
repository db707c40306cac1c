"""The tfmot `Scheme` of the bridge (`tfhfp8.tfmot`): its registry, and the layout
transform that gives annotated GEMM layers the policy's `QuantizeConfig` and puts `Q_a`
(a tfmot `QuantizeLayer`) before each of them.

Imported through `tfhfp8.tfmot`, which first checks that tf-keras and tfmot can be used.
"""

import tf_keras
import tensorflow_model_optimization as _tfmot

from tfhfp8 import _compat
from tfhfp8.tfmot.quantize_configs import (
    GEMM_LAYERS,
    ErrorsBiasActivation,
    MasterWeightRounding,
    NoOpQuantizeConfig,
    QuantizeConfig,
    Quantizer,
    check_policy,
)

_keras = _tfmot.quantization.keras
_transforms = _keras.graph_transformations.transforms
_model_transformer = _keras.graph_transformations.model_transformer

class Registry(_keras.QuantizeRegistry):
    """Every layer has a config: GEMM layers `QuantizeConfig(policy)`, others none."""

    def __init__(self, policy="hfp8"):
        self.policy = check_policy(policy)

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
        self.policy = check_policy(policy)

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
        self.policy = check_policy(policy)

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
