"""Accumulators: the arithmetic of one dot product on low-precision hardware.

Every emulated GEMM rounds its operands; an `Accumulator` says how the products are
summed. `"float32"` is plain `tf.linalg.matmul` (FP32 sums, tfhfp8's default); the
others are exact emulations of a narrower running sum, computed by
`tfhfp8.matmul` (see `tfhfp8.ops.tf_accumulate` and the C++ kernels).

Named accumulators: `"float32"`, `"float16"`, `"bfloat16"`, `"float16_chunk64"`
(Wang et al. 2018), `"int32"` (Das et al. 2018), and the matrix units of
`tfhfp8.fused_accumulation.HARDWARE` (`"nvidia_hopper_fp8"`, ...), which sum as
`FusedAccumulator`s.

>>> import tfhfp8
>>> tfhfp8.accumulation.get("float16_chunk64").chunk_size
64
"""

import dataclasses
from typing import Optional, Union

import keras
import numpy as np

from tfhfp8 import formats, registry
from tfhfp8.fused_accumulation import HARDWARE, FusedAccumulator
from tfhfp8.formats.roundings import BASIC_ROUNDINGS

OVERFLOWS = ("wrap", "saturate")

# Largest accumulator precision for which rounding the float32 round-to-odd sum equals
# rounding the exact sum once (Boldo & Melquiond 2008: p <= 24 - 2 bits).
MAX_ACCUMULATOR_MANTISSA_BITS = 21
# Products of operands with at most 12 significand bits each are exact in float32.
MAX_OPERAND_MANTISSA_BITS = 11
MAX_OPERAND_DFP_BITS = 13


def _float_format(parameter, value):
    try:
        fmt = formats.get(value)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{parameter}: {error}") from None
    if not isinstance(fmt, formats.FloatFormat):
        raise ValueError(f"{parameter} must be a FloatFormat (or its name), got {fmt!r}")
    if fmt.specials in formats.scalar.P3109_SPECIALS:
        raise ValueError(f"{parameter}: the accumulators take the IEEE, fn, fnuz and finite "
                         f"formats, not P3109's ({fmt!r})")
    if fmt.mantissa_bits > MAX_ACCUMULATOR_MANTISSA_BITS:
        raise ValueError(
            f"{parameter} must have at most {MAX_ACCUMULATOR_MANTISSA_BITS} mantissa bits "
            f"(22 significand bits, so that one rounding from a float32 round-to-odd sum "
            f"is exact); got {fmt!r}. For FP32 sums use the accumulator 'float32'")
    return fmt


_MAX_CHUNK = 2**31 - 1


def _check_chunk(chunk_size):
    if chunk_size is None:
        return None
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size,
                                                                  (int, np.integer)):
        raise ValueError(f"chunk_size must be None or a positive integer, got {chunk_size!r}")
    if not 1 <= chunk_size <= _MAX_CHUNK:
        raise ValueError(f"chunk_size must be None or an integer from 1 to 2^31 - 1 (the "
                         f"kernels' int32 attribute; None sums K in one chunk), got "
                         f"{chunk_size}")
    return int(chunk_size)


@keras.saving.register_keras_serializable(package="tfhfp8")
@dataclasses.dataclass(frozen=True)
class Accumulator:
    """How the products of one dot product `sum_k a_k * b_k` are added up.

    **Float accumulators**, `Accumulator(format, chunk_size=None, rounding="nearest_even",
    outer_format=None, products=None, saturate=False)`, compute exactly:

    - each product `p_k = a_k * b_k` is exact (a fused multiply-add; the operands must be
      rounded to formats whose products are exact in float32: a `FloatFormat` with at
      most 11 mantissa bits or a `DynamicFixedPoint` with at most 13 bits), or, when
      `products` is given, `p_k = quantize(a_k * b_k, products, rounding)`;
    - `k` runs in ascending order; within a chunk of `chunk_size` consecutive terms (the
      last chunk may be shorter; `chunk_size=None`: a single chunk) the running sum
      starts at +0 and after every addition is rounded to `format` once, from the
      exact sum: `acc <- Q(RO32(acc + p_k))`, where `RO32` rounds the exact sum to
      float32 with round-to-odd (an error-free TwoSum, then the odd neighbour) and `Q`
      is `tfhfp8.quantize` to `format` with `rounding` and `saturate`. For
      `"nearest_even"` and `"toward_zero"` this is the exact sum rounded once (the
      round-to-odd theorem, Boldo & Melquiond 2008, since `format` has at most 22
      significand bits); for `"stochastic"` it is quantize's stochastic rounding of
      `RO32(exact sum)`;
    - the chunk results are added in chunk order into an outer sum (starting at +0) by
      the same rule, rounded to `outer_format` (default: `format`); with a single chunk
      the result is the chunk's sum itself;
    - overflow follows the format's own semantics (inf or NaN), or clamps to +-max with
      `saturate=True`, as in `quantize`.

    Stochastic rounding hashes the seed with the position: for output element `o`
    (flat over `[batch, M, N]`) with `K` terms, the addition of term `k` uses index
    `o*K + k` with `seed`, the outer addition of chunk `c` uses index
    `o*num_chunks + c` with `seed + 1`, a product rounding index `o*K + k` with
    `seed + 2`.

    **INT32**, `Accumulator("int32", chunk_size=None, overflow="wrap")`, for
    dynamic-fixed-point operands: their integer mantissas (relative to each operand's
    shared exponent) are multiplied exactly and summed in a 32-bit two's-complement
    register; an addition whose exact result leaves `[-2^31, 2^31 - 1]` counts as an
    overflow and wraps modulo 2^32 (`overflow="wrap"`) or clamps (`"saturate"`). The
    final integer is converted to float32 (nearest even). With `chunk_size=n`, every
    `n` products (and at the end) the integer partial sum is converted to float32 and
    added to a float32 total, the partial restarting at 0 (Das et al.'s remedy). The
    result is scaled by `2^(e_a + e_b)`, the operands' shared exponents.

    **`"float32"`**: the sum in FP32 as `tf.linalg.matmul` computes it (no emulation).

    Args:
      format: a `FloatFormat` or format name with at most 21 mantissa bits, or
        `"int32"`, or `"float32"`.
      chunk_size: None (one chunk) or a positive integer.
      rounding: `"nearest_even"`, `"stochastic"` or `"toward_zero"` (float only).
      outer_format: the format of the sum of chunks (float only; default `format`).
      products: None (exact products) or the format products are rounded to.
      saturate: clamp overflow to +-max (float only).
      overflow: `"wrap"` or `"saturate"` (int32 only).
      name: display name.

    Example:

    >>> import numpy as np, tensorflow as tf, tfhfp8
    >>> acc = tfhfp8.Accumulator("float16", chunk_size=64)
    >>> a = tf.fill([1, 4096], 1.0)
    >>> b = tf.fill([4096, 1], 1.0)
    >>> float(tfhfp8.matmul(a, b, "float16", a_format="float8_e4m3",
    ...                     b_format="float8_e4m3")[0, 0])  # 2048 + 1 rounds back to 2048
    2048.0
    >>> float(tfhfp8.matmul(a, b, acc, a_format="float8_e4m3",
    ...                     b_format="float8_e4m3")[0, 0])  # 64 chunks of 64: exact
    4096.0
    """

    format: Union[str, formats.FloatFormat] = "float32"
    chunk_size: Optional[int] = None
    rounding: str = "nearest_even"
    outer_format: Optional[formats.FloatFormat] = None
    products: Optional[formats.FloatFormat] = None
    saturate: bool = False
    overflow: Optional[str] = None
    name: Optional[str] = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        kind = self.format if isinstance(self.format, str) else None
        set_ = lambda key, value: object.__setattr__(self, key, value)
        set_("chunk_size", _check_chunk(self.chunk_size))
        if kind in ("float32", "int32"):
            float_only = dict(rounding=self.rounding != "nearest_even",
                              outer_format=self.outer_format is not None,
                              products=self.products is not None,
                              saturate=self.saturate is not False)
            wrong = [key for key, given in float_only.items() if given]
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: not an argument of the {kind!r} "
                                 f"accumulator (only of float accumulators)")
        if kind == "float32":
            if self.chunk_size is not None or self.overflow is not None:
                raise ValueError("chunk_size and overflow: the 'float32' accumulator (plain "
                                 "tf.linalg.matmul) takes neither")
            return
        if kind == "int32":
            overflow = "wrap" if self.overflow is None else self.overflow
            if overflow not in OVERFLOWS:
                raise ValueError(f"overflow must be one of {OVERFLOWS}, got {overflow!r}")
            set_("overflow", overflow)
            return
        if self.overflow is not None:
            raise ValueError("overflow: only an argument of the 'int32' accumulator; float "
                             "accumulators overflow as their format does (or saturate=True)")
        set_("format", _float_format("format", self.format))
        if not isinstance(self.rounding, str) or self.rounding not in BASIC_ROUNDINGS:
            raise ValueError(f"rounding must be one of {BASIC_ROUNDINGS}, got "
                             f"{self.rounding!r}")
        if not isinstance(self.saturate, (bool, np.bool_)):
            raise ValueError(f"saturate must be True or False, got {self.saturate!r}")
        set_("saturate", bool(self.saturate))
        if self.outer_format is not None:
            set_("outer_format", _float_format("outer_format", self.outer_format))
        if self.products is not None:
            set_("products", _float_format("products", self.products))

    # -- kinds ------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """`"float32"` (plain matmul), `"int32"` or `"float"` (an emulated float sum)."""
        return self.format if isinstance(self.format, str) else "float"

    @property
    def emulates(self) -> bool:
        return self.kind != "float32"

    @property
    def outer(self) -> Optional[formats.FloatFormat]:
        """The format of the sum of chunks (float accumulators)."""
        if self.kind != "float":
            return None
        return self.format if self.outer_format is None else self.outer_format

    def kernel_arguments(self) -> tuple:
        """A float accumulator as the plain arguments of the kernels'
        `accumulating_matmul(a, b, *arguments, seed)` (`tfhfp8.ops`): `(format, outer,
        products, rounding, saturate, chunk_size)`."""
        if self.kind != "float":
            raise ValueError(f"kernel_arguments: {self!r} is not a float accumulator")
        return (self.format, self.outer, self.products, self.rounding, self.saturate,
                self.chunk_size)

    # -- serialization ----------------------------------------------------------------
    def get_config(self) -> dict:
        config = {"format": self.format if self.kind != "float" else
                  formats.serialize(self.format), "chunk_size": self.chunk_size,
                  "name": self.name}
        if self.kind == "float":
            config.update(rounding=self.rounding, saturate=self.saturate,
                          outer_format=formats.serialize(self.outer_format),
                          products=formats.serialize(self.products))
        elif self.kind == "int32":
            config["overflow"] = self.overflow
        return config

    @classmethod
    def from_config(cls, config: dict) -> "Accumulator":
        config = dict(config)
        for key in ("format", "outer_format", "products"):
            value = config.get(key)
            if value is not None and not (key == "format" and value in ("float32", "int32")):
                config[key] = formats.get(value)
        return cls(**config)

    def __repr__(self):
        if self.name:
            return f"Accumulator({self.name!r})"
        if self.kind == "float32":
            return "Accumulator('float32')"
        parts = [repr(self.format.name) if self.kind == "float" and self.format.name else
                 repr(self.format)]
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        if self.kind == "int32":
            parts.append(f"overflow={self.overflow!r}")
        else:
            if self.rounding != "nearest_even":
                parts.append(f"rounding={self.rounding!r}")
            for key in ("outer_format", "products"):
                value = getattr(self, key)
                if value is not None:
                    parts.append(f"{key}={value.name or value!r}")
            if self.saturate:
                parts.append("saturate=True")
        return f"Accumulator({', '.join(parts)})"

    def __str__(self):
        """A short description (what `tfhfp8.summary` shows)."""
        if self.name:
            return self.name
        if self.kind != "float":
            text = self.kind
            if self.kind == "int32":
                text += "" if self.overflow == "wrap" else "/saturate"
        else:
            text = self.format.name or repr(self.format)
            if self.outer_format is not None:
                text += f"+{self.outer_format.name or self.outer_format!r}"
        if self.chunk_size is not None:
            text += f"/chunk{self.chunk_size}"
        return text


def _named(name, *args, **kwargs):
    return Accumulator(*args, name=name, **kwargs)


_NAMED = {acc.name: acc for acc in (
    _named("float32", "float32"),
    _named("float16", "float16"),
    _named("bfloat16", "bfloat16"),
    _named("float16_chunk64", "float16", chunk_size=64),
    _named("int32", "int32"),
)} | HARDWARE

REGISTRY = registry.Registry(
    "accumulator", (Accumulator, FusedAccumulator), _NAMED,
    from_plain_config=Accumulator.from_config,
    hint="; or build one with tfhfp8.Accumulator(format, chunk_size=...) or "
         "tfhfp8.FusedAccumulator(group_size, fraction_bits, ...).")


def names():
    """The named accumulators."""
    return REGISTRY.names()


def get(identifier):
    """An Accumulator from a name, a config or an Accumulator (None: `"float32"`)."""
    if identifier is None:
        return _NAMED["float32"]
    return REGISTRY.get(identifier)


def serialize(accumulator):
    """The name of a named accumulator, else its Keras config."""
    return REGISTRY.serialize(accumulator)


def check_operand(parameter, fmt):
    """Raises a ValueError naming `parameter` unless products of operands in `fmt` are
    exact in float32 (what a float accumulator needs)."""
    ok = ((isinstance(fmt, formats.FloatFormat)
           and fmt.mantissa_bits <= MAX_OPERAND_MANTISSA_BITS)
          or (isinstance(fmt, formats.DynamicFixedPoint) and fmt.bits <= MAX_OPERAND_DFP_BITS)
          or _block_scaled_significand_bits(fmt) <= MAX_OPERAND_MANTISSA_BITS + 1)
    if not ok:
        raise ValueError(
            f"{parameter}: an emulated float accumulator needs operands whose products are "
            f"exact in float32: a FloatFormat with mantissa_bits <= "
            f"{MAX_OPERAND_MANTISSA_BITS}, a DynamicFixedPoint with bits <= "
            f"{MAX_OPERAND_DFP_BITS} or a block-scaled format whose element times block "
            f"scale has at most {MAX_OPERAND_MANTISSA_BITS + 1} significant bits (no FP32 "
            f"tensor scale: not NVFP4's, not per-tensor scaling); got {fmt!r}")


def _block_scaled_significand_bits(fmt):
    """The significant bits of a value of block-scaled `fmt` (element times block scale;
    a power-of-two scale adds none), or infinity when an FP32 scale can make it any
    float32 (per-tensor or per-block FP32 scales, a tensor scale)."""
    block_scaled = isinstance(fmt, formats.BlockScaled)
    if not block_scaled or fmt.per_tensor or fmt.float32_blocks or fmt.tensor_scale:
        return float("inf")
    scale_bits = 0 if fmt.power_of_two_scale else fmt.scale.mantissa_bits + 1
    return fmt.element.mantissa_bits + 1 + scale_bits


# The three GEMMs of a layer (the forward product and the two gradient products).
GEMM_KINDS = ("forward", "input_gradient", "weight_gradient")
# The roles of the two operands of each GEMM kind.
OPERANDS = {"forward": ("activations", "weights"),
            "input_gradient": ("errors", "weights"),
            "weight_gradient": ("activations", "errors")}


def per_gemm(accumulation, role_formats):
    """`{kind: Accumulator}` for the three GEMM kinds, from None (FP32 sums), one
    accumulator (or name) for all, or a dict kind -> accumulator (missing kinds: FP32).

    Each emulated accumulator is checked against the formats of its GEMM's operands
    (`role_formats`: role -> format or None, as `Policy.formats`).

    Raises:
      ValueError, TypeError: naming the GEMM kind (and the operand's role).
    """
    if accumulation is None:
        accumulation = {}
    if isinstance(accumulation, dict):
        unknown = set(accumulation) - set(GEMM_KINDS)
        if unknown:
            raise ValueError(f"accumulation: unknown GEMM kinds {sorted(unknown)}; the "
                             f"kinds are {GEMM_KINDS}")
        given = accumulation
    else:
        given = {kind: accumulation for kind in GEMM_KINDS}
    result = {}
    for kind in GEMM_KINDS:
        try:
            acc = get(given.get(kind))
        except (ValueError, TypeError) as error:
            raise type(error)(f"accumulation[{kind!r}]: {error}") from None
        for role in OPERANDS[kind] if acc.emulates else ():
            fmt = role_formats[role]
            try:
                if acc.kind == "float":
                    check_operand(role, fmt)
                elif acc.kind == "fused":
                    acc.input_type(role, fmt)
                elif not (isinstance(fmt, formats.DynamicFixedPoint) and fmt.axis is None
                          and fmt.block_size is None):
                    raise ValueError(f"{role}: the 'int32' accumulator needs per-tensor "
                                     f"DynamicFixedPoint operands, got {fmt!r}")
            except ValueError as error:
                raise ValueError(f"accumulation[{kind!r}] = {acc}: {error}") from None
        result[kind] = acc
    return result


def serialize_per_gemm(accumulation):
    """What `per_gemm` takes back: one accumulator's name or config when all three
    kinds share it, else a dict kind -> name or config."""
    values = list(accumulation.values())
    if all(acc == values[0] for acc in values):
        return serialize(values[0])
    return {kind: serialize(acc) for kind, acc in accumulation.items()}
