"""What per-GEMM loss scaling a policy asks for, as data (`LossScalingSpec`).

A `tfhfp8.Policy` holds a spec, not a rule: the spec names a rule class and its
arguments, and the layer that scales errors builds the rule from it
(`tfhfp8.loss_scaling.from_spec`). So a policy stays a value (compared, hashed, saved
and copied as data) and knows nothing of the rules' TensorFlow code.

>>> from tfhfp8.loss_scaling_spec import spec
>>> spec("adaptive")
LossScalingSpec(rule='tfhfp8>Adaptive', arguments=())
>>> spec({"class_name": "Adaptive", "config": {"every": 2}}).config
{'every': 2}
"""

import dataclasses

import keras

# The built-in rules by name (`tfhfp8.loss_scaling.names()`): their Keras registered names.
BUILT_IN_RULES = {"adaptive": "tfhfp8>Adaptive", "absmax": "tfhfp8>AbsMax"}


@dataclasses.dataclass(frozen=True)
class LossScalingSpec:
    """A loss-scaling rule as data.

    Attributes:
      rule: the Keras registered name of a `tfhfp8.loss_scaling.LossScaling` subclass
        (`"tfhfp8>Adaptive"`, `"tfhfp8>AbsMax"`, or a user's `"package>Class"`).
      arguments: the rule's constructor arguments as sorted `(name, value)` pairs;
        arguments not given keep the rule's defaults.
    """

    rule: str
    arguments: tuple = ()

    @property
    def config(self):
        """The arguments as a dict (the rule's `from_config` takes it)."""
        return dict(self.arguments)

    def get_config(self):
        """A built-in rule without arguments as its name, else a Keras object config."""
        names = {rule: name for name, rule in BUILT_IN_RULES.items()}
        if not self.arguments and self.rule in names:
            return names[self.rule]
        return {"class_name": self.rule.rpartition(">")[2], "config": self.config,
                "registered_name": self.rule}


def _of_class(cls, arguments):
    rule = keras.saving.get_registered_name(cls)
    if keras.saving.get_registered_object(rule) is not cls:
        raise ValueError(f"loss_scaling: the rule class {cls.__name__} is not registered: "
                         "decorate it with @keras.saving.register_keras_serializable()")
    return LossScalingSpec(rule, tuple(sorted(arguments.items())))


def _of_config(config):
    """A spec from a Keras object config, or from the `{"class_name", "config"}` of files
    saved before the registry (built-in rules only)."""
    rule = config.get("registered_name")
    if rule is None:
        rule = f"tfhfp8>{config.get('class_name')}"
        if rule not in BUILT_IN_RULES.values():
            raise ValueError(f"loss_scaling: unknown rule in the config {config!r}")
    arguments = config.get("config") or {}
    if not isinstance(arguments, dict):
        raise TypeError(f"loss_scaling: the config's arguments must be a dict, got {config!r}")
    return LossScalingSpec(rule, tuple(sorted(arguments.items())))


def spec(identifier):
    """A `LossScalingSpec` (or None: no scaling) from what `Policy(loss_scaling=...)` takes.

    `identifier`: None or `"none"`; a built-in rule's name (`"adaptive"`, `"absmax"`); a
    rule object (its class and `get_config()`); a config (`LossScalingSpec.get_config`,
    or Keras' `serialize_keras_object` of a rule); or a spec.
    """
    if identifier is None or identifier == "none":
        return None
    if isinstance(identifier, LossScalingSpec):
        return identifier
    if isinstance(identifier, str):
        if identifier not in BUILT_IN_RULES:
            raise ValueError(f"loss_scaling must be None, 'none' or a rule "
                             f"({', '.join(BUILT_IN_RULES)}), got {identifier!r}")
        return LossScalingSpec(BUILT_IN_RULES[identifier])
    if isinstance(identifier, dict) and "class_name" in identifier:
        return _of_config(identifier)
    if callable(getattr(identifier, "get_config", None)) and not isinstance(identifier, type):
        return _of_class(type(identifier), identifier.get_config())
    raise TypeError(f"loss_scaling must be None, a rule name ({', '.join(BUILT_IN_RULES)}), "
                    f"a tfhfp8.loss_scaling.LossScaling or its config; got {identifier!r}")
