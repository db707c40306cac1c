"""Converting Keras models to emulated precision, and reporting what runs in what."""

import keras
import numpy as np

from tfhfp8 import _compat
from tfhfp8 import policy as policy_lib
from tfhfp8.layers import EMULATED, EmulatedLayer, walk

# The Keras class each emulated class stands for.
_KERAS_CLASS = {emulated: keras_class for keras_class, emulated in EMULATED.items()}

# Keras layers that compute no GEMM and stay FP32 by design: `summary` says so, and
# `tfhfp8.pretrained` checks a downloaded model's other layers against them.
NON_GEMM_LAYERS = (
    keras.layers.BatchNormalization, keras.layers.LayerNormalization,
    keras.layers.GroupNormalization, keras.layers.UnitNormalization,
    keras.layers.Activation, keras.layers.ReLU, keras.layers.Softmax,
    keras.layers.LeakyReLU, keras.layers.PReLU, keras.layers.ELU,
)


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model, got {type(model).__name__}")
    if not _compat.is_graph_model(model):
        raise TypeError(
            f"quantize_model converts Sequential and Functional models; "
            f"{type(model).__name__} is a subclassed model, whose layers it cannot see. "
            "Build it from tfhfp8.layers (each takes policy=...), or call "
            "tfhfp8.set_global_policy(...) and use tfhfp8.layers inside it.")
    if not model.built:
        raise ValueError("the model is not built: call it on data or give it an Input first")


def quantize_model(model, policy="hfp8", exempt=None, verbose=False):
    """Returns a copy of `model` whose GEMM layers run in the formats of `policy`.

    Supported layers (`tfhfp8.layers.EMULATED`) become their emulated drop-ins with the
    same configuration and weights; every other layer is copied unchanged. Nested
    models and shared layers are converted too. The input model is not modified.
    An already emulated model converts the same way: its emulated layers get `policy`
    (exempt ones become plain Keras layers again); their loss-scaling state is not
    copied, the converted layers start the state their new policy asks for.

    Args:
      model: a built Sequential or Functional Keras model.
      policy: a `tfhfp8.Policy` or preset name.
      exempt: names of layers to keep in FP32 (a list, or one name). None applies the
        policy's own choice
        (for `fp8` and `hfp8`, the first and last GEMM layers in 16 bits).
      verbose: print `tfhfp8.summary` of the result.

    >>> import keras, tfhfp8
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> emulated = tfhfp8.quantize_model(model, "bfloat16")
    >>> type(emulated.layers[0]).__module__
    'tfhfp8.layers.dense'
    """
    _check_model(model)
    policy = policy_lib.get(policy)
    gemm_names = [layer.name for layer in walk(model)
                  if type(layer) in EMULATED or type(layer) in _KERAS_CLASS]
    if exempt is None:
        fp32 = set()
        first_last = {gemm_names[0], gemm_names[-1]} if (
            policy.exempt_first_last and gemm_names) else set()
    else:
        if isinstance(exempt, str):
            exempt = [exempt]  # one layer name
        if not isinstance(exempt, (list, tuple, set, frozenset)) or not all(
                isinstance(name, str) for name in exempt):
            raise TypeError(f"exempt must be None or a list of layer names, got {exempt!r}")
        fp32, first_last = set(exempt), set()
        unknown = fp32 - {layer.name for layer in walk(model)}
        if unknown:
            raise ValueError(f"exempt: no layers named {sorted(unknown)} in the model")

    def clone(layer):
        config = layer.get_config()
        # An emulated layer is converted like the Keras layer it emulates: it gets the
        # new policy (and, at build, the loss-scaling state that policy asks for).
        keras_class = _KERAS_CLASS.get(type(layer), type(layer))
        emulated = EMULATED.get(keras_class)
        if emulated is None or layer.name in fp32:
            config.pop("policy", None)
            return keras_class.from_config(config)
        config["policy"] = policy.for_exempt_layer() if layer.name in first_last else policy
        try:
            return emulated.from_config(config)
        except TypeError as error:
            # Keras' from_config reports any error of the constructor as a TypeError
            # about deserialization; the layer's own (e.g. a NotImplementedError for a
            # policy it cannot run) is the one that says what is wrong.
            if isinstance(error.__context__, (NotImplementedError, ValueError)):
                raise error.__context__ from None
            raise

    converted = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy_weights(model, converted)
    if verbose:
        summary(converted)
    return converted


def model_weights(model):
    """The model's weights without the loss-scaling state of its emulated layers (which
    belongs to a policy, not to the model: a converted model starts its own)."""
    state = {id(v) for layer in walk(model, sublayers=True)
             if isinstance(layer, EmulatedLayer) for v in layer.emulation_variables()}
    return [v for v in model.weights if id(v) not in state]


def copy_weights(source, target):
    """Assigns the weights of `source` to the same-shaped `target` (loss-scaling state
    excluded), in order."""
    sources, targets = model_weights(source), model_weights(target)
    if len(targets) != len(sources):
        raise RuntimeError(f"cannot copy weights: {len(sources)} variables in the "
                           f"source model, {len(targets)} in the converted one")
    for src, dst in zip(sources, targets):
        if tuple(src.shape) != tuple(dst.shape):
            raise RuntimeError(f"cannot copy {src.path} {src.shape} to {dst.path} {dst.shape}")
        dst.assign(src)


def _describe(layer):
    """(formats, note) of one layer."""
    if isinstance(layer, EmulatedLayer):
        policy = layer.policy
        roles = [("W", "weights"), ("A", "activations"), ("E", "errors"),
                 ("G", "weight_gradients"), ("M", "master_weights")]
        parts = []
        for short, role in roles:
            fmt = policy.formats[role]
            if fmt is not None:
                rounding = {"nearest_even": "", "stochastic": "/sr", "toward_zero": "/rz"}.get(
                    policy.rounding[role], "/" + policy.rounding[role])
                parts.append(f"{short}:{fmt.name or repr(fmt)}{rounding}")
        if policy.accumulates:  # how the sums run (forward/dx/dW when they differ)
            parts.append(f"sum:{policy_lib.describe_accumulation(policy)}")
        note = "emulated" if policy.emulates or policy.accumulates else "float32 policy"
        if policy.exempt_of is not None:
            fmt = policy.weights
            note = "first/last GEMM layer: " + (
                "FP32" if fmt is None else "16 bits" if getattr(fmt, "bits", None) == 16
                else fmt.name or repr(fmt))
        return " ".join(parts) or "float32", note
    if type(layer) in EMULATED:
        return "float32", "exempt (kept in FP32)"
    if isinstance(layer, NON_GEMM_LAYERS) or not layer.weights:
        return "float32", "not a GEMM layer"
    return "float32", f"unsupported layer type {type(layer).__name__}: left in FP32"


def _error_state_text(layer):
    """Latest error scale and statistics of an emulated layer, e.g. 'scale=2^17'."""
    parts = []
    for gemm, state in getattr(layer, "error_state", {}).items():
        values = []
        if "scale" in state:
            values.append(f"scale=2^{int(np.log2(float(state['scale'].numpy())))}")
        for stat in ("underflow", "saturation"):
            if stat in state:
                values.append(f"{stat}={float(state[stat].numpy()):.2g}")
        if values:
            prefix = "" if len(layer.GEMMS) == 1 else f"{gemm}: "
            parts.append(prefix + " ".join(values))
    return "; ".join(parts)


def summary(model, print_fn=print):
    """Prints each layer with the formats it runs in, and why others stay FP32.

    For emulated layers with loss scaling or statistics switched on
    (`tfhfp8.callbacks.QuantizationStats`), the latest error scale and the fractions
    of errors that underflowed or saturated are shown too. Returns the rows as a
    list of dicts (`layer`, `type`, `policy`, `formats`, `note`, `errors`).
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"summary expects a keras.Model, got {type(model).__name__}")
    if not callable(print_fn):
        raise TypeError(f"print_fn must be callable, got {print_fn!r}")
    rows = []
    for layer in walk(model):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        formats_, note = _describe(layer)
        policy = layer.policy.name if isinstance(layer, EmulatedLayer) else "-"
        rows.append(dict(layer=layer.name, type=type(layer).__name__, policy=policy,
                         formats=formats_, note=note, errors=_error_state_text(layer)))
    headers = ("layer", "type", "policy", "formats", "note")
    if any(row["errors"] for row in rows):
        headers += ("errors",)
    widths = [max(len(h), *(len(r[h]) for r in rows)) if rows else len(h) for h in headers]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print_fn(line)
    print_fn("-" * len(line))
    for row in rows:
        print_fn("  ".join(row[h].ljust(w) for h, w in zip(headers, widths)))
    return rows
