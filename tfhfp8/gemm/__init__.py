"""GEMMs with emulated accumulation: `tfhfp8.matmul` and the convolutions of the layers.

Every product here is one GEMM `C[o] = sum_k A[m, k] B[k, n]` summed as a
`tfhfp8.Accumulator` says (`products.product`), on the accumulating kernels that
`tfhfp8.ops` chooses (the C++ kernels or the TF-ops ones, compiled by XLA); the
gradients are GEMMs of their own with their own accumulators (`products.three_gemms`):
`dA = dC @ B^T` (`"input_gradient"`), `dB = A^T @ dC` (`"weight_gradient"`).

- `products`: the GEMM, the accumulators per GEMM kind, the statistics, the custom
  gradient of three GEMMs, per-tensor scaled operands with their scales
  (`TensorScaled`);
- `matrix`: `matmul` (`tfhfp8.matmul`) and the layers' `layer_matmul`;
- `einsum`: two-operand einsums (EinsumDense, attention);
- `convolution` and `geometry`: convolutions (grouped, depthwise, transposed) as GEMMs
  of their patches;
- `axes`: along which axes each operand of a GEMM is blocked (block-scaled formats);
- `portable_conv`: Keras' convolution ops in a form every TensorFlow CPU kernel set runs.

The `layer_*` functions are the emulated layers' GEMMs: their operands are already
rounded by the layer, the output gradient too, and the policy checked the formats.
"""

from tfhfp8.gemm import axes, portable_conv
from tfhfp8.gemm.convolution import conv, layer_conv, layer_conv_transpose, layer_depthwise_conv
from tfhfp8.gemm.einsum import einsum_product, einsum_terms, layer_einsum
from tfhfp8.gemm.matrix import layer_matmul, matmul
from tfhfp8.gemm.products import (GEMM_KINDS, Stats, TensorScaled, accumulators,
                                  check_operands, is_tensor_scaled, product, three_gemms)

__all__ = ["GEMM_KINDS", "Stats", "TensorScaled", "accumulators", "axes", "check_operands",
           "conv", "einsum_product", "einsum_terms", "is_tensor_scaled", "layer_conv",
           "layer_conv_transpose",
           "layer_depthwise_conv", "layer_einsum", "layer_matmul", "matmul",
           "portable_conv", "product", "three_gemms"]
