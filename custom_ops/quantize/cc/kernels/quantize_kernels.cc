// CPU kernels of Hfp8QuantizeFloat, Hfp8QuantizeFixed, Hfp8QuantizeDfp and
// Hfp8CpuVariant, on TF's intra-op threads. The per-element loops come from the CPU
// variant that cpu_dispatch.h selects; this file is compiled for the baseline only.

#include <algorithm>
#include <mutex>
#include <string>

#include "cpu_dispatch.h"
#include "format_attrs.h"
#include "kernel_util.h"
#include "rounding.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tfhfp8 {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShapeUtils;
using tensorflow::errors::InvalidArgument;

namespace {

// Shared exponents k lie in [smallest subnormal exponent, largest exponent + 1]; the
// top one makes the largest magnitudes round to inf, as on the TF-ops backend.
template <typename T>
constexpr int MinSharedExponent() {
  return 1 - Container<T>::kExponentBias - Container<T>::kMantissa;
}
template <typename T>
constexpr int MaxSharedExponent() {
  return Container<T>::kExponentBias + 1;
}

// Rounds in[0, n) to multiples of 2^k[run % slots], one run per `inner` elements.
template <typename T>
void RunFixed(OpKernelContext* context, const Loops& loops, Rounding rounding, int bits,
              int random_bits, bool saturate, const T* in, T* out, int64_t n, const int32_t* k,
              int64_t slots, int64_t inner, int64_t seed) {
  using UInt = typename Container<T>::UInt;
  const FixedLoop<T> loop = TypedLoops<T>::Fixed(loops, rounding);
  const Keys keys = MakeSeedKeys(seed);
  const UInt max_mantissa = (UInt{1} << (bits - 1)) - 1;
  ParallelFor(context, n, kCostPerElement, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t run = i / inner;
      const int64_t stop = std::min(end, (run + 1) * inner);
      const int exponent = k[run % slots];
      const UInt inf_magnitude =
          saturate ? ScaledValueBits<T>(max_mantissa, exponent) : InfBits<T>();
      loop(in, out, i, stop, exponent, inf_magnitude, random_bits, keys);
      i = stop;
    }
  });
}

// The shared exponent of dynamic fixed point for a tensor whose largest finite
// magnitude has the bits `largest` (mirrors tf_backend.shared_exponents):
// E_s = E_max - (bits - 2), one more when max|x| would round up to 2^(bits-1).
template <typename T>
int SharedExponent(typename Container<T>::UInt largest, int bits, Rounding rounding) {
  using C = Container<T>;
  using UInt = typename C::UInt;
  constexpr int p = C::kMantissa;
  if (largest == 0) return MinSharedExponent<T>();
  int e_max;
  UInt sig;  // significand of max|x| with its leading one at bit p
  const int field = static_cast<int>(largest >> p);
  if (field > 0) {
    e_max = field - C::kExponentBias;
    sig = (largest & ((UInt{1} << p) - 1)) | (UInt{1} << p);
  } else {  // subnormal: normalize the integer mantissa
    int top = 0;
    while ((largest >> (top + 1)) != 0) ++top;
    e_max = top + MinSharedExponent<T>();
    sig = largest << (p - top);
  }
  // max|x| * 2^-(E_max - (bits-2)) = sig / 2^p * 2^(bits-2) against the largest mantissa
  // 2^(bits-1) - 1 (the roundings that may round up beyond it: stochastic and directed)
  // or 2^(bits-1) - 1/2 (nearest); toward zero never rounds up.
  const UInt top_sig = UInt{1} << (p + 1);
  const bool nearest = rounding == Rounding::kNearestEven || rounding == Rounding::kNearestAway;
  bool bump = false;
  if (nearest) {
    bump = sig >= top_sig - (UInt{1} << (p + 1 - bits));
  } else if (rounding != Rounding::kTowardZero) {
    bump = sig > top_sig - (UInt{1} << (p + 2 - bits));
  }
  const int exponent = e_max - (bits - 2) + (bump ? 1 : 0);
  return std::max(exponent, MinSharedExponent<T>());
}

}  // namespace

template <typename T>
class QuantizeFloatOp : public OpKernel {
 public:
  explicit QuantizeFloatOp(OpKernelConstruction* context) : OpKernel(context) {
    FloatFormatSpec f;
    RoundingOptions options;
    OP_REQUIRES_OK(context, ReadFloatFormatAttrs(context, "", 23, &f));
    OP_REQUIRES_OK(context, ReadRoundingAttrs(context, &rounding_, &options.saturate));
    OP_REQUIRES_OK(context, context->GetAttr("propagate_inf", &options.propagate_inf));
    OP_REQUIRES_OK(context, ReadRandomBits(context, rounding_, &options.random_bits));
    params32_ = MakeFloatParams<float>(f, options);
    params64_ = MakeFloatParams<double>(f, options);
  }

  void Compute(OpKernelContext* context) override {
    const Loops* loops;
    int64_t seed = 0;
    OP_REQUIRES_OK(context, StartQuantize(context, 1, &loops, &seed));
    const Tensor& input = context->input(0);
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, OutputLikeInput(context, &output));
    const FloatLoop<T> loop = TypedLoops<T>::Float(*loops, rounding_);
    const FloatParams<T>& params = Params(static_cast<T*>(nullptr));
    const T* in = input.flat<T>().data();
    T* out = output->flat<T>().data();
    const Keys keys = MakeSeedKeys(seed);
    ParallelFor(context, input.NumElements(), kCostPerElement,
                [&](int64_t begin, int64_t end) { loop(in, out, begin, end, params, keys); });
  }

 private:
  const FloatParams<float>& Params(float*) const { return params32_; }
  const FloatParams<double>& Params(double*) const { return params64_; }

  FloatParams<float> params32_;
  FloatParams<double> params64_;
  Rounding rounding_;
};

// Reads the attributes shared by the dynamic-fixed-point ops.
absl::Status ReadFixedAttrs(OpKernelConstruction* context, int* bits, Rounding* rounding,
                            int* random_bits, bool* saturate) {
  TF_RETURN_IF_ERROR(context->GetAttr("bits", bits));
  TF_RETURN_IF_ERROR(ReadRoundingAttrs(context, rounding, saturate));
  TF_RETURN_IF_ERROR(ReadRandomBits(context, *rounding, random_bits));
  if (*bits < 2 || *bits > 24) return InvalidArgument("bits must be in [2, 24], got ", *bits);
  return absl::OkStatus();
}

template <typename T>
class QuantizeFixedOp : public OpKernel {
 public:
  explicit QuantizeFixedOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, ReadFixedAttrs(context, &bits_, &rounding_, &random_bits_,
                                           &saturate_));
  }

  void Compute(OpKernelContext* context) override {
    const Loops* loops;
    OP_REQUIRES_OK(context, SelectLoopsOrError(&loops));
    const Tensor& input = context->input(0);
    const Tensor& exponent = context->input(1);
    const Tensor& inner_tensor = context->input(2);
    OP_REQUIRES(context, exponent.dims() <= 1,
                InvalidArgument("exponent must be a scalar or a vector, got shape ",
                                exponent.shape().DebugString()));
    OP_REQUIRES(context, TensorShapeUtils::IsScalar(inner_tensor.shape()),
                InvalidArgument("inner must be a scalar, got shape ",
                                inner_tensor.shape().DebugString()));
    int64_t seed = 0;
    OP_REQUIRES_OK(context, ReadSeed(context->input(3), &seed));
    int64_t inner = inner_tensor.scalar<int64_t>()();
    const int64_t slots = exponent.NumElements();
    const int64_t n = input.NumElements();
    if (n == 0) {  // nothing to round; an empty slice axis gives no exponents at all
      context->set_output(0, input);
      return;
    }
    OP_REQUIRES(context, inner >= 1, InvalidArgument("inner must be >= 1, got ", inner));
    OP_REQUIRES(context, slots >= 1, InvalidArgument("exponent must not be empty"));
    // Divisions, not a product: inner * slots may overflow.
    OP_REQUIRES(context, n % inner == 0 && (n / inner) % slots == 0,
                InvalidArgument("inner * size(exponent) must divide the size of x; got inner=",
                                inner, ", size(exponent)=", slots, ", size(x)=", n));
    if (slots == 1) inner = n;  // one run: the whole tensor
    const int32_t* k = exponent.flat<int32_t>().data();
    for (int64_t j = 0; j < slots; ++j) {
      OP_REQUIRES(context, k[j] >= MinSharedExponent<T>() && k[j] <= MaxSharedExponent<T>(),
                  InvalidArgument("exponent must be in [", MinSharedExponent<T>(), ", ",
                                  MaxSharedExponent<T>(), "], got ", k[j]));
    }
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, OutputLikeInput(context, &output));
    RunFixed<T>(context, *loops, rounding_, bits_, random_bits_, saturate_,
                input.flat<T>().data(),
                output->flat<T>().data(), n, k, slots, inner, seed);
  }

 private:
  int bits_;
  int random_bits_;
  bool saturate_;
  Rounding rounding_;
};

// Dynamic fixed point with one shared exponent for the whole tensor, in two passes
// over it: the largest finite magnitude (in parallel), then the rounding.
template <typename T>
class QuantizeDfpOp : public OpKernel {
 public:
  explicit QuantizeDfpOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, ReadFixedAttrs(context, &bits_, &rounding_, &random_bits_,
                                           &saturate_));
  }

  void Compute(OpKernelContext* context) override {
    using UInt = typename Container<T>::UInt;
    const Loops* loops;
    int64_t seed = 0;
    OP_REQUIRES_OK(context, StartQuantize(context, 1, &loops, &seed));
    const Tensor& input = context->input(0);
    const T* in = input.flat<T>().data();
    const int64_t n = input.NumElements();
    const MaxAbsLoop<T> max_abs = TypedLoops<T>::MaxAbs(*loops);
    UInt largest = 0;
    std::mutex mutex;
    ParallelFor(context, n, kCostPerElement, [&](int64_t begin, int64_t end) {
      const UInt part = max_abs(in, begin, end);
      std::lock_guard<std::mutex> lock(mutex);
      largest = std::max(largest, part);
    });
    const int32_t k = SharedExponent<T>(largest, bits_, rounding_);
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, OutputLikeInput(context, &output));
    Tensor* exponent = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(1, {}, &exponent));
    exponent->scalar<int32_t>()() = k;
    if (n == 0) return;
    RunFixed<T>(context, *loops, rounding_, bits_, random_bits_, saturate_, in,
                output->flat<T>().data(), n, &k, 1, n, seed);
  }

 private:
  int bits_;
  int random_bits_;
  bool saturate_;
  Rounding rounding_;
};

// The CPU variant the kernels run now, and those this CPU supports.
class CpuVariantOp : public OpKernel {
 public:
  explicit CpuVariantOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Loops* loops;
    OP_REQUIRES_OK(context, SelectLoopsOrError(&loops));
    Tensor* active = nullptr;
    Tensor* supported = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, {}, &active));
    OP_REQUIRES_OK(context, context->allocate_output(1, {}, &supported));
    active->scalar<tensorflow::tstring>()() = loops->name;
    supported->scalar<tensorflow::tstring>()() = SupportedVariants();
  }
};

#define REGISTER_KERNELS(T)                                                                   \
  REGISTER_KERNEL_BUILDER(Name("Hfp8QuantizeFloat").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          QuantizeFloatOp<T>);                                                \
  REGISTER_KERNEL_BUILDER(Name("Hfp8QuantizeFixed").Device(DEVICE_CPU).TypeConstraint<T>("T"), \
                          QuantizeFixedOp<T>);                                                \
  REGISTER_KERNEL_BUILDER(Name("Hfp8QuantizeDfp").Device(DEVICE_CPU).TypeConstraint<T>("T"),   \
                          QuantizeDfpOp<T>);

REGISTER_KERNELS(float);
REGISTER_KERNELS(double);
#undef REGISTER_KERNELS

REGISTER_KERNEL_BUILDER(Name("Hfp8CpuVariant").Device(DEVICE_CPU), CpuVariantOp);

}  // namespace tfhfp8
