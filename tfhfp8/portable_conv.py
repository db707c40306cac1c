"""Moved to `tfhfp8.gemm.portable_conv`; this name stays for code that imports it."""

from tfhfp8.gemm.portable_conv import (conv, conv_transpose, depthwise_conv,  # noqa: F401
                                       to_channels_first, to_channels_last, zero_insert)
