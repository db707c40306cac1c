// Op registration for tfhfp8's quantization kernels.

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"

namespace tfhfp8 {

REGISTER_OP("Hfp8QuantizeFloat")
    .Input("x: T")
    .Input("seed: int64")
    .Output("y: T")
    .Attr("T: {float, double}")
    .Attr("exponent_bits: int")
    .Attr("mantissa_bits: int")
    .Attr("bias: int")
    .Attr("specials: {'ieee', 'fn', 'fnuz', 'finite'}")
    .Attr("subnormals: bool")
    .Attr("rounding: {'nearest_even', 'stochastic', 'toward_zero'}")
    .Attr("saturate: bool")
    .SetShapeFn(tensorflow::shape_inference::UnchangedShape)
    .Doc(R"doc(
Rounds x to the nearest values of a binary floating-point format (see tfhfp8.FloatFormat).
seed: int64 scalar for stochastic rounding; the same seed gives the same bits.
)doc");

REGISTER_OP("Hfp8QuantizeFixed")
    .Input("x: T")
    .Input("exponent: int32")
    .Input("inner: int64")
    .Input("seed: int64")
    .Output("y: T")
    .Attr("T: {float, double}")
    .Attr("bits: int")
    .Attr("rounding: {'nearest_even', 'stochastic', 'toward_zero'}")
    .Attr("saturate: bool")
    .SetShapeFn(tensorflow::shape_inference::UnchangedShape)
    .Doc(R"doc(
Rounds x to multiples of 2^exponent[j], j = (flat index / inner) % size(exponent):
dynamic fixed point with one shared exponent per slice (see tfhfp8.DynamicFixedPoint).
)doc");

}  // namespace tfhfp8
