"""Fused (block-FMA) accumulators: how a matrix unit sums a dot product.

A tensor core does not round after every addition. It adds a group of `group_size`
products and the running accumulator `c` in one fixed-point adder: every product is
exact; each term (the products and `c`) is truncated toward zero to `fraction_bits`
bits after the binary point of the largest exponent among them; the truncated terms
are summed exactly; the sum is normalized and rounded once to the output format (Fasi,
Higham, Mikaitis & Pranesh, PeerJ CS 2021; Khattak & Mikaitis, arXiv 2512.07004; Xie
et al., MMA-Sim, arXiv 2511.10909). Exponents, as MMA-Sim counts them: an operand's is
`floor(log2|x|)`, or its input type's minimum normal exponent for a subnormal; a
product's is the sum of its operands' (its significand lies in [1, 4)); `c`'s is its
own as an FP32 value; a zero, operand or `c`, counts as exponent -126.

`FusedAccumulator(group_size, fraction_bits, output, chunk_size)` is that arithmetic;
with `chunk_size` the fused chain restarts from 0 every `chunk_size` products and its
result is added into an FP32 total, rounded to nearest even (DeepSeek-V3's promotion
to CUDA cores, arXiv 2412.19437 section 3.3.2). `HARDWARE` names the published models
of NVIDIA's instructions. Accumulators go wherever `tfhfp8.Accumulator` goes
(`tfhfp8.matmul`, `Policy(accumulation=...)`), computed by `tfhfp8.ops.fused_matmul`
(a C++ kernel, or TF ops under XLA: the same bits).

TF32 instructions read FP32 registers and ignore the 13 lowest mantissa bits: their
accumulators take operands of any format (unformatted FP32 too) and truncate them to
`"tensorfloat32"` (toward zero; a NaN stays NaN) before the products, as MMA-Sim's
`truncate_to_tf32` does. Blackwell's `kind::mxf8f6f4` takes OCP MX operands (blocks of
32 along K, E8M0 scales): a product's exponent adds its two block scales' exponents, so
a subnormal element counts with its element type's minimum normal exponent plus its
block's. Per-tensor scaled FP8 (`e4m3_delayed`, ...) goes in as its FP8 elements, the
two FP32 scales multiplying the sum after it (`tfhfp8.gemm.TensorScaled`; the presets
`fp8_hopper` and `fp8_hopper_promoted`). Blackwell's `kind::mxf4nvf4` with MXFP4
operands (`nvidia_blackwell_mxfp4`) sums each 16 products exactly first: that partial
sum, scaled by its blocks, is one term whose exponent is its two scales' exponents
(`partial_sum_size`). Not yet emulated: `kind::mxf4nvf4` with NVFP4 operands. Checked
bit for bit against MMA-Sim: `models/tensor_cores/mmasim_check.py`.

>>> import tensorflow as tf, tfhfp8
>>> acc = tfhfp8.accumulation.get("nvidia_hopper_fp8")
>>> acc.group_size, acc.fraction_bits, acc.output
(32, 13, 'e8m13')
>>> a = tf.constant([[256.0] + [2.0 ** -6] * 31])   # E4M3 values
>>> b = tf.ones([32, 1])
>>> float(tfhfp8.matmul(a, b, acc, a_format="float8_e4m3fn",
...                     b_format="float8_e4m3fn")[0, 0])
256.0
>>> float(tfhfp8.matmul(a, b, a_format="float8_e4m3fn",
...                     b_format="float8_e4m3fn")[0, 0])
256.484375

Each 2^-6 lies below the last of the 13 bits kept after 256's binary point (2^-5).
"""

import dataclasses
from typing import Optional, Tuple

import keras

from tfhfp8 import formats

# Output format -> (mantissa bits, minimum normal exponent, rounding).
OUTPUTS = {"float32": (23, -126, "toward_zero"), "e8m13": (13, -126, "toward_zero"),
           "float16": (10, -14, "nearest_even")}

# The input types of the instructions below (IEEE half, bfloat16, OCP FP8, TF32, and
# the OCP MX formats of Blackwell's block-scaled kind::mxf8f6f4).
_INPUT_TYPES = {name: formats.get(name) for name in (
    "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "tensorfloat32",
    "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1")}
TRUNCATED_TYPE = "tensorfloat32"  # taken from FP32 registers, truncated


@keras.saving.register_keras_serializable(package="tfhfp8")
@dataclasses.dataclass(frozen=True)
class FusedAccumulator:
    """A matrix unit's fused dot-add (see the module docstring for the arithmetic).

    Args:
      group_size: products per fused dot-add (K is padded with zeros to whole groups).
      fraction_bits: bits kept after the binary point of the largest term's exponent.
      output: `"float32"` (toward zero), `"e8m13"` (FP32 truncated to 13 mantissa bits:
        Hopper's and Ada's FP8 path) or `"float16"` (nearest even); overflow gives inf.
      chunk_size: None, or a multiple of `group_size`: every `chunk_size` products the
        fused chain restarts from 0 and its result is added into an FP32 total (nearest
        even).
      input_types: names of the formats the instruction takes; an operand format must
        be exactly representable in one of them (its subnormals then count with that
        type's minimum normal exponent). Empty: any format with at most 11 mantissa
        bits, its own minimum normal exponent. `("tensorfloat32",)`: any operand,
        truncated to TF32 (`truncates_inputs`).
      name: display name.
      partial_sum_size: None, or (MX input types only) products summed exactly first,
        each such partial sum one term of the fused addition whose exponent is the sum
        of its two block scales' exponents (Blackwell's `kind::mxf4nvf4`: 16, groups
        of 64 spanning two blocks of 32).
    """

    group_size: int
    fraction_bits: int
    output: str = "float32"
    chunk_size: Optional[int] = None
    input_types: Tuple[str, ...] = ()
    name: Optional[str] = dataclasses.field(default=None, compare=False)
    partial_sum_size: Optional[int] = None

    def __post_init__(self):
        formats.check_int("group_size", self.group_size, 1, 1024)
        formats.check_int("fraction_bits", self.fraction_bits, 1, 40)
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {sorted(OUTPUTS)}, got {self.output!r}")
        if self.chunk_size is not None:
            formats.check_int("chunk_size", self.chunk_size, 1, 2**31 - 1)
            if self.chunk_size % self.group_size:
                raise ValueError(f"chunk_size must be a multiple of group_size "
                                 f"({self.group_size}), got {self.chunk_size}")
        unknown = [t for t in self.input_types if t not in _INPUT_TYPES]
        if unknown:
            raise ValueError(f"input_types: {unknown} are not among {sorted(_INPUT_TYPES)}")
        if TRUNCATED_TYPE in self.input_types and len(set(self.input_types)) > 1:
            raise ValueError(f"input_types: {TRUNCATED_TYPE!r} (any operand, truncated) "
                             f"goes alone, got {tuple(self.input_types)}")
        blocks = {_INPUT_TYPES[t].block_size for t in self.input_types
                  if isinstance(_INPUT_TYPES[t], formats.BlockScaled)}
        if self.partial_sum_size is not None:
            self._check_partial_sums(blocks)
        elif blocks and (blocks != {self.group_size} or any(
                not isinstance(_INPUT_TYPES[t], formats.BlockScaled) for t in self.input_types)):
            raise ValueError(f"input_types: MX types go alone, with group_size equal to "
                             f"their block size {sorted(blocks)} (one scale per group); got "
                             f"{tuple(self.input_types)}, group_size={self.group_size}")
        object.__setattr__(self, "input_types", tuple(self.input_types))

    def _check_partial_sums(self, blocks):
        """Partial sums need MX types alone, of one block size that divides the group
        and is divided by the partial sums (each partial sum in one block)."""
        formats.check_int("partial_sum_size", self.partial_sum_size, 1, self.group_size)
        if len(blocks) != 1 or len(self.input_types) != len(set(self.input_types)) or any(
                not isinstance(_INPUT_TYPES[t], formats.BlockScaled) for t in self.input_types):
            raise ValueError(f"partial_sum_size needs MX input types of one block size, got "
                             f"{tuple(self.input_types)}")
        block = blocks.pop()
        if self.group_size % block or block % self.partial_sum_size:
            raise ValueError(
                f"partial_sum_size: the group ({self.group_size}) must be whole blocks "
                f"({block}) and a block whole partial sums ({self.partial_sum_size})")

    kind = "fused"
    emulates = True

    @property
    def truncates_inputs(self):
        """True for TF32 instructions: every operand is truncated to TF32 first."""
        return self.input_types == (TRUNCATED_TYPE,)

    def input_type(self, parameter, fmt):
        """The instruction's input type that holds every value of `fmt` (TF32 for any
        `fmt` when `truncates_inputs`; for an MX input type, `fmt` itself, blocked as
        it is; for a per-tensor scaled `fmt`, the type of its elements, the scale
        applied after the sum: `tfhfp8.gemm.TensorScaled`), or a ValueError naming
        `parameter`, the format and the instruction."""
        if self.truncates_inputs:
            return _INPUT_TYPES[TRUNCATED_TYPE]
        element = fmt if isinstance(fmt, formats.FloatFormat) else None
        if isinstance(fmt, formats.BlockScaled) and fmt.per_tensor:
            element = fmt.element  # the FP8 data into the instruction, the scales after
        candidates = [_INPUT_TYPES[t] for t in self.input_types] or (
            [element] if element is not None and element.mantissa_bits <= 11 else [])
        for candidate in candidates:
            if isinstance(candidate, formats.BlockScaled):
                if (isinstance(fmt, formats.BlockScaled)
                        and dataclasses.replace(fmt, axis=candidate.axis) == candidate):
                    return candidate
            elif element is not None and _fits(element, candidate):
                return candidate
        takes = ", ".join(self.input_types) or "a FloatFormat with at most 11 mantissa bits"
        raise ValueError(f"{parameter}: {self} takes operands in {takes} (other "
                         f"block-scaled, fixed-point and unrounded FP32 operands are not "
                         f"emulated); got {fmt!r}")

    def kernel_arguments(self, a_type, b_type):
        """The plain arguments of `tfhfp8.ops.fused_matmul(a, b, *arguments)` for
        operands of the input types `a_type`, `b_type` (see `input_type`)."""
        bits, min_exponent, rounding = OUTPUTS[self.output]
        elements = [t.element if isinstance(t, formats.BlockScaled) else t
                    for t in (a_type, b_type)]
        block_emax = [t.emax_element if isinstance(t, formats.BlockScaled) else None
                      for t in (a_type, b_type)]
        arguments = (1 - elements[0].bias, 1 - elements[1].bias, self.group_size,
                     self.fraction_bits, bits, min_exponent, rounding, self.chunk_size or 0,
                     *block_emax)
        if self.partial_sum_size is None:
            return arguments
        return arguments + (a_type.block_size, self.partial_sum_size)

    def get_config(self):
        config = {"group_size": self.group_size, "fraction_bits": self.fraction_bits,
                  "output": self.output, "chunk_size": self.chunk_size,
                  "input_types": list(self.input_types), "name": self.name}
        if self.partial_sum_size is not None:  # configs without it stay as they were
            config["partial_sum_size"] = self.partial_sum_size
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __str__(self):
        return self.name or repr(self)


def _fits(fmt, input_type):
    """Every value of `fmt` is one of `input_type` (both grids are powers of two apart)."""
    return (fmt.mantissa_bits <= input_type.mantissa_bits
            and fmt.min_subnormal >= input_type.min_subnormal
            and fmt.max <= input_type.max)


def _hardware(name, group, bits, output="float32", types=(), chunk=None, partial=None):
    return FusedAccumulator(group, bits, output, chunk, types, name=name,
                            partial_sum_size=partial)


_FP16, _BF16, _TF32 = ("float16",), ("bfloat16",), (TRUNCATED_TYPE,)
_FP8 = ("float8_e4m3fn", "float8_e5m2")
_MX = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1")

# Published models of NVIDIA's matrix instructions (Khattak & Mikaitis 2025, Table 2;
# MMA-Sim's NVIDIA models): instruction, products per fused addition, fraction bits.
HARDWARE = {acc.name: acc for acc in (
    _hardware("nvidia_volta_fp16", 4, 23, types=_FP16),        # V100 mma.m8n8k4 f16
    _hardware("nvidia_ampere_fp16", 8, 24, types=_FP16),       # A100 mma.m16n8k16: 2 x 8
    _hardware("nvidia_ampere_bf16", 8, 24, types=_BF16),
    _hardware("nvidia_ampere_tf32", 4, 24, types=_TF32),       # A100 mma.m16n8k8: 2 x 4
    _hardware("nvidia_ada_fp8", 16, 13, "e8m13", _FP8),        # L40S mma.m16n8k32: 2 x 16
    _hardware("nvidia_hopper_fp16", 16, 25, types=_FP16),      # H100 wgmma k16
    _hardware("nvidia_hopper_bf16", 16, 25, types=_BF16),
    _hardware("nvidia_hopper_tf32", 8, 25, types=_TF32),       # H100 wgmma k8
    _hardware("nvidia_hopper_fp8", 32, 13, "e8m13", _FP8),     # H100 wgmma k32
    # DeepSeek-V3 (arXiv 2412.19437, 3.3.2): 4 x wgmma k32, then an FP32 add on CUDA cores.
    _hardware("nvidia_hopper_fp8_promote128", 32, 13, "e8m13", _FP8, chunk=128),
    _hardware("nvidia_blackwell_fp16", 16, 25, types=_FP16),   # B200 tcgen05.mma kind::f16
    _hardware("nvidia_blackwell_bf16", 16, 25, types=_BF16),
    _hardware("nvidia_blackwell_tf32", 8, 25, types=_TF32),    # tcgen05.mma kind::tf32
    _hardware("nvidia_blackwell_fp8", 32, 25, types=_FP8),     # tcgen05.mma kind::f8f6f4
    # tcgen05.mma.block_scale kind::mxf8f6f4: K = 32, one E8M0 scale per 32 elements
    # of each operand, folded into the exponents of the products.
    _hardware("nvidia_blackwell_mxfp8", 32, 25, types=_MX),
    # tcgen05.mma.block_scale kind::mxf4nvf4 with MXFP4 operands: K = 64 (two blocks of
    # 32), each 16 products summed exactly, that partial sum scaled by the two blocks'
    # scales and fused with the others and the accumulator at 35 fraction bits.
    _hardware("nvidia_blackwell_mxfp4", 64, 35, types=("mxfp4_e2m1",), partial=16),
)}
