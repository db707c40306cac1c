"""Block-scaled formats: OCP Microscaling (MX), NVFP4 and their relatives.

A tensor is cut into blocks of `block_size` consecutive elements along `axis` (the
last block may be shorter). Each block gets one scale computed from its absolute
maximum `amax`; its elements are divided by the scale, rounded to the element format
(saturating at the element's max) and multiplied back.

Scales (`scale_rounding`):

- `"float8_e8m0fnu"` (OCP MX v1.0, §6.3), powers of two `2^-127 .. 2^127`:
  - `"floor"` (OCP): `2^(floor(log2(amax)) - emax)`, `emax` the exponent of the
    element format's largest value (E4M3: 8, E5M2: 15, E3M2: 4, E2M3: 2, E2M1: 2,
    INT8: 0). The block's largest exponent lands on the element's largest exponent;
    elements between the element max and `2^(emax+1)` saturate.
  - `"ceil"`: the smallest power of two `>= amax / max_element`, so that nothing
    saturates (the round-up scale of Mishra et al. 2025, "Recipes for pre-training
    LLMs with MXFP8").
  - `"rceil"`: Transformer Engine's MXFP8 scale, as cuBLAS names it: the smallest power
    of two `>= fl32(amax * fl32(1 / max_element))` (TE's `float_to_e8m0(amax *
    max_norm_rcp)`; Blackwell's `cvt.rp.satfinite.ue8m0x2.f32`). It equals `"ceil"`
    except where that product is a float32 subnormal (amax below about
    `max_element * 2^-126`), whose coarser rounding can land on the power of two below
    (checked on 10^7 random amaxes for E4M3, E5M2, E2M1, E2M3 and E3M2 maxima); a float64
    block's amax is first rounded to float32.
  The exponent is clamped to `[-127, 127]`; an all-zero block gets `2^-127`.
- a `FloatFormat` (NVFP4: `float8_e4m3fn`; any other, P3109's signed and unsigned
  formats too, e.g. `p3109_k8p3ue`): `amax / max_element` (divided by the tensor scale
  when `tensor_scale=True`) rounded to the scale format with `"nearest_even"` (NVFP4)
  or `"floor"` (toward zero), saturating at its max (never negative: an unsigned scale
  format loses nothing). A block whose scale rounds to 0 becomes zeros, signed where the
  element has a -0.

Tensor scale (`tensor_scale=True`, float scale formats only; NVIDIA's NVFP4 two-level
scaling): `S = fl32(amax_tensor / (max_scale * max_element))` (for NVFP4
`amax_tensor / (448 * 6)`), one rounding to float32 of the exact quotient; `S = 1`
when the tensor is all zeros, at least `2^-149`. The block scales are then computed
from `amax / (max_element * S)` and the value of an element is `q * s_block * S`.
(Transformer Engine stores the reciprocal `2688 / amax_tensor` and multiplies by a
rounded `S_enc / s_block`; here every quotient is exact before the one rounding that
defines each result, see `tfhfp8.ops.tf_block`.)

FP32 block scales (`scale="float32"` with a `block_size`, or 2D tiles `block_shape=(rows,
cols)` over the last two axes; Transformer Engine's Float8BlockScaling, the recipe of
DeepSeek-V3, arXiv 2412.19437 section 3.3: 1 x 128 activations and gradients, 128 x 128
weights), in float32 operations in the order of TE's reference
(`tests/pytorch/references/quantize_scale_calc.py`, `blockwise_quantizer_reference.py`):
`scale = fl32(max_element / amax)` (FLT_MAX where that overflows, 1 where `amax` is 0;
`scale_rounding="power_of_two"`: rounded down to a power of two, TE's `pow_2_scales`,
0 for an infinite amax), elements `round(clamp(fl32(x * scale)))`, values
`fl32(q * fl32(1 / scale))`; each float32 operation rounded once, subnormals included.
A block holding an infinity has scale 0 and becomes NaN, as in TE's reference.

Per-tensor scaling (`block_size=None`, `scale="float32"`): the whole tensor is one block
with an FP32 scale, the recipe of NVIDIA's Transformer Engine (`DelayedScaling`) and of
Keras 3's float8 training (`keras.quantizers.compute_float8_scale`,
`quantize_and_dequantize`), in float32 arithmetic step by step as they compute it:
`s = 1 / fl32(fl32(max_element / amax) / 2^margin)` (`s = 1` when `amax` is 0 or not
finite), elements `round(fl32(x / s))` (saturating), values `fl32(q * s)`, IEEE float32
subnormals included. The factor `max_element / amax / 2^margin` is clamped to
[2^-126, 2^126], so that it and `s` stay normal float32 numbers: for a tensor whose amax
is below about 5e-36 (Transformer Engine clamps the factor at FLT_MAX; TensorFlow's CPU
would flush a subnormal `s` to 0), and for a huge amax with a large margin. The scale
is not a power of two, so `x / s` and `q * s` are float32 roundings of their own, as
on the hardware these recipes target (its FP32 multiply before the FP8 cast); they are
part of the format's definition. `amax_history=0` is current scaling (the amax of the
tensor being quantized); `amax_history=H > 0` is delayed scaling: an emulated layer
keeps, per GEMM operand, the last `H` amaxes and the scale in its state (saved with
the model) and quantizes with the scale computed from that history *before* this step
(Keras' order: the scale used at step `t` comes from the amaxes of steps `< t - 1`),
then records this step's amax. Outside a layer, `quantize(x, fmt, scale=s)` takes the
scale to use; without it the current amax is used.

Special values: a block holding a NaN, or an infinity with `saturate=False`, has a
NaN scale (E8M0's 0xFF): all its elements are NaN (as in Microsoft's microxcaling, the
reference code of the MX authors). With `saturate=True` an infinity counts as the
largest finite float32 (float64) value: the block gets the largest scale and the
infinity becomes `+-max_element * scale`.

>>> import tensorflow as tf, tfhfp8
>>> x = tf.constant([[1.0, 0.1, -3.0, 1000.0]])
>>> # Blocks [1, 0.1] (scale 2^-2) and [-3, 1000] (scale 2^7: 1000 saturates at 6 * 2^7).
>>> tfhfp8.quantize(x, tfhfp8.BlockScaled("float4_e2m1fn", block_size=2)).numpy().tolist()
[[1.0, 0.125, -0.0, 768.0]]
"""

import dataclasses
from typing import Optional, Tuple, Union

import keras

from tfhfp8.formats import scalar

E8M0 = "float8_e8m0fnu"
FLOAT32 = "float32"  # the per-tensor scale of Transformer Engine / Keras float8
SCALE_ROUNDINGS = {"power_of_two": ("floor", "ceil", "rceil"), "float": ("nearest_even", "floor"),
                   "tensor": ("nearest_even",), "float32_blocks": ("nearest_even", "power_of_two")}

# MXINT8's element (OCP MX v1.0): an 8-bit integer with an implicit scale 2^-6, used
# symmetrically (+-127/64, as Microsoft's microxcaling; gfloat also allows -128/64).
# Emulated exactly by a sign-magnitude float with one exponent bit and bias 1: E=0
# gives k/64 for k < 64, E=1 gives k/64 for 64 <= k <= 127; "fnuz": no negative zero,
# like two's complement.
INT8_ELEMENT = scalar.FloatFormat(1, 6, bias=1, specials="fnuz", name="mx_int8")


def _element(value):
    if value == "int8" or value == "mx_int8":
        return INT8_ELEMENT
    try:
        element = scalar.get(value)
    except (TypeError, ValueError) as error:
        raise type(error)(f"element: {error}") from None
    if not isinstance(element, scalar.FloatFormat):
        raise ValueError(f"element must be a FloatFormat (or a name of one, or 'int8'), "
                         f"got {element!r}")
    return element


@keras.saving.register_keras_serializable(package="tfhfp8")
@dataclasses.dataclass(frozen=True)
class BlockScaled:
    """A block-scaled format: blocks of `block_size` elements sharing one scale.

    Args:
      element: the element format: a `FloatFormat` or its name (`"float8_e4m3fn"`,
        `"float4_e2m1fn"`, `"p3109_k8p3ue"`, ...), or `"int8"` (MXINT8's elements,
        `k / 64` for `|k| <= 127`). An unsigned (P3109) element takes its block's scale
        from the magnitudes of all its elements (as gfloat's `compute_scale_amax`) and
        rounds a negative element to +0 (P3109's saturation to `[0, max]`; gfloat
        leaves negative inputs of unsigned formats undefined).
      block_size: elements per block, 1..65536 (OCP MX: 32, NVFP4: 16), or None for
        per-tensor scaling (the whole tensor one block; needs `scale="float32"`).
      scale: `"float8_e8m0fnu"` (power-of-two scales, OCP MX), a `FloatFormat` or
        name (NVFP4: `"float8_e4m3fn"`; P3109's, signed or unsigned:
        `"p3109_k8p3ue"`, ...), or `"float32"` (with `block_size=None`: per tensor,
        Transformer Engine / Keras float8; with blocks: TE's Float8BlockScaling).
      axis: the axis the blocks run along when quantizing a tensor directly. In the
        GEMMs of emulated layers (`Dense`, `EinsumDense`, the convolutions,
        attention), each operand is blocked along that GEMM's own reduction axis
        instead (see `tfhfp8.gemm.axes`).
      tensor_scale: a per-tensor FP32 scale above the block scales (NVFP4); only
        with a `FloatFormat` scale.
      scale_rounding: how `amax` becomes a scale: `"floor"` or `"ceil"` for
        `"float8_e8m0fnu"` (or `"rceil"`, Transformer Engine's and cuBLAS' round-up),
        `"nearest_even"` or `"floor"` for a float scale format,
        `"nearest_even"` or `"power_of_two"` for FP32 block scales;
        None: `"floor"` (OCP MX) or `"nearest_even"` (NVFP4). See the module
        docstring for the exact definitions.
      margin: per-tensor scaling only: the scale leaves `2^margin` of headroom
        (Transformer Engine's `margin`), 0..64.
      amax_history: per-tensor scaling only: 0 for current scaling, else the length
        of the amax history of delayed scaling (Keras and Transformer Engine: 1024).
      name: optional display name.
      block_shape: `(rows, cols)`: 2D tiles over the last two axes, `block_size` set to
        `cols` (any scale: 128 x 128 FP32 scales for DeepSeek-V3, 16 x 16 for NVFP4
        weights; with E8M0 and float scales the tiles run as TF ops on either backend). In a layer's GEMM a tiled operand is tiled in its
        GEMM layout `[K, rest]` (reduction axes first) and quantized once for the
        forward and the gradient GEMMs, as TE quantizes a 128 x 128 weight.

    Example:

    >>> import tfhfp8
    >>> fmt = tfhfp8.formats.get("mxfp8_e4m3")
    >>> fmt.block_size, fmt.element.name, fmt.emax_element
    (32, 'float8_e4m3fn', 8)
    >>> tfhfp8.BlockScaled("float4_e2m1fn", 16, scale="float8_e4m3fn",
    ...                    tensor_scale=True) == tfhfp8.formats.get("nvfp4")
    True
    """

    element: scalar.FloatFormat
    block_size: int = 32
    scale: Union[str, scalar.FloatFormat] = E8M0
    axis: int = -1
    tensor_scale: bool = False
    scale_rounding: Optional[str] = None
    name: Optional[str] = dataclasses.field(default=None, compare=False)
    margin: int = 0
    amax_history: int = 0
    block_shape: Optional[Tuple[int, int]] = None

    def __post_init__(self):
        object.__setattr__(self, "element", _element(self.element))
        self._check_block_shape()
        per_tensor = self.block_size is None
        if not per_tensor:
            object.__setattr__(self, "block_size",
                               scalar.check_int("block_size", self.block_size, 1, 1 << 16))
        object.__setattr__(self, "axis", scalar.check_int("axis", self.axis, -32, 31))
        object.__setattr__(self, "margin", scalar.check_int("margin", self.margin, 0, 64))
        object.__setattr__(self, "amax_history", scalar.check_int(
            "amax_history", self.amax_history, 0, 1 << 20))
        if per_tensor and self.scale != FLOAT32:
            raise ValueError(
                f"block_size=None (per-tensor scaling) goes with scale={FLOAT32!r}; got "
                f"scale={self.scale!r}")
        if not per_tensor and (self.margin or self.amax_history):
            raise ValueError("margin and amax_history are for per-tensor scaling "
                             "(block_size=None) only")
        scale = self.scale
        if scale not in (E8M0, FLOAT32):
            try:
                scale = scalar.get(scale)
            except (TypeError, ValueError) as error:
                raise type(error)(f"scale: {error}") from None
            if not isinstance(scale, scalar.FloatFormat):
                raise ValueError(
                    f"scale must be {E8M0!r} (power-of-two scales), a FloatFormat or the "
                    f"name of one ('float8_e4m3fn', 'p3109_k8p3ue', ...), or {FLOAT32!r} "
                    f"with block_size=None; got {scale!r}")
            object.__setattr__(self, "scale", scale)
        kind = {E8M0: "power_of_two", FLOAT32: "tensor" if per_tensor else "float32_blocks"
                }.get(scale, "float")
        rounding = self.scale_rounding
        if rounding is None:
            rounding = SCALE_ROUNDINGS[kind][0]
        if rounding not in SCALE_ROUNDINGS[kind]:
            raise ValueError(
                f"scale_rounding must be one of {SCALE_ROUNDINGS[kind]} for scale="
                f"{self.scale_name!r}, got {rounding!r}")
        object.__setattr__(self, "scale_rounding", rounding)
        if not isinstance(self.tensor_scale, bool):
            raise ValueError(f"tensor_scale must be True or False, got {self.tensor_scale!r}")
        if self.tensor_scale and kind != "float":
            raise ValueError(f"tensor_scale=True needs a float scale format (e.g. "
                             f"'float8_e4m3fn'), not scale={scale!r}")

    def _check_block_shape(self):
        """`block_shape=(rows, cols)`: tiles over the last two axes, `block_size` set to
        `cols`; `(1, cols)` is the 1D `block_size=cols`."""
        shape = self.block_shape
        if shape is None:
            return
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise ValueError(f"block_shape must be (rows, cols), got {shape!r}")
        rows = scalar.check_int("block_shape[0]", shape[0], 1, 1 << 16)
        cols = scalar.check_int("block_shape[1]", shape[1], 1, 1 << 16)
        if self.block_size not in (32, cols):  # 32: block_size's default
            raise ValueError(f"block_shape {tuple(shape)} sets block_size to {cols}; got "
                             f"block_size={self.block_size!r}")
        if self.axis != -1:
            raise ValueError(f"block_shape tiles the last two axes: axis must be -1, got "
                             f"{self.axis}")
        object.__setattr__(self, "block_size", cols)
        object.__setattr__(self, "block_shape", None if rows == 1 else (rows, cols))

    @property
    def tiles(self) -> bool:
        """True for 2D blocks (`block_shape` of more than one row)."""
        return self.block_shape is not None

    @property
    def float32_blocks(self) -> bool:
        """True for an FP32 scale per block or tile (Transformer Engine's
        Float8BlockScaling, DeepSeek-V3's recipe)."""
        return self.scale == FLOAT32 and not self.per_tensor

    @property
    def scale_name(self):
        return self.scale if isinstance(self.scale, str) else (
            self.scale.name or repr(self.scale))

    @property
    def power_of_two_scale(self) -> bool:
        return self.scale == E8M0

    @property
    def per_tensor(self) -> bool:
        """True for per-tensor scaling (one FP32 scale, `block_size=None`)."""
        return self.block_size is None

    @property
    def delayed(self) -> bool:
        """True for delayed per-tensor scaling (an amax history kept by the layer)."""
        return self.amax_history > 0

    @property
    def emax_element(self) -> int:
        """The exponent of the element format's largest value (OCP's `emax_elem`)."""
        return (self.element.max_code >> self.element.mantissa_bits) - self.element.bias

    @property
    def bits(self) -> float:
        """Average storage bits per element (element bits plus the shared scale)."""
        if self.per_tensor:
            return self.element.bits  # one float32 per tensor
        scale_bits = (8 if self.power_of_two_scale else 32 if self.float32_blocks
                      else self.scale.bits)
        rows = self.block_shape[0] if self.tiles else 1
        return self.element.bits + scale_bits / (self.block_size * rows)

    def get_config(self) -> dict:
        element = scalar.REGISTRY.serialize(self.element) if self.element != INT8_ELEMENT else "int8"
        scale = self.scale if isinstance(self.scale, str) else scalar.REGISTRY.serialize(self.scale)
        config = {"element": element, "block_size": self.block_size, "scale": scale,
                  "axis": self.axis, "tensor_scale": self.tensor_scale,
                  "scale_rounding": self.scale_rounding, "name": self.name}
        if self.per_tensor:  # block formats' configs stay as they were
            config.update(margin=self.margin, amax_history=self.amax_history)
        if self.tiles:
            config["block_shape"] = list(self.block_shape)
        return config

    @classmethod
    def from_config(cls, config: dict) -> "BlockScaled":
        return cls(**config)

    def __repr__(self):
        title = f"{self.name!r}, " if self.name else ""
        element = self.element.name or repr(self.element)
        extra = ", with a tensor scale" if self.tensor_scale else ""
        if self.per_tensor:
            how = (f"delayed, amax history {self.amax_history}" if self.delayed
                   else "current")
            return (f"BlockScaled({title}{element} per tensor, float32 scale, margin "
                    f"{self.margin}, {how})")
        blocks = (f"{self.block_shape[0]} x {self.block_size} tiles of the last two axes"
                  if self.tiles else f"{self.block_size} along axis {self.axis}")
        return (f"BlockScaled({title}{element} x {blocks}, scale "
                f"{self.scale_name}/{self.scale_rounding}{extra})")


def _named(name, element, block_size=32, **kwargs):
    return BlockScaled(element, block_size, name=name, **kwargs)


NAMED = [
    _named("mxfp8_e4m3", "float8_e4m3fn"),
    _named("mxfp8_e5m2", "float8_e5m2"),
    _named("mxfp6_e3m2", "float6_e3m2fn"),
    _named("mxfp6_e2m3", "float6_e2m3fn"),
    _named("mxfp4_e2m1", "float4_e2m1fn"),
    _named("mxint8", "int8"),
    # MXFP8 as Transformer Engine (MXFP8BlockScaling) and cuBLAS scale it: "RCEIL".
    _named("mxfp8_e4m3_rceil", "float8_e4m3fn", scale_rounding="rceil"),
    _named("mxfp8_e5m2_rceil", "float8_e5m2", scale_rounding="rceil"),
    _named("nvfp4", "float4_e2m1fn", 16, scale="float8_e4m3fn", tensor_scale=True),
    # NVFP4 weights in 16 x 16 tiles (arXiv 2509.25149; TE's NVFP4BlockScaling).
    _named("nvfp4_16x16", "float4_e2m1fn", block_shape=(16, 16), scale="float8_e4m3fn",
           tensor_scale=True),
    # Per-tensor FP32 scales (Transformer Engine / Keras float8): current scaling, and
    # delayed scaling with the default history of both (1024 steps) and margin 0.
    _named("e4m3_current", "float8_e4m3fn", None, scale=FLOAT32),
    _named("e5m2_current", "float8_e5m2", None, scale=FLOAT32),
    _named("e4m3_delayed", "float8_e4m3fn", None, scale=FLOAT32, amax_history=1024),
    _named("e5m2_delayed", "float8_e5m2", None, scale=FLOAT32, amax_history=1024),
    # FP32 scales per 1 x 128 block and per 128 x 128 tile (DeepSeek-V3; TE's
    # Float8BlockScaling with FP32 scales).
    _named("e4m3_1x128", "float8_e4m3fn", 128, scale=FLOAT32),
    _named("e4m3_128x128", "float8_e4m3fn", block_shape=(128, 128), scale=FLOAT32),
]
