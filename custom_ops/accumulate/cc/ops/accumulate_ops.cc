// Op registration for tfhfp8's emulated-accumulation matmuls (see tfhfp8.Accumulator).

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfhfp8 {

using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

namespace {

// a: [B, M, K], b: [B, K, N] -> c: [B, M, N], and a scalar count.
absl::Status MatmulShape(InferenceContext* c) {
  ShapeHandle a, b;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &a));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 3, &b));
  DimensionHandle batch, k;
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(a, 0), c->Dim(b, 0), &batch));
  TF_RETURN_IF_ERROR(c->Merge(c->Dim(a, 2), c->Dim(b, 1), &k));
  c->set_output(0, c->MakeShape({batch, c->Dim(a, 1), c->Dim(b, 2)}));
  c->set_output(1, c->Scalar());
  return absl::OkStatus();
}

}  // namespace

#define TFHFP8_FORMAT_ATTRS(prefix)                             \
  .Attr(prefix "exponent_bits: int")                            \
      .Attr(prefix "mantissa_bits: int")                        \
      .Attr(prefix "bias: int")                                 \
      .Attr(prefix "specials: {'ieee', 'fn', 'fnuz', 'finite'}") \
      .Attr(prefix "subnormals: bool")

REGISTER_OP("Hfp8AccumulatingMatmul")
    .Input("a: float")
    .Input("b: float")
    .Input("seed: int64")
    .Output("c: float")
    .Output("swamped: int64")
    TFHFP8_FORMAT_ATTRS("")
    TFHFP8_FORMAT_ATTRS("outer_")
    TFHFP8_FORMAT_ATTRS("products_")
    .Attr("has_products: bool")
    .Attr("rounding: {'nearest_even', 'stochastic', 'toward_zero'}")
    .Attr("saturate: bool")
    .Attr("chunk_size: int")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 0, &unused));
      return MatmulShape(c);
    })
    .Doc(R"doc(
c[b, i, j] = sum_k a[b, i, k] * b[b, k, j], each addition rounded to the accumulator
format once, from the exact sum (tfhfp8.Accumulator): chunks of chunk_size terms (0: one
chunk) summed into an outer sum rounded to outer_*; products rounded to products_* when
has_products. swamped: the inner additions of a nonzero term that left the sum unchanged.
)doc");

REGISTER_OP("Hfp8Int32Matmul")
    .Input("a: int32")
    .Input("b: int32")
    .Output("c: float")
    .Output("overflows: int64")
    .Attr("chunk_size: int")
    .Attr("overflow: {'wrap', 'saturate'}")
    .SetShapeFn(MatmulShape)
    .Doc(R"doc(
Integer mantissas summed exactly in a 32-bit two's-complement accumulator that wraps or
saturates on overflow (counted in overflows); every chunk_size products (0: never) the
partial sum is converted to float32 and added to a float32 total.
)doc");

REGISTER_OP("Hfp8FusedMatmul")
    .Input("a: float")
    .Input("b: float")
    .Output("c: float")
    .Output("swamped: int64")
    .Attr("a_min_exponent: int")
    .Attr("b_min_exponent: int")
    .Attr("group_size: int")
    .Attr("fraction_bits: int")
    .Attr("output_bits: int")
    .Attr("output_min_exponent: int")
    .Attr("output_rounding: {'nearest_even', 'toward_zero'}")
    .Attr("chunk_size: int")
    .Attr("a_blocked: bool = false")
    .Attr("a_block_emax: int = 0")
    .Attr("b_blocked: bool = false")
    .Attr("b_block_emax: int = 0")
    .Attr("block_size: int = 0")
    .Attr("partial_sum_size: int = 0")
    .SetShapeFn(MatmulShape)
    .Doc(R"doc(
A matrix unit's fused dot-adds (tfhfp8.fused_accumulation): groups of group_size
products and the accumulator, each term truncated to fraction_bits bits after the binary
point of the largest exponent, summed exactly and rounded once to output_bits mantissa
bits (smallest normal exponent output_min_exponent); chunk_size > 0: the sum is promoted
into an FP32 total every chunk_size products. An operand is OCP MX (one block per group,
largest element exponent *_block_emax) when *_blocked. With partial_sum_size > 0 (both
operands blocked, in blocks of block_size), each partial_sum_size products are summed
exactly first, one term whose exponent is its blocks' scale exponents (Blackwell's
mxf4nvf4 kind). swamped: nonzero products truncated to zero in groups whose terms are
all finite.
)doc");

}  // namespace tfhfp8
