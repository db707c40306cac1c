// Helpers shared by the TensorFlow kernels (quantize_kernels.cc, block_kernels.cc and
// accumulate/cc/kernels/{accumulate,fused}_kernels.cc): the thread pool, the seed input,
// the shapes of a batched matmul, the outputs, the start of a quantizing kernel's
// Compute, the loops of a container type (attributes: format_attrs.h). Compiled for the
// baseline only, with TensorFlow's headers.

#ifndef TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_KERNEL_UTIL_H_
#define TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_KERNEL_UTIL_H_

#include <cstdint>
#include <string>

#include "cpu_dispatch.h"
#include "quantize_types.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tfhfp8 {

using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShapeUtils;
using tensorflow::errors::InvalidArgument;

// Cost of one element for tensorflow::Shard, in its units (about one cycle): the
// vectorized loops take a few cycles per element; the value only needs to be large
// enough that a big tensor is split over every thread while a small one (a few
// thousand elements) stays on the calling thread.
constexpr int64_t kCostPerElement = 10;

// Runs body(begin, end) over [0, n) on the intra-op thread pool.
template <typename Body>
inline void ParallelFor(OpKernelContext* context, int64_t n, int64_t cost_per_element, Body body) {
  const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
  tensorflow::Shard(workers.num_threads, workers.workers, n, cost_per_element, body);
}

// The seed of a stochastic rounding: a scalar int64 input.
inline absl::Status ReadSeed(const Tensor& tensor, int64_t* seed) {
  if (!TensorShapeUtils::IsScalar(tensor.shape())) {
    return InvalidArgument("seed must be a scalar, got shape ", tensor.shape().DebugString());
  }
  *seed = tensor.scalar<int64_t>()();
  return absl::OkStatus();
}

// a: [B, M, K], b: [B, K, N] -> (B, M, K, N), or an error naming the operand.
inline absl::Status MatmulShapes(const Tensor& a, const Tensor& b, int64_t* batch,
                                 int64_t* m, int64_t* k, int64_t* n) {
  if (a.dims() != 3) {
    return InvalidArgument("a must have rank 3 [batch, M, K], got shape ",
                           a.shape().DebugString());
  }
  if (b.dims() != 3) {
    return InvalidArgument("b must have rank 3 [batch, K, N], got shape ",
                           b.shape().DebugString());
  }
  if (a.dim_size(0) != b.dim_size(0)) {
    return InvalidArgument("a and b must have the same batch size, got shapes ",
                           a.shape().DebugString(), " and ", b.shape().DebugString());
  }
  if (a.dim_size(2) != b.dim_size(1)) {
    return InvalidArgument("a's K (dimension 2) must equal b's K (dimension 1), got shapes ",
                           a.shape().DebugString(), " and ", b.shape().DebugString());
  }
  *batch = a.dim_size(0);
  *m = a.dim_size(1);
  *k = a.dim_size(2);
  *n = b.dim_size(2);
  return absl::OkStatus();
}

// The loops of the CPU variant the kernels run (cpu_dispatch.h), or why there are none.
inline absl::Status SelectLoopsOrError(const Loops** loops) {
  std::string error;
  *loops = SelectLoops(&error);
  return *loops != nullptr ? absl::OkStatus() : InvalidArgument(error);
}

// The start of a quantizing kernel's Compute: the loops and the seed (input `seed_input`).
inline absl::Status StartQuantize(OpKernelContext* context, int seed_input, const Loops** loops,
                                  int64_t* seed) {
  TF_RETURN_IF_ERROR(SelectLoopsOrError(loops));
  return ReadSeed(context->input(seed_input), seed);
}

// Output 0 with the shape of input 0, in input 0's buffer when TensorFlow can forward it
// (the loops read each element before they write it).
inline absl::Status OutputLikeInput(OpKernelContext* context, Tensor** output) {
  return context->forward_input_or_allocate_output({0}, 0, context->input(0).shape(), output);
}

// A scalar int64 output `index` (a counter of the kernel), set to 0.
inline absl::Status ZeroCounterOutput(OpKernelContext* context, int index, Tensor** counter) {
  TF_RETURN_IF_ERROR(context->allocate_output(index, tensorflow::TensorShape({}), counter));
  (*counter)->scalar<int64_t>()() = 0;
  return absl::OkStatus();
}

// The loops of one container type, indexed by rounding.
template <typename T>
struct TypedLoops;

template <>
struct TypedLoops<float> {
  static FloatLoop<float> Float(const Loops& l, Rounding r) { return l.float32[int(r)]; }
  static FixedLoop<float> Fixed(const Loops& l, Rounding r) { return l.fixed32[int(r)]; }
  static MaxAbsLoop<float> MaxAbs(const Loops& l) { return l.max_abs32; }
  static BlockLoop<float> Block(const Loops& l, Rounding r) { return l.block32[int(r)]; }
  static TensorAmaxLoop<float> TensorAmax(const Loops& l) { return l.tensor_amax32; }
};

template <>
struct TypedLoops<double> {
  static FloatLoop<double> Float(const Loops& l, Rounding r) { return l.float64[int(r)]; }
  static FixedLoop<double> Fixed(const Loops& l, Rounding r) { return l.fixed64[int(r)]; }
  static MaxAbsLoop<double> MaxAbs(const Loops& l) { return l.max_abs64; }
  static BlockLoop<double> Block(const Loops& l, Rounding r) { return l.block64[int(r)]; }
  static TensorAmaxLoop<double> TensorAmax(const Loops& l) { return l.tensor_amax64; }
};

}  // namespace tfhfp8

#endif  // TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_KERNEL_UTIL_H_
