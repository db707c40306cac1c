"""Precision policies: which format each tensor role of a GEMM layer is rounded to.

For a GEMM-like layer with input `x`, kernel `W` and output gradient `dy`:

- forward: `y = op(Q_a(x), Q_w(W)) (+ bias in FP32)`, accumulated in FP32;
- backward: `dx = op_input_grad(Q_e(dy), Q_w(W))`,
  `dW = Q_g(op_kernel_grad(Q_a(x), Q_e(dy)))`.

The sums of the three GEMMs are FP32 unless `accumulation=` names how the hardware
adds them (`tfhfp8.Accumulator`; recipes below).

A `Policy` names the formats of `Q_w` (weights), `Q_a` (activations), `Q_e` (errors)
and `Q_g` (weight gradients), their roundings, and optionally the format the stored
(master) weights are rounded to after every optimizer step and the format of the
optimizer's state (`tfhfp8.optimizers.LowPrecisionOptimizer`).

>>> import tfhfp8
>>> policy = tfhfp8.Policy("hfp8")
>>> policy.weights.name, policy.errors.name
('float8_e4m3b11fnuz', 'float8_e5m2')
>>> custom = tfhfp8.Policy(weights="float8_e4m3b11fnuz",
...                        activations="float8_e4m3b11fnuz", errors="float8_e5m2")
"""

import functools

import keras

from tfhfp8 import _compat, accumulation as accumulation_lib, formats, registry
from tfhfp8 import loss_scaling_spec
from tfhfp8.accumulation import GEMM_KINDS  # noqa: F401 (a name of this module before)
from tfhfp8.formats import roundings
from tfhfp8.policy_presets import PRESETS

ROLES = ("weights", "activations", "errors", "weight_gradients", "master_weights",
         "optimizer_states")
# The roles a layer rounds; the optimizer states are the optimizer's
# (`tfhfp8.optimizers.LowPrecisionOptimizer`).
LAYER_ROLES = ROLES[:5]
# Master weights may also use Kahan-compensated summation (Zamirai et al., "Revisiting
# BFloat16 Training"): a compensation buffer per weight, which
# `tfhfp8.optimizers.LowPrecisionOptimizer` keeps.


_PRESET = object()  # an argument left to the preset


def presets():
    """Names of the built-in policies."""
    return list(PRESETS)


def _format_or_none(role, value):
    if value is None or value == "float32":
        return None
    try:
        return formats.get(value)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{role}: {error}") from None


@keras.saving.register_keras_serializable(package="tfhfp8")
class Policy(keras.DTypePolicy):
    """A named set of per-role number formats, roundings and exemptions.

    Args:
      name: a preset (`"float32"`, `"bfloat16"`, `"fp8"`, `"hfp8"`, `"int16_dfp"`,
        `"fp8_delayed"`, `"mxfp8"`, `"mxfp6"`, `"mxfp4"`, `"nvfp4"`) whose choices the other arguments override, or any name for a policy built
        from keywords (default `"custom"`). Another name without any role keyword is a
        ValueError (a misspelt preset would otherwise emulate nothing).
      weights, activations, errors, weight_gradients: formats of `Q_w`, `Q_a`, `Q_e`,
        `Q_g` (a name, `FloatFormat`, `DynamicFixedPoint` or `BlockScaled`). None keeps
        the preset's choice (FP32 for a policy built from keywords); `"float32"` forces
        FP32. Block-scaled formats (`"mxfp8_e4m3"`, `"nvfp4"`, ...) block each GEMM
        operand along that GEMM's own reduction axis, in the forward and both
        backward GEMMs, in Dense, EinsumDense, the convolutions (Conv1D/2D/3D,
        DepthwiseConv2D, SeparableConv2D, Conv2DTranspose) and attention
        (`tfhfp8.gemm.axes`); Embedding blocks along its last axis.
        Per-tensor FP32 scales (`"e4m3_delayed"`, ...) follow Transformer Engine /
        Keras float8, delayed scaling keeping its amax history in the layer.
      master_weights: if set, the stored weights of emulated layers are rounded to
        this format after every optimizer step: `W <- Q_m(W + dW)`.
      optimizer_states: if set, every slot of the optimizer (momentum, Adam's moments,
        ...) is rounded to this format after every step, by
        `tfhfp8.optimizers.LowPrecisionOptimizer(optimizer, policy)` (which also applies
        `master_weights` to every trainable weight).
      rounding: one rounding for every role, or a dict role -> rounding (missing
        roles: `"nearest_even"`). Roundings: the names of `tfhfp8.formats.roundings`
        (`"nearest_even"`, `"stochastic"`, `"toward_zero"`, the directed ones,
        `"stochastic_r8"`, ...); `master_weights` may also be `"kahan"`
        (Kahan-compensated update with a buffer per weight, Zamirai et al.; needs
        `tfhfp8.optimizers.LowPrecisionOptimizer`).
      saturate: clamp overflow to the format's max (True or `"sat_finite"`, the
        default for training), follow the format's own overflow semantics (False or
        `"ovf_inf"`), or clamp finite overflow and keep infinities (`"sat_propagate"`).
      exempt_first_last: `quantize_model` keeps the first and last GEMM layers of a
        model in `exempt_format` instead of this policy's formats.
      exempt_format: the format of exempt layers (None: FP32); by default the
        preset's (`"bfloat16"` for `nvfp4`), else `"float16"`.
      loss_scaling: per-GEMM error scaling: `"adaptive"`, `"absmax"`, a
        `tfhfp8.loss_scaling.LossScaling` (see that module) or its config; `"none"` or
        None for no scaling. The policy keeps it as data, a
        `tfhfp8.loss_scaling_spec.LossScalingSpec` (`policy.loss_scaling`: the rule's
        registered name and arguments); each layer builds the rule from it.
      quantize_attention: False keeps the two products inside attention (`QK^T`,
        `scores x V`) in FP32 (NVFP4's recipe); their projections follow the policy.
      exempt_of: set on the policy of a layer that another policy exempts (the first
        and last GEMM layers under `fp8` and `hfp8`): that policy's name. Data, so that
        `quantize_model`, `summary` and saved files all read the same thing.
      accumulation: how the GEMMs sum their products: one `tfhfp8.Accumulator` (or
        name: `"float32"`, `"float16"`, `"bfloat16"`, `"float16_chunk64"`, `"int32"`)
        for the forward GEMM and both gradient GEMMs, or a dict `{"forward",
        "input_gradient", "weight_gradient"}` (missing kinds: FP32). None: FP32 sums,
        as every preset. A float accumulator needs the GEMM's operands in formats
        whose products are exact in float32 (FloatFormat with <= 11 mantissa bits,
        DynamicFixedPoint with <= 13 bits); `"int32"` needs per-tensor
        DynamicFixedPoint operands; else a ValueError names the role. Exempt layers
        keep float accumulators and sum in FP32 instead of `"int32"` (their operands
        are not fixed point). Layers with accumulation: Dense, EinsumDense, Conv1D,
        Conv2D, Conv3D (grouped too), DepthwiseConv2D, SeparableConv2D,
        Conv2DTranspose, MultiHeadAttention (projections and both attention
        products); Embedding sums nothing. With block-scaled roles (element times a
        power-of-two or small float block scale, no FP32 scale: MXFP8/6/4, MXINT8),
        in Dense, EinsumDense and MultiHeadAttention, each GEMM blocks along its own
        reduction and then sums with its accumulator; blocked convolutions raise
        NotImplementedError (their kernel window is summed in FP32).

    Recipes (`tfhfp8.Policy(preset, accumulation=...)`):

    - Wang et al. 2018: `Policy("fp8", accumulation="float16_chunk64")` (FP8 operands,
      FP16 sums in chunks of 64); `accumulation="float16"` shows why chunks are needed.
    - Das et al. 2018: `Policy("int16_dfp", accumulation="int32")` (INT16 mantissas
      into a 32-bit accumulator; `Accumulator("int32", chunk_size=n)` adds the partial
      sums into FP32 every n products).
    - HFP8 with FP16 sums: `Policy("hfp8", accumulation="float16")`.

    The policy is a `keras.DTypePolicy` with compute dtype float32, so
    `keras.config.set_dtype_policy(policy)` accepts it; `tfhfp8.layers` built without
    `policy=` use it.
    """

    def __init__(self, name="custom", *, weights=None, activations=None, errors=None,
                 weight_gradients=None, master_weights=None, optimizer_states=None,
                 rounding=None, saturate=True, exempt_first_last=None, exempt_format=_PRESET,
                 loss_scaling=None, exempt_of=None, accumulation=None,
                 quantize_attention=None):
        if isinstance(name, Policy):
            name = name.name
        if not isinstance(name, str):
            raise TypeError(f"name must be a string, got {name!r}")
        given = dict(weights=weights, activations=activations, errors=errors,
                     weight_gradients=weight_gradients, master_weights=master_weights,
                     optimizer_states=optimizer_states)
        if name not in PRESETS and name != "custom" and all(
                value is None for value in given.values()):
            # Most likely a typo of a preset, which would silently emulate nothing.
            raise ValueError(
                f"Unknown policy {name!r}: not a preset ({', '.join(PRESETS)}), and no "
                f"format is given for any role ({', '.join(ROLES)}). Use a preset, or "
                "name the formats, e.g. tfhfp8.Policy(name, weights=..., activations=..., "
                "errors=...)")
        settings = dict(PRESETS.get(name, {}))
        settings.update({role: value for role, value in given.items() if value is not None})
        if name in PRESETS and rounding is None:
            rounding = settings.get("rounding")
        if exempt_format is _PRESET:
            exempt_format = settings.get("exempt_format", "float16")
        if quantize_attention is None:
            quantize_attention = settings.get("quantize_attention", True)
        if not isinstance(quantize_attention, bool):
            raise ValueError(f"quantize_attention must be True or False, got "
                             f"{quantize_attention!r}")
        self.quantize_attention = quantize_attention
        if exempt_first_last is None:
            exempt_first_last = settings.get("exempt_first_last", False)
        if not isinstance(exempt_first_last, bool):
            raise ValueError(f"exempt_first_last must be True, False or None, got "
                             f"{exempt_first_last!r}")

        # Keras' DTypePolicy: float32 compute and variables; the name is ours.
        super().__init__("float32")
        _compat.name_dtype_policy(self, name)

        self.formats = {role: _format_or_none(role, settings.get(role)) for role in ROLES}
        self.rounding = self._parse_rounding(rounding)
        self.saturate = roundings.overflow(saturate)
        self.exempt_first_last = bool(exempt_first_last)
        self.exempt_format = _format_or_none("exempt_format", exempt_format)
        if loss_scaling is None:
            loss_scaling = settings.get("loss_scaling")
        self.loss_scaling = loss_scaling_spec.spec(loss_scaling)
        if exempt_of is not None and not isinstance(exempt_of, str):
            raise TypeError(f"exempt_of must be None or a policy name, got {exempt_of!r}")
        self.exempt_of = exempt_of
        if accumulation is None:
            accumulation = settings.get("accumulation")
        self.accumulation = accumulation_lib.per_gemm(accumulation, self.formats)

    @property
    def accumulates(self):
        """True if any GEMM of this policy emulates its sums (not FP32)."""
        return any(acc.emulates for acc in self.accumulation.values())

    @staticmethod
    def _parse_rounding(rounding):
        if rounding is None:
            rounding = {}
        if isinstance(rounding, str):
            if rounding == "kahan":
                raise ValueError("rounding='kahan' applies to master_weights only: use "
                                 "rounding={'master_weights': 'kahan'}")
            rounding = {role: rounding for role in ROLES}
        if not isinstance(rounding, dict):
            raise TypeError(f"rounding must be a string or a dict, got {rounding!r}")
        unknown = set(rounding) - set(ROLES)
        if unknown:
            raise ValueError(f"rounding: unknown roles {sorted(unknown)}; roles are {ROLES}")
        for role, value in rounding.items():
            if role == "master_weights" and value == "kahan":
                continue
            try:
                roundings.parse(value)
            except ValueError as error:
                extra = " (or 'kahan')" if role == "master_weights" else ""
                raise ValueError(f"rounding[{role!r}]{extra}: {error}") from None
        return {role: rounding.get(role, "nearest_even") for role in ROLES}

    # -- roles ------------------------------------------------------------------
    weights = property(lambda self: self.formats["weights"])
    activations = property(lambda self: self.formats["activations"])
    errors = property(lambda self: self.formats["errors"])
    weight_gradients = property(lambda self: self.formats["weight_gradients"])
    master_weights = property(lambda self: self.formats["master_weights"])
    optimizer_states = property(lambda self: self.formats["optimizer_states"])

    @property
    def emulates(self):
        """True if any role is quantized."""
        return any(fmt is not None for fmt in self.formats.values())

    def for_exempt_layer(self):
        """The policy of a layer this policy exempts (first/last GEMM layer)."""
        fmt = self.exempt_format
        errors = fmt if self.errors is not None else None  # inference policies: none
        # INT32 sums need fixed-point operands: an exempt layer's sums are then FP32.
        accumulation = {kind: acc for kind, acc in self.accumulation.items()
                        if acc.kind == "float" and (errors is not None or kind == "forward")}
        return Policy._named(f"{self.name}/exempt", weights=fmt, activations=fmt,
                             errors=errors, rounding=self.rounding, saturate=self.saturate,
                             exempt_format=None, loss_scaling=self.loss_scaling,
                             exempt_of=self.name,
                             accumulation=accumulation if fmt is not None else None,
                             quantize_attention=self.quantize_attention)

    def inference(self):
        """This policy with only the forward roles (weights and activations)."""
        return Policy._named(f"{self.name}/inference", weights=self.weights,
                             activations=self.activations, rounding=self.rounding,
                             saturate=self.saturate,
                             exempt_first_last=self.exempt_first_last,
                             exempt_format=self.exempt_format,
                             accumulation={"forward": self.accumulation["forward"]},
                             quantize_attention=self.quantize_attention)

    @classmethod
    def _named(cls, name, **kwargs):
        """A policy built from `kwargs` alone (no preset), named `name` (any name)."""
        policy = cls("custom", **kwargs)
        _compat.name_dtype_policy(policy, name)
        return policy

    # -- serialization ----------------------------------------------------------
    def get_config(self):
        return {
            "name": self.name,
            **{role: formats.serialize(fmt) for role, fmt in self.formats.items()},
            "rounding": dict(self.rounding),
            "saturate": self.saturate,
            "exempt_first_last": self.exempt_first_last,
            "exempt_format": formats.serialize(self.exempt_format),
            "loss_scaling": (None if self.loss_scaling is None
                             else self.loss_scaling.get_config()),
            **({"exempt_of": self.exempt_of} if self.exempt_of is not None else {}),
            # Only when emulated: configs of FP32-summing policies stay as they were.
            **({"accumulation": accumulation_lib.serialize_per_gemm(self.accumulation)}
               if self.accumulates else {}),
            **({} if self.quantize_attention else {"quantize_attention": False}),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        name = config.pop("name", "custom")
        if name.endswith("/exempt") and "exempt_of" not in config:
            # Files saved before exemptions were data said so only in the name.
            config["exempt_of"] = name[:-len("/exempt")]
        if name in PRESETS:  # keys missing from a preset's config keep the preset's
            preset = cls(name).get_config()
            preset.pop("name")
            config = {**preset, **config}
        # Roles explicitly None in a config are FP32, not "take the preset's".
        accumulation = config.pop("accumulation", None)
        policy = cls._named(name, **{k: v for k, v in config.items() if k not in ROLES})
        policy.formats = {role: _format_or_none(role, config.get(role)) for role in ROLES}
        policy.accumulation = accumulation_lib.per_gemm(accumulation, policy.formats)  # checked on them
        return policy

    def __eq__(self, other):
        return isinstance(other, Policy) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(self.name)

    def __repr__(self):
        roles = ", ".join(
            f"{role}={fmt.name or fmt!r}" + (f"/{self.rounding[role]}"
                                             if self.rounding[role] != "nearest_even" else "")
            for role, fmt in self.formats.items() if fmt is not None)
        sums = f", accumulation={describe_accumulation(self)}" if self.accumulates else ""
        return f"<tfhfp8.Policy {self.name!r}: {roles or 'float32'}{sums}>"


def describe_accumulation(policy):
    """One accumulator's name for all GEMMs, else `forward/input_gradient/weight_gradient`."""
    values = [str(acc) for acc in policy.accumulation.values()]
    return values[0] if len(set(values)) == 1 else "/".join(values)


REGISTRY = registry.Registry(
    "policy", Policy, {name: functools.partial(Policy, name) for name in PRESETS},
    from_plain_config=Policy.from_config, plain_configs=True,
    hint="; or build one with tfhfp8.Policy(weights=..., activations=..., errors=...).")


def get(identifier):
    """A Policy from a preset name, a config dict or a Policy (None: the global one)."""
    return global_policy() if identifier is None else REGISTRY.get(identifier)


def serialize(policy):
    """A preset's name when the policy is an unmodified preset, else its config."""
    return REGISTRY.serialize(policy)


def set_global_policy(policy):
    """Sets the policy of `tfhfp8.layers` built without `policy=` (and Keras' own).

    Accepts a preset name, a config dict or a Policy. Equivalent to
    `keras.config.set_dtype_policy(tfhfp8.Policy(...))`.
    """
    keras.config.set_dtype_policy(get(policy))


def global_policy():
    """The global tfhfp8 policy: Keras' dtype policy if it is one, else float32."""
    policy = keras.config.dtype_policy()
    return policy if isinstance(policy, Policy) else Policy("float32")
