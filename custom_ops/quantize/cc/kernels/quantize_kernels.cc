// CPU kernels of Hfp8QuantizeFloat and Hfp8QuantizeFixed, on TF's intra-op threads.

#include <algorithm>
#include <string>

#include "rounding.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tfhfp8 {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::errors::InvalidArgument;

namespace {

Rounding ParseRounding(const std::string& name) {
  if (name == "stochastic") return Rounding::kStochastic;
  if (name == "toward_zero") return Rounding::kTowardZero;
  return Rounding::kNearestEven;
}

Specials ParseSpecials(const std::string& name) {
  if (name == "fn") return Specials::kFn;
  if (name == "fnuz") return Specials::kFnuz;
  if (name == "finite") return Specials::kFinite;
  return Specials::kIeee;
}

// Cost of one element for tensorflow::Shard, in its units (about one cycle): the
// vectorized loops take a few cycles per element; the value only needs to be large
// enough that a big tensor is split over every thread while a small one (a few
// thousand elements) stays on the calling thread.
constexpr int64_t kCostPerElement = 10;

// Runs body(begin, end) over [0, n) on the intra-op thread pool.
template <typename Body>
void ParallelFor(OpKernelContext* context, int64_t n, int64_t cost_per_element, Body body) {
  const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers.num_threads, workers.workers, n, cost_per_element, body);
}

absl::Status ReadSeed(const Tensor& tensor, int64_t* seed) {
  if (tensor.NumElements() != 1) {
    return InvalidArgument("seed must be a scalar, got shape ", tensor.shape().DebugString());
  }
  *seed = tensor.flat<int64_t>()(0);
  return absl::OkStatus();
}

}  // namespace

template <typename T>
class QuantizeFloatOp : public OpKernel {
 public:
  explicit QuantizeFloatOp(OpKernelConstruction* context) : OpKernel(context) {
    int exponent_bits, mantissa_bits, bias;
    bool subnormals;
    std::string specials, rounding;
    OP_REQUIRES_OK(context, context->GetAttr("exponent_bits", &exponent_bits));
    OP_REQUIRES_OK(context, context->GetAttr("mantissa_bits", &mantissa_bits));
    OP_REQUIRES_OK(context, context->GetAttr("bias", &bias));
    OP_REQUIRES_OK(context, context->GetAttr("specials", &specials));
    OP_REQUIRES_OK(context, context->GetAttr("subnormals", &subnormals));
    OP_REQUIRES_OK(context, context->GetAttr("rounding", &rounding));
    OP_REQUIRES_OK(context, context->GetAttr("saturate", &saturate_));
    OP_REQUIRES(context, exponent_bits >= 1 && exponent_bits <= 8,
                InvalidArgument("exponent_bits must be in [1, 8], got ", exponent_bits));
    OP_REQUIRES(context, mantissa_bits >= 0 && mantissa_bits <= 23,
                InvalidArgument("mantissa_bits must be in [0, 23], got ", mantissa_bits));
    const int top = (specials == "ieee") ? (1 << exponent_bits) - 2 : (1 << exponent_bits) - 1;
    OP_REQUIRES(context, bias <= 127 && top - bias <= 127 && top >= 1,
                InvalidArgument("bias must be in [", top - 127, ", 127], got ", bias));
    exponent_bits_ = exponent_bits;
    mantissa_bits_ = mantissa_bits;
    bias_ = bias;
    specials_ = ParseSpecials(specials);
    subnormals_ = subnormals;
    rounding_ = ParseRounding(rounding);
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& input = context->input(0);
    int64_t seed = 0;
    OP_REQUIRES_OK(context, ReadSeed(context->input(1), &seed));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, input.shape(), &output));
    const FloatParams<T> params(exponent_bits_, mantissa_bits_, bias_, specials_, subnormals_,
                                saturate_);
    const T* in = input.flat<T>().data();
    T* out = output->flat<T>().data();
    const int64_t n = input.NumElements();
    switch (rounding_) {
      case Rounding::kNearestEven:
        Run<Rounding::kNearestEven>(context, in, out, n, params, seed);
        break;
      case Rounding::kStochastic:
        Run<Rounding::kStochastic>(context, in, out, n, params, seed);
        break;
      case Rounding::kTowardZero:
        Run<Rounding::kTowardZero>(context, in, out, n, params, seed);
        break;
    }
  }

 private:
  template <Rounding R>
  static void Run(OpKernelContext* context, const T* in, T* out, int64_t n,
                  const FloatParams<T>& params, int64_t seed) {
    const Keys keys = MakeKeys(seed);
    ParallelFor(context, n, kCostPerElement, [&](int64_t begin, int64_t end) {
      QuantizeFloatRange<T, R>(in, out, begin, end, params, keys);
    });
  }

  int exponent_bits_, mantissa_bits_, bias_;
  Specials specials_;
  bool subnormals_, saturate_;
  Rounding rounding_;
};

template <typename T>
class QuantizeFixedOp : public OpKernel {
 public:
  explicit QuantizeFixedOp(OpKernelConstruction* context) : OpKernel(context) {
    std::string rounding;
    OP_REQUIRES_OK(context, context->GetAttr("bits", &bits_));
    OP_REQUIRES_OK(context, context->GetAttr("rounding", &rounding));
    OP_REQUIRES_OK(context, context->GetAttr("saturate", &saturate_));
    OP_REQUIRES(context, bits_ >= 2 && bits_ <= 24,
                InvalidArgument("bits must be in [2, 24], got ", bits_));
    rounding_ = ParseRounding(rounding);
  }

  void Compute(OpKernelContext* context) override {
    using C = Container<T>;
    const Tensor& input = context->input(0);
    const Tensor& exponent = context->input(1);
    const Tensor& inner_tensor = context->input(2);
    OP_REQUIRES(context, inner_tensor.NumElements() == 1,
                InvalidArgument("inner must be a scalar"));
    int64_t inner = inner_tensor.flat<int64_t>()(0);
    const int64_t slots = exponent.NumElements();
    const int64_t n = input.NumElements();
    if (n == 0) {  // nothing to round; an empty slice axis gives no exponents at all
      context->set_output(0, input);
      return;
    }
    OP_REQUIRES(context, slots >= 1, InvalidArgument("exponent must not be empty"));
    OP_REQUIRES(context, inner >= 1 && n % (inner * slots) == 0,
                InvalidArgument("inner * size(exponent) must divide the size of x; got inner=",
                                inner, ", size(exponent)=", slots, ", size(x)=", n));
    if (slots == 1) inner = std::max<int64_t>(n, 1);  // one run: the whole tensor
    const int32_t* k = exponent.flat<int32_t>().data();
    const int min_k = 1 - C::kExponentBias - C::kMantissa;
    const int max_k = C::kExponentBias - C::kMantissa;
    for (int64_t j = 0; j < slots; ++j) {
      OP_REQUIRES(context, k[j] >= min_k && k[j] <= max_k,
                  InvalidArgument("exponent must be in [", min_k, ", ", max_k, "], got ", k[j]));
    }
    int64_t seed = 0;
    OP_REQUIRES_OK(context, ReadSeed(context->input(3), &seed));
    Tensor* output = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, input.shape(), &output));
    const T* in = input.flat<T>().data();
    T* out = output->flat<T>().data();
    switch (rounding_) {
      case Rounding::kNearestEven:
        Run<Rounding::kNearestEven>(context, in, out, n, k, slots, inner, seed);
        break;
      case Rounding::kStochastic:
        Run<Rounding::kStochastic>(context, in, out, n, k, slots, inner, seed);
        break;
      case Rounding::kTowardZero:
        Run<Rounding::kTowardZero>(context, in, out, n, k, slots, inner, seed);
        break;
    }
  }

 private:
  template <Rounding R>
  void Run(OpKernelContext* context, const T* in, T* out, int64_t n, const int32_t* k,
           int64_t slots, int64_t inner, int64_t seed) const {
    using UInt = typename Container<T>::UInt;
    const Keys keys = MakeKeys(seed);
    const UInt max_mantissa = (UInt{1} << (bits_ - 1)) - 1;
    const bool saturate = saturate_;
    ParallelFor(context, n, kCostPerElement, [&](int64_t begin, int64_t end) {
      // Walk [begin, end) one run of `inner` elements (one shared exponent) at a time.
      int64_t i = begin;
      while (i < end) {
        const int64_t run = i / inner;
        const int64_t stop = std::min(end, (run + 1) * inner);
        const int exponent = k[run % slots];
        const UInt inf_magnitude = saturate ? ScaledBits<T>(max_mantissa, exponent) : InfBits<T>();
        QuantizeFixedRange<T, R>(in, out, i, stop, exponent, inf_magnitude, keys);
        i = stop;
      }
    });
  }

  int bits_;
  bool saturate_;
  Rounding rounding_;
};

#define REGISTER_KERNELS(T)                                                          \
  REGISTER_KERNEL_BUILDER(                                                           \
      Name("Hfp8QuantizeFloat").Device(DEVICE_CPU).TypeConstraint<T>("T"),           \
      QuantizeFloatOp<T>);                                                           \
  REGISTER_KERNEL_BUILDER(                                                           \
      Name("Hfp8QuantizeFixed").Device(DEVICE_CPU).TypeConstraint<T>("T"),           \
      QuantizeFixedOp<T>);

REGISTER_KERNELS(float);
REGISTER_KERNELS(double);
#undef REGISTER_KERNELS

}  // namespace tfhfp8
