"""One idiom for every named family of tfhfp8: formats, loss scalings, policies,
models and data sets.

A `Registry` maps names to entries. Its `get` takes a name, an object of the family
or a config, and returns the object; `serialize` returns what `get` takes back: the
name of a named object, else the object's Keras config
(`keras.saving.serialize_keras_object`, whose `class_name` says which class to build).
The command line reads its choices from `names()`.

>>> from tfhfp8 import formats
>>> formats.REGISTRY.get("hfp8_fwd").name
'float8_e4m3b11fnuz'
>>> formats.REGISTRY.serialize(formats.FloatFormat(3, 4, bias=5))["class_name"]
'FloatFormat'
"""

import keras


class Registry:
    """Names of one family of objects, and its `get` / `serialize`.

    Args:
      family: what the objects are, for messages (`"format"`, `"policy"`, ...).
      classes: the class (or tuple of classes) of the family's objects; None when the
        entries are functions (model builders, data-set loaders).
      entries: name -> an object of the family, or a callable that builds one
        (called with `get`'s keyword arguments).
      aliases: other names -> a name of `entries`.
      from_plain_config: builds an object from a config dict without `class_name`
        (what files saved before this idiom hold).
      hint: appended to the message for an unknown name.
      plain_configs: `serialize` writes `obj.get_config()` without the class name (a
        family of one class, whose configs are read by `from_plain_config`).
    """

    def __init__(self, family, classes=None, entries=None, aliases=None,
                 from_plain_config=None, hint="", plain_configs=False):
        self.family, self.classes = family, classes
        self.entries = dict(entries or {})
        self.aliases = dict(aliases or {})
        self.from_plain_config = from_plain_config
        self.hint = hint
        self.plain_configs = plain_configs

    def names(self, aliases=False):
        """The registered names in registration order, then (if asked) the aliases."""
        return list(self.entries) + (list(self.aliases) if aliases else [])

    def register(self, name, entry):
        self.entries[name] = entry
        return entry

    def _key(self, name):
        key = self.aliases.get(name, name)
        if key not in self.entries:
            raise ValueError(f"Unknown {self.family} {name!r}. Known: "
                             f"{', '.join(self.names(aliases=True))}{self.hint}")
        return key

    def get(self, identifier, **kwargs):
        """The object named or described by `identifier` (or `identifier` itself)."""
        if self.classes is not None and isinstance(identifier, self.classes):
            return identifier
        if isinstance(identifier, str):
            entry = self.entries[self._key(identifier)]
            if self.classes is not None and isinstance(entry, self.classes):
                return entry
            return entry(**kwargs)
        if isinstance(identifier, dict) and self.classes is not None:
            try:
                if "class_name" in identifier and ("module" in identifier
                                                  or "registered_name" in identifier):
                    obj = keras.saving.deserialize_keras_object(identifier)
                elif self.from_plain_config is not None:  # also older files' shapes
                    obj = self.from_plain_config(identifier)
                else:
                    obj = None
            except (TypeError, ValueError) as error:
                raise TypeError(f"Cannot build a {self.family} from the config "
                                f"{identifier!r}: {error}") from None
            if isinstance(obj, self.classes):
                return obj
        raise TypeError(f"A {self.family} must be a name ({', '.join(self.names())}), "
                        f"a config or an object of the family; got {identifier!r}")

    def name_of(self, obj):
        """`obj.name` if that name is registered and `get` of it equals `obj`, else None."""
        name = getattr(obj, "name", None)
        if isinstance(name, str) and name in self.entries and self.get(name) == obj:
            return name
        return None

    def serialize(self, obj):
        """`obj`'s name if it is a named object, else its Keras config (None stays None)."""
        if obj is None:
            return None
        if self.name_of(obj) is not None:
            return obj.name
        if self.plain_configs:
            return obj.get_config()
        return keras.saving.serialize_keras_object(obj)
