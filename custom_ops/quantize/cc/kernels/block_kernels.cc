// CPU kernel of Hfp8QuantizeBlock (tfhfp8.BlockScaled), on TF's intra-op threads: the
// blocks are split over the threads; the loops (block_rounding.h) come from the CPU
// variant that cpu_dispatch.h selects. Compiled for the baseline only.

#include <algorithm>
#include <mutex>
#include <string>

#include "block_rounding.h"
#include "cpu_dispatch.h"
#include "format_attrs.h"
#include "kernel_util.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tfhfp8 {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;

namespace {

template <typename T>
FloatParams<T> Saturating(const FloatFormatSpec& f, int random_bits = 0) {
  RoundingOptions options;
  options.saturate = true;
  options.random_bits = random_bits;
  return MakeFloatParams<T>(f, options);
}

template <typename T>
BlockParams<T> MakeBlockParams(const FloatFormatSpec& element, const FloatFormatSpec* scale,
                               const std::string& scale_rounding, bool saturate,
                               int random_bits) {
  using UInt = typename Container<T>::UInt;
  BlockParams<T> p{};
  p.power_of_two = scale == nullptr;
  p.saturate = saturate;
  p.element = Saturating<T>(element, random_bits);
  p.emax = static_cast<int>(p.element.max_code >> element.mantissa_bits) - element.bias;
  p.ceil = scale_rounding == "ceil";
  p.rceil = scale_rounding == "rceil";
  p.max_fraction = p.element.max_bits & ((UInt{1} << Container<T>::kMantissa) - 1);
  p.element64 = Saturating<double>(element, random_bits);
  p.max_rcp = static_cast<float>(1.0 / FromBits<double>(p.element64.max_bits));
  if (scale != nullptr) p.scale64 = Saturating<double>(*scale);
  p.scale_toward_zero = scale_rounding == "floor";
  p.float32 = Saturating<double>(FloatFormatSpec{8, 23, 127, Specials::kIeee, true, true});
  p.s = 1.0;
  p.element_max_times_s = FromBits<double>(p.element64.max_bits);
  p.element_rounds_in_float32 = element.mantissa_bits <= 21 &&
                                p.element64.quantum_exponent > -125 &&
                                FromBits<double>(p.element64.max_bits) < 0x1p128;
  p.scale_rounds_in_float32 = scale != nullptr && scale->mantissa_bits <= 21 &&
                              p.scale64.quantum_exponent > -125 &&
                              FromBits<double>(p.scale64.max_bits) < 0x1p128;
  if (p.scale_rounds_in_float32) p.scale32 = Saturating<float>(*scale);
  return p;
}

}  // namespace

template <typename T>
class QuantizeBlockOp : public OpKernel {
 public:
  explicit QuantizeBlockOp(OpKernelConstruction* context) : OpKernel(context) {
    std::string scale, scale_rounding;
    FloatFormatSpec element{}, scale_format{};
    OP_REQUIRES_OK(context, context->GetAttr("axis", &axis_));
    OP_REQUIRES_OK(context, context->GetAttr("block_size", &block_size_));
    OP_REQUIRES_OK(context, context->GetAttr("scale", &scale));
    OP_REQUIRES_OK(context, context->GetAttr("scale_rounding", &scale_rounding));
    OP_REQUIRES_OK(context, context->GetAttr("tensor_scale", &tensor_scale_));
    OP_REQUIRES_OK(context, ReadRoundingAttrs(context, &rounding_, &saturate_));
    int random_bits = 0;
    OP_REQUIRES_OK(context, ReadRandomBits(context, rounding_, &random_bits));
    OP_REQUIRES(context, block_size_ >= 1 && block_size_ <= (1 << 16),
                InvalidArgument("block_size must be in [1, 65536], got ", block_size_));
    OP_REQUIRES_OK(context, ReadFloatFormatAttrs(context, "element_", 23, &element));
    const bool power_of_two = scale == "e8m0";
    if (power_of_two) {
      OP_REQUIRES(context, scale_rounding == "floor" || scale_rounding == "ceil" ||
                               scale_rounding == "rceil",
                  InvalidArgument("scale_rounding must be 'floor', 'ceil' or 'rceil' for "
                                  "scale='e8m0', "
                                  "got '", scale_rounding, "'"));
      OP_REQUIRES(context, !tensor_scale_,
                  InvalidArgument("tensor_scale=true needs scale='float'"));
    } else {
      OP_REQUIRES_OK(context, ReadFloatFormatAttrs(context, "scale_", 23, &scale_format));
      OP_REQUIRES(context, scale_rounding == "nearest_even" || scale_rounding == "floor",
                  InvalidArgument("scale_rounding must be 'nearest_even' or 'floor' for "
                                  "scale='float', got '", scale_rounding, "'"));
    }
    const FloatFormatSpec* scale_attrs = power_of_two ? nullptr : &scale_format;
    params32_ =
        MakeBlockParams<float>(element, scale_attrs, scale_rounding, saturate_, random_bits);
    params64_ =
        MakeBlockParams<double>(element, scale_attrs, scale_rounding, saturate_, random_bits);
    scale_max_ = power_of_two ? 0.0 : FromBits<double>(params64_.scale64.max_bits);
  }

  void Compute(OpKernelContext* context) override {
    using UInt = typename Container<T>::UInt;
    const Loops* loops;
    int64_t seed = 0;
    OP_REQUIRES_OK(context, StartQuantize(context, 1, &loops, &seed));
    const Tensor& input = context->input(0);
    const int rank = input.dims();
    const int dims = std::max(rank, 1);  // a scalar is one block of one element
    OP_REQUIRES(context, axis_ >= -dims && axis_ < dims,
                InvalidArgument("axis ", axis_, " of the block-scaled format is out of range "
                                "for a tensor of rank ", rank));
    const int axis = (axis_ + dims) % dims;
    const int64_t n_elements = input.NumElements();
    if (n_elements == 0) {
      context->set_output(0, input);
      return;
    }
    BlockShape shape{};
    shape.outer = 1;
    shape.inner = 1;
    shape.n = rank == 0 ? 1 : input.dim_size(axis);
    for (int i = 0; i < rank; ++i) {
      if (i < axis) shape.outer *= input.dim_size(i);
      if (i > axis) shape.inner *= input.dim_size(i);
    }
    shape.block_size = block_size_;
    shape.blocks = (shape.n + block_size_ - 1) / block_size_;
    shape.tile = shape.inner == 1 ? 1 : kBlockTile;
    shape.tiles = (shape.inner + shape.tile - 1) / shape.tile;

    const T* in = input.flat<T>().data();
    BlockParams<T> params = Params(static_cast<T*>(nullptr));
    if (tensor_scale_) {
      // NVFP4's tensor scale S = fl32(amax_tensor / (max_scale * max_element)), from the
      // largest magnitude of the whole tensor: a first pass.
      const TensorAmaxLoop<T> amax_loop = TypedLoops<T>::TensorAmax(*loops);
      UInt largest = 0;
      std::mutex mutex;
      ParallelFor(context, n_elements, kCostPerElement, [&](int64_t begin, int64_t end) {
        const UInt part = amax_loop(in, begin, end, saturate_);
        std::lock_guard<std::mutex> lock(mutex);
        largest = std::max(largest, part);
      });
      const double amax = ToFloat64(largest);
      const double element_max = FromBits<double>(params.element64.max_bits);
      double s = QuantizeFloatElement<double, Rounding::kNearestEven>(
          amax / (scale_max_ * element_max), params.float32, 0);
      s = amax == 0 ? 1.0 : std::max(s, 0x1p-149);
      params.s = s;
      params.element_max_times_s = element_max * s;
    }

    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, OutputLikeInput(context, &output));
    T* out = output->flat<T>().data();
    const BlockLoop<T> loop = TypedLoops<T>::Block(*loops, rounding_);
    const Keys keys = MakeSeedKeys(seed);
    const int64_t units = shape.outer * shape.blocks * shape.tiles;
    // A unit's cost: its elements, each a few vectorized integer steps (float scales:
    // a float64 division too).
    const int64_t per_unit = std::min<int64_t>(block_size_, shape.n) *
                             std::min<int64_t>(shape.tile, shape.inner) *
                             (params.power_of_two ? 2 : 4) * kCostPerElement;
    ParallelFor(context, units, per_unit, [&](int64_t begin, int64_t end) {
      loop(in, out, shape, begin, end, params, keys);
    });
  }

 private:
  const BlockParams<float>& Params(float*) const { return params32_; }
  const BlockParams<double>& Params(double*) const { return params64_; }

  int axis_;
  int block_size_;
  bool tensor_scale_;
  bool saturate_;
  Rounding rounding_;
  double scale_max_;
  BlockParams<float> params32_;
  BlockParams<double> params64_;
};

REGISTER_KERNEL_BUILDER(Name("Hfp8QuantizeBlock").Device(DEVICE_CPU).TypeConstraint<float>("T"),
                        QuantizeBlockOp<float>);
REGISTER_KERNEL_BUILDER(Name("Hfp8QuantizeBlock").Device(DEVICE_CPU).TypeConstraint<double>("T"),
                        QuantizeBlockOp<double>);

}  // namespace tfhfp8
