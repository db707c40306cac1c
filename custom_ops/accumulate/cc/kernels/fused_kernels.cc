// CPU kernel of Hfp8FusedMatmul: a matrix unit's fused dot-adds (tfhfp8.fused_accumulation)
// on TF's intra-op threads, kRows output rows per task; the arithmetic is in the CPU
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

// Output rows per task (see FusedRowsLoop).
constexpr int kRows = 8;

absl::Status CheckRange(const char* name, int value, int low, int high) {
  if (value < low || value > high) {
    return InvalidArgument(name, " must be in [", low, ", ", high, "], got ", value);
  }
  return absl::OkStatus();
}

// The values whose exponents are found together: a group (an MX block, when blocked),
// or, with partial sums, an MX block of a group of several.
int ExponentBlock(const FusedArithmetic& f) {
  return f.partial_sum_size ? f.block_size : f.group_size;
}

// Each batch's B as double, zero padded to whole groups ([batch][groups * group_size][n]),
// and its exponents.
void PrepareB(const AccumulateLoops& loops, const float* b, int64_t batch, int64_t k,
              int64_t n, int64_t groups, const FusedArithmetic& f, std::vector<double>* padded,
              std::vector<int>* exponents) {
  const int64_t rows = groups * f.group_size;
  padded->assign(batch * rows * n, 0.0);
  exponents->resize(batch * rows * n);
  for (int64_t bi = 0; bi < batch; ++bi) {
    double* bp = padded->data() + bi * rows * n;
    std::copy(b + bi * k * n, b + (bi + 1) * k * n, bp);
    for (int64_t k0 = 0; k0 < rows; k0 += ExponentBlock(f)) {
      for (int64_t j = 0; j < n; ++j) {
        loops.fused_exponents(bp + k0 * n + j, ExponentBlock(f), n, f.b_min_exponent,
                              f.b_blocked, f.b_block_emax, f.partial_sum_size > 0,
                              exponents->data() + bi * rows * n + k0 * n + j);
      }
    }
  }
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
    OP_REQUIRES_OK(context, context->GetAttr("block_size", &f.block_size));
    OP_REQUIRES_OK(context, context->GetAttr("partial_sum_size", &f.partial_sum_size));
    OP_REQUIRES(context,
                f.partial_sum_size == 0 ||
                    (f.a_blocked && f.b_blocked && f.block_size > 0 &&
                     f.partial_sum_size > 0 && f.group_size % f.block_size == 0 &&
                     f.block_size % f.partial_sum_size == 0),
                InvalidArgument("partial_sum_size must be 0, or divide block_size, which "
                                "divides group_size, with both operands blocked; got "
                                "partial_sum_size ", f.partial_sum_size, ", block_size ",
                                f.block_size, ", group_size ", f.group_size));
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
    float* c_data = c->flat<float>().data();

    std::vector<double> b_padded;
    std::vector<int> eb;
    PrepareB(*loops, b.flat<float>().data(), batch, k, n, groups, f, &b_padded, &eb);
    // Tasks of kRows rows of one batch: B's group is read once per task's rows.
    const int64_t row_blocks = (m + kRows - 1) / kRows;
    std::atomic<int64_t> swamped{0};
    const int64_t cost = std::max<int64_t>(padded, 1) * n * kRows * 20;
    ParallelFor(context, batch * row_blocks, cost, [&](int64_t begin, int64_t end) {
      tensorflow::port::ScopedDontFlushDenormal ieee_subnormals;
      std::vector<double> a_rows(kRows * padded);
      std::vector<int> ea(kRows * padded);
      int64_t local = 0;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bi = task / row_blocks, i0 = (task % row_blocks) * kRows;
        const int rows = static_cast<int>(std::min<int64_t>(kRows, m - i0));
        std::fill(a_rows.begin(), a_rows.end(), 0.0);
        for (int r = 0; r < rows; ++r) {
          const float* row = a_data + (bi * m + i0 + r) * k;
          std::copy(row, row + k, a_rows.begin() + r * padded);
          for (int64_t k0 = 0; k0 < padded; k0 += ExponentBlock(f)) {
            loops->fused_exponents(a_rows.data() + r * padded + k0, ExponentBlock(f), 1,
                                   f.a_min_exponent, f.a_blocked, f.a_block_emax,
                                   f.partial_sum_size > 0, ea.data() + r * padded + k0);
          }
        }
        local += loops->fused_rows(a_rows.data(), ea.data(), rows, padded,
                                   b_padded.data() + bi * padded * n,
                                   eb.data() + bi * padded * n, groups, n, f,
                                   c_data + (bi * m + i0) * n);
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
