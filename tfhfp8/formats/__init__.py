"""Number formats: what a quantizer rounds to (the bottom floor of tfhfp8).

A format is described once, here; both backends of `tfhfp8.quantize` read their
constants from these objects.

- `FloatFormat`, `DynamicFixedPoint` (`tfhfp8.formats.scalar`): every element rounded
  on its own (every float type of ml_dtypes is a `FloatFormat`).
- `BlockScaled` (`tfhfp8.formats.block`): blocks of elements sharing one scale
  (OCP MX: `mxfp8_e4m3`, ..., `mxint8`; NVIDIA's `nvfp4`; FP32 scales per tensor, per
  1 x 128 block or per 128 x 128 tile).
- `get`, `names`, `serialize` (`tfhfp8.formats.named`): every named format.
- `ROUNDINGS` (`tfhfp8.formats.roundings`): the rounding names.

Named formats are reachable by their ml_dtypes names wherever a format is accepted:

>>> import tfhfp8
>>> tfhfp8.formats.get("hfp8_fwd").max
30.0
>>> tfhfp8.formats.get("float8_e5m2").min_subnormal == 2.0**-16
True
"""

from tfhfp8.formats.block import BlockScaled
from tfhfp8.formats.named import REGISTRY, get, names, serialize
from tfhfp8.formats.roundings import ROUNDINGS
from tfhfp8.formats.scalar import SPECIALS, DynamicFixedPoint, FloatFormat, check_int

__all__ = ["BlockScaled", "DynamicFixedPoint", "FloatFormat", "REGISTRY", "ROUNDINGS",
           "SPECIALS", "check_int", "get", "names", "serialize"]
