"""The registry face of the number formats: every named format, scalar or block-scaled.

`get` accepts a name (`names()`, aliases included), an ml_dtypes dtype, a config or a
format; `serialize` returns what `get` takes back.
"""

from tfhfp8 import registry
from tfhfp8.formats import block, scalar


def _from_plain_config(config):
    # Configs saved before the registry carry no class name: only block formats have
    # "element" (the scalar registry tells the others apart).
    if "element" in config:
        return block.BlockScaled.from_config(config)
    return scalar.REGISTRY.from_plain_config(config)


REGISTRY = registry.Registry(
    "format", scalar.REGISTRY.classes + (block.BlockScaled,),
    {**scalar.NAMED, **{fmt.name: fmt for fmt in block.NAMED}}, scalar.ALIASES,
    from_plain_config=_from_plain_config,
    hint="; or build one with tfhfp8.FloatFormat(...), tfhfp8.DynamicFixedPoint(...) or "
         "tfhfp8.BlockScaled(...).")


def names():
    """All format names accepted by `get`, aliases included."""
    return sorted(REGISTRY.names()) + sorted(scalar.ALIASES)


def get(identifier):
    """Returns the format for a name, an ml_dtypes dtype, a config, or a format.

    Raises:
      ValueError: for an unknown name (the message lists the known names).
      TypeError: for anything else.
    """
    return REGISTRY.get(scalar.dtype_name(identifier))


def serialize(fmt):
    """The name of a named format, else its Keras config (None stays None)."""
    return REGISTRY.serialize(fmt)
