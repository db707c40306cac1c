// Op registration for tfhfp8's block-scaled quantization kernel.

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfhfp8 {

using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

REGISTER_OP("Hfp8QuantizeBlock")
    .Input("x: T")
    .Input("seed: int64")
    .Output("y: T")
    .Attr("T: {float, double}")
    .Attr("axis: int")
    .Attr("block_size: int")
    .Attr("element_exponent_bits: int")
    .Attr("element_mantissa_bits: int")
    .Attr("element_bias: int")
    .Attr("element_specials: {'ieee', 'fn', 'fnuz', 'finite', 'p3109_extended', 'p3109_finite'}")
    .Attr("element_subnormals: bool")
    .Attr("element_signed: bool = true")
    .Attr("scale: {'e8m0', 'float'}")
    .Attr("scale_exponent_bits: int = 4")
    .Attr("scale_mantissa_bits: int = 3")
    .Attr("scale_bias: int = 7")
    .Attr("scale_specials: {'ieee', 'fn', 'fnuz', 'finite', 'p3109_extended', 'p3109_finite'} "
          "= 'fn'")
    .Attr("scale_subnormals: bool = true")
    .Attr("scale_signed: bool = true")
    .Attr("scale_rounding: {'floor', 'ceil', 'rceil', 'nearest_even'}")
    .Attr("tensor_scale: bool = false")
    .Attr("rounding: {'nearest_even', 'stochastic', 'toward_zero', 'nearest_away', "
          "'toward_positive', 'toward_negative', 'stochastic_bits', 'stochastic_odd_bits', "
          "'stochastic_fast_bits'}")
    .Attr("saturate: bool")
    .Attr("random_bits: int = 0")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle unused;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 0, &unused));
      c->set_output(0, c->input(0));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Rounds x to a block-scaled format (see tfhfp8.BlockScaled): blocks of block_size
consecutive elements along axis (the last one may be shorter), each with one scale
from its absolute maximum, an E8M0 power of two (scale='e8m0') or a FloatFormat
(scale='float', the scale_* attributes; P3109's too, scale_signed=false for an unsigned
one) within an optional per-tensor FP32 scale.
seed: int64 scalar for stochastic rounding; the same seed gives the same bits.
random_bits: r, 1..23, for the *_bits stochastic roundings (tfhfp8.formats.roundings).
)doc");

}  // namespace tfhfp8
