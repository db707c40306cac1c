"""The block-scaled formats under their former path: see `tfhfp8.formats.block`.

Kept so that `tfhfp8.block_formats.BlockScaled` and its constants stay importable.
"""

from tfhfp8.formats.block import (E8M0, FLOAT32, INT8_ELEMENT, NAMED, SCALE_ROUNDINGS,
                                  BlockScaled)

__all__ = ["BlockScaled", "E8M0", "FLOAT32", "INT8_ELEMENT", "NAMED", "SCALE_ROUNDINGS"]
