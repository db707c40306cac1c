// CPU kernel of Hfp8FusedMatmul: a matrix unit's fused dot-adds (tfhfp8.fused_accumulation)
// on TF's intra-op threads, one output row per task; the arithmetic is in the CPU
// variant's loops (fused_loops.cc). Compiled for the baseline only.

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "accumulate_select.h"
#include "accumulate_types.h"
#include "kernel_util.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/denormal.h"

namespace tfhfp8 {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::errors::InvalidArgument;

namespace {

absl::Status CheckRange(const char* name, int value, int low, int high) {
  if (value < low || value > high) {
    return InvalidArgument(name, " must be in [", low, ", ", high, "], got ", value);
  }
  return absl::OkStatus();
}

}  // namespace

class FusedMatmulOp : public OpKernel {
 public:
  explicit FusedMatmulOp(OpKernelConstruction* context) : OpKernel(context) {
    FusedArithmetic& f = arithmetic_;
    std::string rounding;
    int chunk_size;
    OP_REQUIRES_OK(context, context->GetAttr("a_min_exponent", &f.a_min_exponent));
    OP_REQUIRES_OK(context, context->GetAttr("b_min_exponent", &f.b_min_exponent));
    OP_REQUIRES_OK(context, context->GetAttr("group_size", &f.group_size));
    OP_REQUIRES_OK(context, context->GetAttr("fraction_bits", &f.fraction_bits));
    OP_REQUIRES_OK(context, context->GetAttr("output_bits", &f.output_bits));
    OP_REQUIRES_OK(context, context->GetAttr("output_min_exponent", &f.output_min_exponent));
    OP_REQUIRES_OK(context, context->GetAttr("output_rounding", &rounding));
    OP_REQUIRES_OK(context, context->GetAttr("chunk_size", &chunk_size));
    OP_REQUIRES_OK(context, context->GetAttr("a_blocked", &f.a_blocked));
    OP_REQUIRES_OK(context, context->GetAttr("b_blocked", &f.b_blocked));
    OP_REQUIRES_OK(context, context->GetAttr("a_block_emax", &f.a_block_emax));
    OP_REQUIRES_OK(context, context->GetAttr("b_block_emax", &f.b_block_emax));
    OP_REQUIRES_OK(context, CheckRange("a_min_exponent", f.a_min_exponent, -1000, 0));
    OP_REQUIRES_OK(context, CheckRange("b_min_exponent", f.b_min_exponent, -1000, 0));
    OP_REQUIRES_OK(context, CheckRange("group_size", f.group_size, 1, 1024));
    OP_REQUIRES_OK(context, CheckRange("fraction_bits", f.fraction_bits, 1, 40));
    OP_REQUIRES_OK(context, CheckRange("output_bits", f.output_bits, 1, 23));
    OP_REQUIRES_OK(context, CheckRange("output_min_exponent", f.output_min_exponent, -126, -1));
    OP_REQUIRES_OK(context, CheckRange("a_block_emax", f.a_block_emax, 0, 127));
    OP_REQUIRES_OK(context, CheckRange("b_block_emax", f.b_block_emax, 0, 127));
    OP_REQUIRES(context, chunk_size >= 0 && chunk_size % f.group_size == 0,
                InvalidArgument("chunk_size must be 0 or a positive multiple of group_size (",
                                f.group_size, "), got ", chunk_size));
    f.chunk_size = chunk_size;
    f.nearest_even = rounding == "nearest_even";
  }

  void Compute(OpKernelContext* context) override {
    // float32 subnormals convert exactly to and from double: TF's threads flush them.
    tensorflow::port::ScopedDontFlushDenormal ieee_subnormals;
    const Tensor& a = context->input(0);
    const Tensor& b = context->input(1);
    int64_t batch, m, k, n;
    const AccumulateLoops* loops;
    OP_REQUIRES_OK(context, SelectAccumulateLoops(&loops));
    OP_REQUIRES_OK(context, MatmulShapes(a, b, &batch, &m, &k, &n));
    Tensor* c = nullptr;
    Tensor* counter = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({batch, m, n}), &c));
    OP_REQUIRES_OK(context, ZeroCounterOutput(context, 1, &counter));
    if (c->NumElements() == 0) return;
    const FusedArithmetic& f = arithmetic_;
    const int64_t groups = (k + f.group_size - 1) / f.group_size;
    const int64_t padded = groups * f.group_size;
    const float* a_data = a.flat<float>().data();
    const float* b_data = b.flat<float>().data();
    float* c_data = c->flat<float>().data();

    // Each batch's B (and its exponents) as double, zero padded to whole groups.
    std::vector<double> b_padded(batch * padded * n, 0.0);
    std::vector<int> eb(batch * padded * n);
    for (int64_t bi = 0; bi < batch; ++bi) {
      double* bp = b_padded.data() + bi * padded * n;
      for (int64_t i = 0; i < k * n; ++i) bp[i] = b_data[bi * k * n + i];
      for (int64_t group = 0; group < groups; ++group) {
        for (int64_t j = 0; j < n; ++j) {
          const int64_t offset = group * f.group_size * n + j;
          loops->fused_exponents(bp + offset, f.group_size, n, f.b_min_exponent, f.b_blocked,
                         f.b_block_emax, eb.data() + bi * padded * n + offset);
        }
      }
    }
    std::atomic<int64_t> swamped{0};
    const int64_t cost = std::max<int64_t>(padded, 1) * n * 20;
    ParallelFor(context, batch * m, cost, [&](int64_t begin, int64_t end) {
      tensorflow::port::ScopedDontFlushDenormal ieee_subnormals;
      std::vector<double> a_row(padded);
      std::vector<int> ea(padded);

      int64_t local = 0;
      for (int64_t row = begin; row < end; ++row) {
        const int64_t bi = row / m;
        std::fill(a_row.begin(), a_row.end(), 0.0);
        std::copy(a_data + row * k, a_data + (row + 1) * k, a_row.begin());
        for (int64_t group = 0; group < groups; ++group) {
          const int64_t k0 = group * f.group_size;
          loops->fused_exponents(a_row.data() + k0, f.group_size, 1, f.a_min_exponent, f.a_blocked,
                         f.a_block_emax, ea.data() + k0);
        }
        local += loops->fused_row(a_row.data(), ea.data(), b_padded.data() + bi * padded * n,
                          eb.data() + bi * padded * n, groups, n, f, c_data + row * n);
      }
      swamped += local;
    });
    counter->scalar<int64_t>()() = swamped.load();
  }

 private:
  FusedArithmetic arithmetic_;
};

REGISTER_KERNEL_BUILDER(Name("Hfp8FusedMatmul").Device(DEVICE_CPU), FusedMatmulOp);

}  // namespace tfhfp8
