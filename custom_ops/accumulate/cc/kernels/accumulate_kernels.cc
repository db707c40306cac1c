// CPU kernels of Hfp8AccumulatingMatmul and Hfp8Int32Matmul on TF's intra-op threads:
// the output is cut into tiles (accumulate_types.h), each computed by the loops of the
// CPU variant that cpu_dispatch.h selects. Compiled for the baseline only.

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "accumulate_select.h"
#include "accumulate_types.h"
#include "cpu_dispatch.h"
#include "format_attrs.h"
#include "kernel_util.h"
#include "rounding.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/denormal.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tfhfp8 {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::TensorShapeUtils;
using tensorflow::errors::InvalidArgument;

namespace {

// Whether p is IEEE binary16 rounded to nearest without saturation: the format whose
// rounding the hardware conversion (vcvtps2ph) does.
bool IsHalf(const FloatParams<float>& p) {
  static const FloatParams<float> half =
      MakeFloatParams<float>(FloatFormatSpec{5, 10, 15, Specials::kIeee, true, true},
                             RoundingOptions{});
  return p.emin == half.emin && p.d == half.d && p.sub_mantissa == half.sub_mantissa &&
         p.rebias == half.rebias && p.half_minus_one == half.half_minus_one &&
         p.lsb == half.lsb && p.max_code == half.max_code && p.max_bits == half.max_bits &&
         p.overflow_bits == half.overflow_bits && p.nan_xor == half.nan_xor &&
         p.zero_sign_mask == half.zero_sign_mask &&
         p.quantum_exponent == half.quantum_exponent;
}

absl::Status ReadChunkSize(OpKernelConstruction* context, int64_t* chunk_size) {
  int value;
  TF_RETURN_IF_ERROR(context->GetAttr("chunk_size", &value));
  if (value < 0) {
    return InvalidArgument("chunk_size must be >= 0 (0: one chunk), got ", value);
  }
  *chunk_size = value;
  return absl::OkStatus();
}

// Terms per chunk for K terms: chunk_size, or K when 0 or >= K (one chunk); >= 1.
int64_t TermsPerChunk(int64_t chunk_size, int64_t k) {
  if (chunk_size == 0 || chunk_size >= k) return std::max<int64_t>(k, 1);
  return chunk_size;
}

// Output tiles, ordered so that consecutive tiles share B's column panel.
struct Tiling {
  int64_t batch, m, k, n, row_tiles, col_tiles;
  Tiling(int64_t batch_, int64_t m_, int64_t k_, int64_t n_)
      : batch(batch_), m(m_), k(k_), n(n_),
        row_tiles((m_ + kTileRows - 1) / kTileRows),
        col_tiles((n_ + kTileCols - 1) / kTileCols) {}
  int64_t count() const { return batch * row_tiles * col_tiles; }
  // Tile t: (batch index, first row, first column).
  void Locate(int64_t t, int64_t* b, int64_t* i0, int64_t* j0) const {
    *b = t / (row_tiles * col_tiles);
    const int64_t rest = t % (row_tiles * col_tiles);
    *j0 = (rest / row_tiles) * kTileCols;
    *i0 = (rest % row_tiles) * kTileRows;
  }
};

// Packs B[b][:, j0:j0+kTileCols] as [k][kTileCols], zero beyond column n.
template <typename T>
void PackPanel(const T* b, int64_t k, int64_t n, int64_t j0, T* panel) {
  const int64_t cols = std::min<int64_t>(kTileCols, n - j0);
  for (int64_t kk = 0; kk < k; ++kk) {
    const T* src = b + kk * n + j0;
    T* dst = panel + kk * kTileCols;
    std::copy(src, src + cols, dst);
    std::fill(dst + cols, dst + kTileCols, T(0));
  }
}

// What both GEMM kernels start with: a [B, M, K] and b [B, K, N] (inputs 0 and 1), the
// output c [B, M, N] (output 0) and a counter (output 1: swamped additions or overflows).
struct MatmulStart {
  int64_t batch, m, k, n;
  Tensor* c = nullptr;
  Tensor* counter = nullptr;
};

// The start of both GEMM kernels' Compute: the loops, the shapes, c, the counter (zero).
// `*done` when there is nothing to sum: c is empty, or K = 0 (c is then +0, an empty
// sum, which the tile loops would not write).
absl::Status StartMatmul(OpKernelContext* context, const AccumulateLoops** loops,
                         MatmulStart* start, bool* done) {
  TF_RETURN_IF_ERROR(SelectAccumulateLoops(loops));
  TF_RETURN_IF_ERROR(MatmulShapes(context->input(0), context->input(1), &start->batch,
                                  &start->m, &start->k, &start->n));
  TF_RETURN_IF_ERROR(context->allocate_output(
      0, TensorShape({start->batch, start->m, start->n}), &start->c));
  TF_RETURN_IF_ERROR(ZeroCounterOutput(context, 1, &start->counter));
  *done = start->c->NumElements() == 0 || start->k == 0;
  if (start->c->NumElements() != 0 && start->k == 0) start->c->flat<float>().setZero();
  return absl::OkStatus();
}

}  // namespace

class AccumulatingMatmulOp : public OpKernel {
 public:
  explicit AccumulatingMatmulOp(OpKernelConstruction* context) : OpKernel(context) {
    // The round-to-odd sum is exact for formats of at most 22 significand bits.
    constexpr int kMaxMantissa = 21;
    FloatFormatSpec inner, outer, products;
    RoundingOptions options;
    OP_REQUIRES_OK(context, ReadFloatFormatAttrs(context, "", kMaxMantissa, &inner));
    OP_REQUIRES_OK(context, ReadFloatFormatAttrs(context, "outer_", kMaxMantissa, &outer));
    OP_REQUIRES_OK(context, ReadFloatFormatAttrs(context, "products_", 23, &products));
    OP_REQUIRES_OK(context, context->GetAttr("has_products", &has_products_));
    OP_REQUIRES_OK(context, ReadRoundingAttrs(context, &rounding_, &options.saturate));
    OP_REQUIRES_OK(context, ReadChunkSize(context, &chunk_size_));
    auto params = [&options](const FloatFormatSpec& f) {
      return MakeFloatParams<float>(f, options);
    };
    inner_ = params(inner);
    outer_ = params(outer);
    products_ = params(products);
  }

  void Compute(OpKernelContext* context) override {
    int64_t signed_seed = 0;
    OP_REQUIRES_OK(context, ReadSeed(context->input(2), &signed_seed));
    const uint64_t seed = static_cast<uint64_t>(signed_seed);
    const AccumulateLoops* loops;
    MatmulStart start;
    bool done = false;
    OP_REQUIRES_OK(context, StartMatmul(context, &loops, &start, &done));
    if (done) return;
    const int64_t batch = start.batch, m = start.m, k = start.k, n = start.n;
    const Tensor& a = context->input(0);
    const Tensor& b = context->input(1);
    Tensor* c = start.c;

    FloatAccumulation acc;
    acc.inner = inner_;
    acc.outer = outer_;
    acc.products = products_;
    acc.has_products = has_products_;
    acc.k = k;
    acc.chunk = TermsPerChunk(chunk_size_, k);
    acc.num_chunks = (k + acc.chunk - 1) / acc.chunk;
    // seed + 1 and seed + 2 as int64 arithmetic wraps.
    acc.inner_keys = MakeSeedKeys(static_cast<int64_t>(seed));
    acc.outer_keys = MakeSeedKeys(static_cast<int64_t>(seed + 1));
    acc.product_keys = MakeSeedKeys(static_cast<int64_t>(seed + 2));
    const bool fast = rounding_ == Rounding::kNearestEven && NearestEvenFastApplies(inner_) &&
                      NearestEvenFastApplies(outer_);
    const bool plain = fast && PlainNearestEven(inner_) && PlainNearestEven(outer_);
    const bool half = plain && !has_products_ && IsHalf(inner_) && IsHalf(outer_);
    const FloatTileLoop loop = loops->float_tile[has_products_ ? 1 : 0][
        half ? kRoundings + 2 : plain ? kRoundings + 1 : fast ? kRoundings : int(rounding_)];

    const Tiling tiling(batch, m, k, n);
    const float* a_data = a.flat<float>().data();
    const float* b_data = b.flat<float>().data();
    float* c_data = c->flat<float>().data();
    std::atomic<int64_t> swamped{0};
    // About 8 cycles per rounded addition (Shard's cost unit is about a cycle).
    const int64_t cost = std::max<int64_t>(k, 1) * kTileRows * kTileCols * 8;
    ParallelFor(context, tiling.count(), cost, [&](int64_t begin, int64_t end) {
      // TwoSum needs IEEE subnormals; TF's threads flush them to zero.
      tensorflow::port::ScopedDontFlushDenormal ieee_subnormals;
      std::vector<float> panel(std::max<int64_t>(k, 1) * kTileCols);
      int64_t panel_of = -1;  // the (batch, column tile) the panel holds
      int64_t local = 0;
      for (int64_t t = begin; t < end; ++t) {
        int64_t bi, i0, j0;
        tiling.Locate(t, &bi, &i0, &j0);
        const int64_t which = bi * tiling.col_tiles + j0 / kTileCols;
        if (which != panel_of) {
          PackPanel(b_data + bi * k * n, k, n, j0, panel.data());
          panel_of = which;
        }
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - i0));
        const int cols = static_cast<int>(std::min<int64_t>(kTileCols, n - j0));
        const int64_t first = (bi * m + i0) * n + j0;
        local += loop(a_data + (bi * m + i0) * k, panel.data(), c_data + first, rows, cols, n,
                      static_cast<uint64_t>(first), acc);
      }
      swamped += local;
    });
    start.counter->scalar<int64_t>()() = swamped.load();
  }

 private:
  FloatParams<float> inner_, outer_, products_;
  bool has_products_;
  Rounding rounding_;
  int64_t chunk_size_;
};

class Int32MatmulOp : public OpKernel {
 public:
  explicit Int32MatmulOp(OpKernelConstruction* context) : OpKernel(context) {
    std::string overflow;
    OP_REQUIRES_OK(context, ReadChunkSize(context, &chunk_size_));
    OP_REQUIRES_OK(context, context->GetAttr("overflow", &overflow));
    saturate_ = overflow == "saturate";
  }

  void Compute(OpKernelContext* context) override {
    const AccumulateLoops* loops;
    MatmulStart start;
    bool done = false;
    OP_REQUIRES_OK(context, StartMatmul(context, &loops, &start, &done));
    if (done) return;
    const int64_t batch = start.batch, m = start.m, k = start.k, n = start.n;
    const Tensor& a = context->input(0);
    const Tensor& b = context->input(1);
    Tensor* c = start.c;

    Int32Accumulation acc;
    acc.k = k;
    acc.chunk = TermsPerChunk(chunk_size_, k);
    acc.saturate = saturate_;
    // Words of a row packed in 16-bit pairs, chunk by chunk (a chunk's odd last term is
    // paired with a zero).
    int64_t packed_k = 0;
    for (int64_t begin = 0; begin < k; begin += acc.chunk) {
      packed_k += (std::min(k - begin, acc.chunk) + 1) / 2;
    }

    const Tiling tiling(batch, m, k, n);
    const int32_t* a_data = a.flat<int32_t>().data();
    const int32_t* b_data = b.flat<int32_t>().data();
    float* c_data = c->flat<float>().data();
    std::atomic<int64_t> overflows{0};
    const int64_t cost = std::max<int64_t>(k, 1) * kTileRows * kTileCols;
    const Int32TileLoop loop = loops->int32_tile;
    // A's row tiles packed in pairs once (not once per column tile): [row tile][kTileRows]
    // [packed_k], zero rows past m; a_fits[row tile]: every value fits 16 bits.
    const int64_t tile_words = kTileRows * std::max<int64_t>(packed_k, 1);
    const Tiling row_tiling(batch, m, k, 1);
    std::vector<int32_t> pairs_a(row_tiling.count() * tile_words);
    std::vector<char> a_fits(row_tiling.count());
    ParallelFor(context, row_tiling.count(), std::max<int64_t>(k, 1) * kTileRows * 4,
                [&](int64_t begin, int64_t end) {
                  for (int64_t t = begin; t < end; ++t) {
                    int64_t bi, i0, j0;
                    row_tiling.Locate(t, &bi, &i0, &j0);
                    const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - i0));
                    const int32_t* a_rows = a_data + (bi * m + i0) * k;
                    a_fits[t] = Fits16(a_rows, rows * k);
                    if (!a_fits[t]) continue;
                    int32_t* out = pairs_a.data() + t * tile_words;
                    for (int r = 0; r < rows; ++r) {
                      PackPairs(a_rows + r * k, 1, 1, acc, out + r * packed_k);
                    }
                  }
                });
    ParallelFor(context, tiling.count(), cost, [&](int64_t begin, int64_t end) {
      const int64_t rows_k = std::max<int64_t>(k, 1);
      std::vector<int32_t> panel(rows_k * kTileCols), pairs_panel(rows_k * kTileCols);
      int64_t panel_of = -1;
      bool panel_fits = false;  // every value of the panel in [-32767, 32767]
      int64_t local = 0;
      for (int64_t t = begin; t < end; ++t) {
        int64_t bi, i0, j0;
        tiling.Locate(t, &bi, &i0, &j0);
        const int64_t which = bi * tiling.col_tiles + j0 / kTileCols;
        if (which != panel_of) {
          PackPanel(b_data + bi * k * n, k, n, j0, panel.data());
          panel_fits = Fits16(panel.data(), k * kTileCols);
          if (panel_fits) PackPairs(panel.data(), kTileCols, kTileCols, acc, pairs_panel.data());
          panel_of = which;
        }
        const int rows = static_cast<int>(std::min<int64_t>(kTileRows, m - i0));
        const int cols = static_cast<int>(std::min<int64_t>(kTileCols, n - j0));
        const int32_t* a_rows = a_data + (bi * m + i0) * k;
        Int32Accumulation tile = acc;
        const int64_t row_tile = bi * tiling.row_tiles + i0 / kTileRows;
        tile.pairs = panel_fits && a_fits[row_tile];
        const int32_t* a_tile = a_rows;
        const int32_t* panel_tile = panel.data();
        if (tile.pairs) {
          tile.packed_k = packed_k;
          a_tile = pairs_a.data() + row_tile * tile_words;
          panel_tile = pairs_panel.data();
        } else {
          tile.packed_k = k;
        }
        local += loop(a_tile, panel_tile, c_data + (bi * m + i0) * n + j0, rows, cols, n, tile);
      }
      overflows += local;
    });
    start.counter->scalar<int64_t>()() = overflows.load();
  }

 private:
  // True if every value of x[0, count) is in [-32767, 32767]: a product then has
  // |p| < 2^30 and a pair of products fits a 32-bit multiply-add.
  static bool Fits16(const int32_t* x, int64_t count) {
    int32_t low = 0, high = 0;
    for (int64_t i = 0; i < count; ++i) {
      low = std::min(low, x[i]);
      high = std::max(high, x[i]);
    }
    return low >= -32767 && high <= 32767;
  }

  // Packs x ([k][stride], `width` columns used) as 16-bit pairs per chunk:
  // out[w * width + j] = x[k0][j] & 0xFFFF | x[k0 + 1][j] << 16.
  static void PackPairs(const int32_t* x, int64_t stride, int width, const Int32Accumulation& acc,
                        int32_t* out) {
    int64_t w = 0;
    for (int64_t begin = 0; begin < acc.k; begin += acc.chunk) {
      const int64_t end = std::min(acc.k, begin + acc.chunk);
      for (int64_t kk = begin; kk < end; kk += 2, ++w) {
        for (int j = 0; j < width; ++j) {
          const uint32_t lo = static_cast<uint16_t>(x[kk * stride + j]);
          const uint32_t hi =
              kk + 1 < end ? static_cast<uint16_t>(x[(kk + 1) * stride + j]) : 0u;
          out[w * width + j] = static_cast<int32_t>(lo | (hi << 16));
        }
      }
    }
  }

  int64_t chunk_size_;
  bool saturate_;
};

REGISTER_KERNEL_BUILDER(Name("Hfp8AccumulatingMatmul").Device(DEVICE_CPU), AccumulatingMatmulOp);
REGISTER_KERNEL_BUILDER(Name("Hfp8Int32Matmul").Device(DEVICE_CPU), Int32MatmulOp);

}  // namespace tfhfp8
