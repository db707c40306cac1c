"""Which ONNX type holds each tfhfp8 format, exactly, and at which opset.

A `Plan` says how one quantization (a format, its rounding and saturation) becomes
ONNX: the element type of `QuantizeLinear` / `DequantizeLinear`, the power-of-two
factor between the format's values and that type's, the opset that has the type, and
for weights, how the rounded FP32 values become stored codes and scales.

Every QDQ is written at opset 21 (see FLOAT8_OPSET for why not 19).

- Floats whose codes are an ONNX float8 type's codes up to a power of two (same
  exponent and mantissa widths, special values and subnormals; any bias): that type,
  scale `2^(onnx_bias - bias)`. HFP8's 1-4-3 with bias 11 is FLOAT8E4M3FNUZ x 2^-3.
- float16 and bfloat16 (the 16-bit exempt layers): no QDQ type exists; `Cast` to the
  type and back (round to nearest even), after a `Clip` at the format's max when the
  policy saturates. Weights are stored in the 16-bit type.
- Per-tensor dynamic fixed point with <= 16 bits: INT16 (INT8 for <= 8 bits) with the
  power-of-two scale `2^E_s`, computed in the graph from the tensor's max|x|.
- OCP MX with float8 or INT8 elements and E8M0 ("floor") scales: blocked QDQ (opset
  21, `axis`, `block_size`) with the power-of-two block scales as float32.

Anything else raises a ValueError naming the format and what ONNX offers.
"""

import dataclasses
from typing import Optional

import ml_dtypes
import numpy as np
from onnx import TensorProto

from tfhfp8 import block_formats, formats

# ONNX float8 types: (exponent bits, mantissa bits, specials) -> (type, bias, dtype).
_FLOAT8 = {
    (4, 3, "fn"): (TensorProto.FLOAT8E4M3FN, 7, ml_dtypes.float8_e4m3fn),
    (4, 3, "fnuz"): (TensorProto.FLOAT8E4M3FNUZ, 8, ml_dtypes.float8_e4m3fnuz),
    (5, 2, "ieee"): (TensorProto.FLOAT8E5M2, 15, ml_dtypes.float8_e5m2),
    (5, 2, "fnuz"): (TensorProto.FLOAT8E5M2FNUZ, 16, ml_dtypes.float8_e5m2fnuz),
}
_FLOAT16 = {(5, 10, "ieee", 15): (TensorProto.FLOAT16, np.float16),
            (8, 7, "ieee", 127): (TensorProto.BFLOAT16, ml_dtypes.bfloat16)}
# float8 QuantizeLinear / DequantizeLinear (with `saturate`) exist from opset 19, but a
# zero point is then the only way to name the type, and ONNX Runtime 1.32 drops a ReLU
# (or fails on a Clip) before a float8 QuantizeLinear with a zero point. Opset 21's
# `output_dtype` names the type without one: every QDQ is written at opset 21, which
# also has INT16 (and INT4) QuantizeLinear and blocked quantization (`block_size`).
FLOAT8_OPSET = 21
INT16_OPSET = 21

OFFERS = ("ONNX offers QuantizeLinear/DequantizeLinear in FLOAT8E4M3FN, FLOAT8E4M3FNUZ, "
          "FLOAT8E5M2, FLOAT8E5M2FNUZ (opset 19), INT8/INT16/INT4 with per-tensor, "
          "per-axis or blocked scales (blocks from opset 21), FLOAT4E2M1 (opset 23, not "
          "run by ONNX Runtime 1.32's QuantizeLinear), and Cast to FLOAT16/BFLOAT16; "
          "tfhfp8.export maps onto these the float formats with the same fields as an "
          "ONNX float8 type (any bias), float16, bfloat16, per-tensor DynamicFixedPoint "
          "with <= 16 bits, and MX formats with float8 or INT8 elements and E8M0 "
          "'floor' scales")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one quantization is written in ONNX.

    kind: "float" (QDQ with a constant power-of-two scale), "cast" (float16 /
      bfloat16), "dfp" (INT QDQ, scale computed per tensor), "mx" (blocked QDQ,
      scales computed per block).
    onnx_type, dtype: the element type in ONNX and in numpy.
    scale: the constant scale ("float"), or the element's factor ("mx": MXINT8's 2^-6).
    clip: the largest magnitude (applied before quantizing), or None.
    block_size: "mx" only.
    """

    kind: str
    onnx_type: int
    dtype: type
    opset: int
    scale: float = 1.0
    saturate: bool = True
    clip: Optional[float] = None
    bits: int = 0
    block_size: int = 0
    emax: int = 0


def plan(fmt, rounding="nearest_even", saturate=True):
    """The `Plan` of a quantization; ValueError when ONNX cannot hold it exactly."""
    name = getattr(fmt, "name", None) or repr(fmt)
    if rounding != "nearest_even":
        raise ValueError(
            f"format {name} with rounding={rounding!r}: ONNX QuantizeLinear rounds to "
            "nearest even only; export a policy whose weights and activations round "
            "to nearest (stochastic rounding is for training)")
    if isinstance(fmt, formats.FloatFormat):
        return _float_plan(fmt, name, saturate)
    if isinstance(fmt, formats.DynamicFixedPoint):
        if fmt.axis is not None or fmt.block_size is not None or fmt.bits > 16:
            raise ValueError(f"format {name}: only per-tensor DynamicFixedPoint with at most "
                             f"16 bits is exported (got {fmt!r}). {OFFERS}")
        onnx_type, dtype = ((TensorProto.INT8, np.int8) if fmt.bits <= 8
                            else (TensorProto.INT16, np.int16))
        return Plan("dfp", onnx_type, dtype, INT16_OPSET, bits=fmt.bits,
                    clip=float(fmt.max_mantissa))
    if isinstance(fmt, block_formats.BlockScaled):
        return _block_plan(fmt, name)
    raise TypeError(f"not a tfhfp8 format: {fmt!r}")


def _float_plan(fmt, name, saturate):
    if not fmt.subnormals:
        raise ValueError(f"format {name} has no subnormals; every ONNX float type has "
                         f"them. {OFFERS}")
    # P3109's signed finite formats are fnuz ones (one NaN at -0, no inf, no -0).
    specials = "fnuz" if fmt.specials == "p3109_finite" and fmt.signed else fmt.specials
    key = (fmt.exponent_bits, fmt.mantissa_bits, specials)
    if key in _FLOAT8:
        onnx_type, onnx_bias, dtype = _FLOAT8[key]
        return Plan("float", onnx_type, dtype, FLOAT8_OPSET,
                    scale=2.0 ** (onnx_bias - fmt.bias), saturate=saturate)
    if key + (fmt.bias,) in _FLOAT16:
        onnx_type, dtype = _FLOAT16[key + (fmt.bias,)]
        return Plan("cast", onnx_type, dtype, 1, saturate=saturate,
                    clip=fmt.max if saturate else None)
    raise ValueError(f"format {name} ({fmt!r}) has no ONNX type. {OFFERS}")


def _block_plan(fmt, name):
    if fmt.per_tensor:
        raise ValueError(f"format {name}: per-tensor FP32 scaling (Transformer Engine / "
                         "Keras float8) is not exported; its scale is no power of two")
    if not fmt.power_of_two_scale or fmt.scale_rounding != "floor" or fmt.tensor_scale:
        raise ValueError(f"format {name}: only E8M0 block scales with OCP's 'floor' rule "
                         f"are exported (got scale {fmt.scale_name}/{fmt.scale_rounding}). "
                         f"{OFFERS}")
    if fmt.element == block_formats.INT8_ELEMENT:  # k / 64, |k| <= 127
        return Plan("mx", TensorProto.INT8, np.int8, INT16_OPSET, scale=2.0 ** -6,
                    clip=127.0, block_size=fmt.block_size, emax=fmt.emax_element)
    element = fmt.element
    key = (element.exponent_bits, element.mantissa_bits, element.specials)
    if key not in _FLOAT8 or _FLOAT8[key][1] != element.bias:
        raise ValueError(f"format {name}: its element {element.name or element!r} has no "
                         f"ONNX QuantizeLinear type that ONNX Runtime runs. {OFFERS}")
    onnx_type, _, dtype = _FLOAT8[key]
    return Plan("mx", onnx_type, dtype, INT16_OPSET, block_size=fmt.block_size,
                emax=fmt.emax_element)


def codes(plan_, values, scale):
    """The stored codes of rounded FP32 `values` (`values / scale` in the plan's
    type), checked to give back `values` exactly."""
    scaled = (values.astype(np.float64) / scale).astype(np.float32)
    if plan_.kind == "dfp" or plan_.onnx_type == TensorProto.INT8:
        stored = np.rint(scaled).astype(plan_.dtype)
    else:
        stored = scaled.astype(plan_.dtype)
    back = stored.astype(np.float32).astype(np.float64) * scale
    if not np.array_equal(back.astype(np.float32), values, equal_nan=True):
        raise RuntimeError("tfhfp8.export: a quantized weight is not a code of its ONNX "
                           "type times its scale (a bug: please report it)")
    return stored


def block_exponents(values, plan_):
    """MX block scale exponents (OCP 'floor') of `values` blocked along the last axis:
    `clip(floor(log2(amax)) - emax, -127, 127)`, -127 for an all-zero block."""
    size = values.shape[-1]
    blocks = -(-size // plan_.block_size)
    padded = np.zeros(values.shape[:-1] + (blocks * plan_.block_size,), np.float64)
    padded[..., :size] = np.abs(values)
    amax = padded.reshape(values.shape[:-1] + (blocks, plan_.block_size)).max(-1)
    exponent = np.frexp(np.where(amax > 0, amax, 1.0))[1] - 1  # floor(log2(amax))
    exponent = np.where(amax > 0, exponent - plan_.emax, -127)
    return np.clip(exponent, -127, 127)
