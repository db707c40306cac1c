// Op registration for tfhfp8's quantization kernels.

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tfhfp8 {

using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

namespace {

// y has x's shape; the inputs named in `scalars` must be scalars, `exponent` (when
// given) a scalar or a vector.
absl::Status QuantizeShape(InferenceContext* c, std::initializer_list<int> scalars,
                           int exponent = -1) {
  ShapeHandle unused;
  for (int i : scalars) TF_RETURN_IF_ERROR(c->WithRank(c->input(i), 0, &unused));
  if (exponent >= 0) TF_RETURN_IF_ERROR(c->WithRankAtMost(c->input(exponent), 1, &unused));
  c->set_output(0, c->input(0));
  return absl::OkStatus();
}

// Every rounding of tfhfp8.formats.roundings; the *_bits ones take `random_bits`.
constexpr char kAllRoundings[] =
    "rounding: {'nearest_even', 'stochastic', 'toward_zero', 'nearest_away', "
    "'toward_positive', 'toward_negative', 'stochastic_bits', 'stochastic_odd_bits', "
    "'stochastic_fast_bits'}";

}  // namespace

REGISTER_OP("Hfp8QuantizeFloat")
    .Input("x: T")
    .Input("seed: int64")
    .Output("y: T")
    .Attr("T: {float, double}")
    .Attr("exponent_bits: int")
    .Attr("mantissa_bits: int")
    .Attr("bias: int")
    .Attr("specials: {'ieee', 'fn', 'fnuz', 'finite', 'p3109_extended', 'p3109_finite'}")
    .Attr("subnormals: bool")
    .Attr("signed: bool = true")
    .Attr(kAllRoundings)
    .Attr("random_bits: int = 0")
    .Attr("saturate: bool")
    .Attr("propagate_inf: bool = false")
    .SetShapeFn([](InferenceContext* c) { return QuantizeShape(c, {1}); })
    .Doc(R"doc(
Rounds x to the nearest values of a binary floating-point format (see tfhfp8.FloatFormat).
seed: int64 scalar for stochastic rounding; the same seed gives the same bits.
random_bits: r, 1..23, for the *_bits stochastic roundings (tfhfp8.formats.roundings).
propagate_inf: with saturate, infinities stay infinite (P3109's sat_propagate).
)doc");

REGISTER_OP("Hfp8QuantizeFixed")
    .Input("x: T")
    .Input("exponent: int32")
    .Input("inner: int64")
    .Input("seed: int64")
    .Output("y: T")
    .Attr("T: {float, double}")
    .Attr("bits: int")
    .Attr(kAllRoundings)
    .Attr("random_bits: int = 0")
    .Attr("saturate: bool")
    .SetShapeFn([](InferenceContext* c) { return QuantizeShape(c, {2, 3}, 1); })
    .Doc(R"doc(
Rounds x to multiples of 2^exponent[j], j = (flat index / inner) % size(exponent):
dynamic fixed point with one shared exponent per slice (see tfhfp8.DynamicFixedPoint).
)doc");

REGISTER_OP("Hfp8QuantizeDfp")
    .Input("x: T")
    .Input("seed: int64")
    .Output("y: T")
    .Output("exponent: int32")
    .Attr("T: {float, double}")
    .Attr("bits: int")
    .Attr(kAllRoundings)
    .Attr("random_bits: int = 0")
    .Attr("saturate: bool")
    .SetShapeFn([](InferenceContext* c) {
      TF_RETURN_IF_ERROR(QuantizeShape(c, {1}));
      c->set_output(1, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
Dynamic fixed point with one shared exponent for the whole tensor, chosen from its
largest finite magnitude in the same kernel: y = x rounded to multiples of 2^exponent.
)doc");

REGISTER_OP("Hfp8CpuVariant")
    .Output("active: string")
    .Output("supported: string")
    .SetIsStateful()  // it reads the environment: never constant-folded or cached
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Scalar());
      c->set_output(1, c->Scalar());
      return absl::OkStatus();
    })
    .Doc(R"doc(
The CPU variant of the quantization loops that runs now, and those this CPU supports.
)doc");

}  // namespace tfhfp8
