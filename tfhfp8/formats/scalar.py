"""Scalar number formats: every element rounded on its own.

- `FloatFormat`: 1 sign bit, `exponent_bits`, `mantissa_bits`, a bias, a convention
  for special values and optional subnormals (every float type of ml_dtypes is one).
- `DynamicFixedPoint`: integer mantissas sharing one power-of-two exponent per
  tensor or per slice (INT16 DFP, Das et al. 2018).

`NAMED` and `ALIASES` are the named scalar formats; `REGISTRY` / `get` resolve them
(the block formats of `tfhfp8.formats.block` take their elements and scales from it).
"""

import dataclasses
from typing import Optional

import keras
import numpy as np

from tfhfp8 import registry

SPECIALS = ("ieee", "fn", "fnuz", "finite", "p3109_extended", "p3109_finite")
"""Special-value conventions (ml_dtypes suffixes, and IEEE P3109's two domains):

- `"ieee"`: top exponent code reserved for inf (mantissa 0) and NaN.
- `"fn"`: no inf; only the all-ones code is NaN, the rest of the top binade is finite.
- `"fnuz"`: no inf, no negative zero; the negative-zero code is the single NaN.
- `"finite"`: no inf and no NaN (ml_dtypes' 6- and 4-bit `fn` types).
- `"p3109_extended"`: one NaN (the negative-zero code; unsigned: the all-ones code), no
  negative zero, +-inf in the all-ones magnitude (unsigned: the code below NaN).
- `"p3109_finite"`: the same without infinities (signed, it is `"fnuz"`).
"""
P3109_SPECIALS = ("p3109_extended", "p3109_finite")


def check_int(name, value, low, high):
    """`value` as an int, if it is an integer (not a bool) in `[low, high]`.

    Raises:
      ValueError: naming the parameter `name` and the allowed range.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return int(value)


def _pow2_str(value):
    exponent = int(np.log2(value))
    return f"2^{exponent}" if 2.0**exponent == value else repr(value)


@keras.saving.register_keras_serializable(package="tfhfp8")
@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format with `1 + exponent_bits + mantissa_bits` bits.

    Value of a code with exponent field `E` and mantissa field `M`:
    `2^(E - bias) * (1 + M / 2^m)` for `E > 0`, and `2^(1 - bias) * M / 2^m` for
    subnormals (`E == 0`).

    Args:
      exponent_bits: 1..8.
      mantissa_bits: 0..23.
      bias: exponent bias; default IEEE `2^(exponent_bits - 1) - 1`. Any integer that
        keeps the format's normal numbers inside float32's normal range, so that every
        input dtype can hold the quantized values (the error message gives the range).
      specials: one of `"ieee"`, `"fn"`, `"fnuz"`, `"finite"` (see `SPECIALS`).
      subnormals: when False, values below `min_normal` round to 0 or `min_normal`.
      name: optional display name.
      signed: False for P3109's unsigned formats (no sign bit; P3109 specials only):
        a negative value that does not round to zero is outside the format's range
        (NaN, or 0 when saturating), -0 becomes +0.

    Example:

    >>> fmt = FloatFormat(exponent_bits=3, mantissa_bits=4, bias=5)
    >>> fmt.max, fmt.min_normal, fmt.epsilon
    (3.875, 0.0625, 0.0625)

    IEEE P3109's formats (`FloatFormat.p3109`) are named as gfloat names them:

    >>> import tfhfp8
    >>> tfhfp8.formats.get("p3109_k8p3se") == FloatFormat.p3109(8, 3)
    True
    """

    exponent_bits: int
    mantissa_bits: int
    bias: Optional[int] = None
    specials: str = "ieee"
    subnormals: bool = True
    name: Optional[str] = dataclasses.field(default=None, compare=False)
    signed: bool = True

    def __post_init__(self):
        e = check_int("exponent_bits", self.exponent_bits, 1, 8)
        m = check_int("mantissa_bits", self.mantissa_bits, 0, 23)
        if self.specials not in SPECIALS:
            raise ValueError(f"specials must be one of {SPECIALS}, got {self.specials!r}")
        if not isinstance(self.subnormals, (bool, np.bool_)):
            raise ValueError(f"subnormals must be True or False, got {self.subnormals!r}")
        if not isinstance(self.signed, (bool, np.bool_)):
            raise ValueError(f"signed must be True or False, got {self.signed!r}")
        if not self.signed and self.specials not in P3109_SPECIALS:
            raise ValueError(f"signed=False is for the P3109 specials {P3109_SPECIALS}, "
                             f"got specials={self.specials!r}")
        if self.specials == "ieee" and e < 2:
            raise ValueError(
                "exponent_bits must be in [2, 8] for specials='ieee' (the top exponent "
                f"code is reserved for inf/NaN), got {e}")
        object.__setattr__(self, "exponent_bits", e)
        object.__setattr__(self, "mantissa_bits", m)
        top_exponent = self.max_code >> m
        if self.max_code < (1 << m):
            raise ValueError(
                f"a format with exponent_bits={e}, mantissa_bits={m} and "
                f"specials={self.specials!r} has no normal numbers")
        # Normal numbers must be float32 normals: 1 - bias >= -126, top - bias <= 127.
        low, high = top_exponent - 127, 127
        default_bias = (1 << (e - 1)) - 1
        bias = default_bias if self.bias is None else self.bias
        if low > high:
            raise ValueError(
                f"exponent_bits={e} with specials={self.specials!r} spans more binades "
                "than float32 can hold; use specials='ieee' or fewer exponent bits")
        object.__setattr__(self, "bias", check_int("bias", bias, low, high))

    # -- codes ------------------------------------------------------------------
    @classmethod
    def p3109(cls, k, precision, signed=True, domain="extended"):
        """IEEE P3109's K-bit format of precision P (gfloat's `format_info_p3109`).

        Args:
          k: the width in bits, 3..8.
          precision: significand bits, the implicit one included: 1..k-1 signed,
            1..k unsigned. The exponent field has `k - precision` bits (one more
            unsigned), the bias is 2^(that - 1).
          signed: False for the unsigned formats (no sign bit).
          domain: `"extended"` (with +-inf) or `"finite"`.

        >>> FloatFormat.p3109(8, 4).max, FloatFormat.p3109(8, 4, domain="finite").max
        (224.0, 240.0)
        """
        k = check_int("k", k, 3, 8)
        if not isinstance(signed, (bool, np.bool_)):
            raise ValueError(f"signed must be True or False, got {signed!r}")
        precision = check_int("precision", precision, 1, k - 1 if signed else k)
        if domain not in ("extended", "finite"):
            raise ValueError(f"domain must be 'extended' or 'finite', got {domain!r}")
        exponent_bits = k - precision + (0 if signed else 1)
        name = f"p3109_k{k}p{precision}{'s' if signed else 'u'}{domain[0]}"
        bias = 1 << (exponent_bits - 1)
        if 1 - bias < -126:
            raise ValueError(f"{name} (k={k}, precision={precision}, signed={signed}) has "
                             f"the smallest normal 2^{1 - bias}, not a float32 normal: tfhfp8 "
                             "rounds in float32")
        return cls(exponent_bits, precision - 1, bias=bias, specials=f"p3109_{domain}",
                   name=name, signed=bool(signed))

    @property
    def bits(self) -> int:
        return int(self.signed) + self.exponent_bits + self.mantissa_bits

    @property
    def max_code(self) -> int:
        """The largest finite magnitude as an unsigned code `(E << m) | M`."""
        all_ones = (1 << (self.exponent_bits + self.mantissa_bits)) - 1
        if self.specials == "ieee":
            return ((1 << self.exponent_bits) - 1 << self.mantissa_bits) - 1
        # Above max: fn's NaN or P3109's inf; unsigned P3109 keeps its NaN at the top.
        reserved = int(self.specials in ("fn", "p3109_extended")) + int(not self.signed)
        return all_ones - reserved

    def decode(self, code: int) -> float:
        """The magnitude of an unsigned code `(E << m) | M`, as a Python float."""
        m = self.mantissa_bits
        exponent, mantissa = code >> m, code & ((1 << m) - 1)
        if exponent == 0:
            return float(mantissa) * 2.0 ** (1 - self.bias - m) if self.subnormals else 0.0
        return float((1 << m) + mantissa) * 2.0 ** (exponent - self.bias - m)

    # -- properties -------------------------------------------------------------
    @property
    def max(self) -> float:
        return self.decode(self.max_code)

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        """The smallest positive value (`min_normal` when subnormals are off)."""
        if not self.subnormals:
            return self.min_normal
        return 2.0 ** (1 - self.bias - self.mantissa_bits)

    @property
    def epsilon(self) -> float:
        """Distance from 1.0 to the next larger value of the format's precision."""
        return 2.0 ** -self.mantissa_bits

    @property
    def has_inf(self) -> bool:
        return self.specials in ("ieee", "p3109_extended")

    @property
    def has_nan(self) -> bool:
        return self.specials != "finite"

    @property
    def has_negative_zero(self) -> bool:
        return self.signed and self.specials not in ("fnuz",) + P3109_SPECIALS

    def values(self) -> np.ndarray:
        """Every finite non-negative value of the format, ascending (float64)."""
        codes = range(0 if self.subnormals else 1 << self.mantissa_bits, self.max_code + 1)
        values = [self.decode(c) for c in codes]
        return np.array(([0.0] if not self.subnormals else []) + values)

    # -- serialization ----------------------------------------------------------
    def get_config(self) -> dict:
        return {
            "exponent_bits": self.exponent_bits, "mantissa_bits": self.mantissa_bits,
            "bias": self.bias, "specials": self.specials,
            "subnormals": bool(self.subnormals), "name": self.name,
            **({} if self.signed else {"signed": False}),  # older configs: as they were
        }

    @classmethod
    def from_config(cls, config: dict) -> "FloatFormat":
        return cls(**config)

    def __repr__(self):
        title = f"{self.name!r}, " if self.name else ""
        extra = ("" if self.subnormals else ", no subnormals") + (
            "" if self.signed else ", unsigned")
        return (
            f"FloatFormat({title}1-{self.exponent_bits}-{self.mantissa_bits}, "
            f"bias={self.bias}, {self.specials}{extra}, max={self.max:g}, "
            f"min_normal={_pow2_str(self.min_normal)}, "
            f"min_subnormal={_pow2_str(self.min_subnormal)})")


@keras.saving.register_keras_serializable(package="tfhfp8")
@dataclasses.dataclass(frozen=True)
class DynamicFixedPoint:
    """Dynamic fixed point: `bits`-bit signed integer mantissas sharing one exponent.

    A tensor (or each slice along `axis`) is stored as integers `I` with
    `|I| <= 2^(bits-1) - 1` times a shared power of two `2^E_s`. `E_s` is the smallest
    exponent for which the largest magnitude does not overflow after rounding
    (`E_max - (bits - 2)` or one more, `E_max` the exponent of `max|x|`); for the
    stochastic and directed roundings, one more whenever it could round up beyond
    `2^(bits-1) - 1`, whatever its sign.

    Args:
      bits: 2..24 (mantissas must be exact in float32).
      axis: None for one exponent per tensor, or the axis along which each slice gets
        its own exponent. With `block_size`: the axis the blocks run along (None: the
        last one).
      block_size: None, or block floating point: each run of `block_size` consecutive
        elements along `axis` gets its own exponent by the same rule (the last block of
        a row may be shorter); 1..65536.

    Example:

    >>> import tensorflow as tf, tfhfp8
    >>> x = tf.constant([1.0, 0.1, 1000.0])
    >>> y = tfhfp8.quantize(x, tfhfp8.DynamicFixedPoint(bits=16))
    """

    bits: int = 16
    axis: Optional[int] = None
    name: Optional[str] = dataclasses.field(default=None, compare=False)
    block_size: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "bits", check_int("bits", self.bits, 2, 24))
        if self.axis is not None:
            object.__setattr__(self, "axis", check_int("axis", self.axis, -32, 31))
        if self.block_size is not None:
            object.__setattr__(self, "block_size",
                               check_int("block_size", self.block_size, 1, 1 << 16))

    @property
    def max_mantissa(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def get_config(self) -> dict:
        config = {"bits": self.bits, "axis": self.axis, "name": self.name}
        if self.block_size is not None:  # configs without blocks stay as they were
            config["block_size"] = self.block_size
        return config

    @classmethod
    def from_config(cls, config: dict) -> "DynamicFixedPoint":
        return cls(**config)

    def __repr__(self):
        title = f"{self.name!r}, " if self.name else ""
        if self.block_size is not None:
            along = -1 if self.axis is None else self.axis
            axis = f"per block of {self.block_size} along axis {along}"
        else:
            axis = "per tensor" if self.axis is None else f"per slice along axis {self.axis}"
        return f"DynamicFixedPoint({title}bits={self.bits}, {axis})"


def _named_float(name, e, m, bias=None, specials="ieee"):
    return FloatFormat(e, m, bias=bias, specials=specials, name=name)


NAMED = {
    fmt.name: fmt for fmt in (
        _named_float("bfloat16", 8, 7),
        _named_float("float16", 5, 10),
        # Wang et al. 2018 ("Training Deep Neural Networks with 8-bit Floating Point
        # Numbers"): the 1-6-9 16-bit float of their weight updates and accumulations
        # (QPyTorch's examples/IBM8 keeps momentum and the weight accumulator in it).
        # The paper gives the field widths; the IEEE bias 31, subnormals and inf/NaN
        # in the top binade are assumed (no ml_dtypes type exists).
        _named_float("float16_e6m9", 6, 9),
        # NVIDIA's TF32: FP32's range and FP16's precision, the operand type of the
        # tensor cores' TF32 instructions (which read FP32 registers and ignore the 13
        # lowest mantissa bits: `tfhfp8.fused_accumulation`).
        _named_float("tensorfloat32", 8, 10),
        _named_float("float8_e5m2", 5, 2),
        _named_float("float8_e5m2fnuz", 5, 2, bias=16, specials="fnuz"),
        _named_float("float8_e4m3", 4, 3),
        _named_float("float8_e4m3fn", 4, 3, specials="fn"),
        _named_float("float8_e4m3fnuz", 4, 3, bias=8, specials="fnuz"),
        _named_float("float8_e4m3b11fnuz", 4, 3, bias=11, specials="fnuz"),
        _named_float("float8_e3m4", 3, 4),
        _named_float("float6_e3m2fn", 3, 2, specials="finite"),
        _named_float("float6_e2m3fn", 2, 3, specials="finite"),
        _named_float("float4_e2m1fn", 2, 1, specials="finite"),
        DynamicFixedPoint(16, name="int16_dfp"),
    )
}
# IEEE P3109's formats of 3 to 8 bits, named as gfloat names them (p3109_k8p3se: K = 8,
# P = 3, signed, extended domain). p3109_k8p1ue and p3109_k8p1uf are left out: their
# smallest normal, 2^-127, is not a float32 normal (the rounding runs in float32).
NAMED.update({fmt.name: fmt for fmt in (
    FloatFormat.p3109(k, p, signed, domain)
    for k in range(3, 9) for signed in (True, False) for domain in ("extended", "finite")
    for p in range(1, k + (0 if signed else 1))
    if (k, p, signed) != (8, 1, False))})
ALIASES = {
    "hfp8_fwd": "float8_e4m3b11fnuz",  # HFP8 forward 1-4-3 (Sun et al. 2019)
    "hfp8_bwd": "float8_e5m2",  # HFP8 backward 1-5-2
}


def dtype_name(identifier):
    """The name of a numpy / ml_dtypes dtype (or type), else `identifier` unchanged."""
    if isinstance(identifier, (np.dtype, type)):
        try:
            return np.dtype(identifier).name
        except TypeError:
            pass
    return identifier


# Configs saved before the registry carry no class name: only DFP has "bits".
REGISTRY = registry.Registry(
    "format", (FloatFormat, DynamicFixedPoint), NAMED, ALIASES,
    from_plain_config=lambda config: (DynamicFixedPoint if "bits" in config
                                      else FloatFormat).from_config(config),
    hint="; or build one with tfhfp8.FloatFormat(...) or tfhfp8.DynamicFixedPoint(...).")


def get(identifier):
    """The scalar format for a name, an ml_dtypes dtype, a config, or a format."""
    return REGISTRY.get(dtype_name(identifier))
