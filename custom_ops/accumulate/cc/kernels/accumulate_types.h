// Plain data shared by every CPU variant of the accumulating-matmul loops and by the
// TensorFlow kernels (see quantize_types.h for why there is no code here).

#ifndef TFHFP8_CUSTOM_OPS_ACCUMULATE_CC_KERNELS_ACCUMULATE_TYPES_H_
#define TFHFP8_CUSTOM_OPS_ACCUMULATE_CC_KERNELS_ACCUMULATE_TYPES_H_

#include <cstdint>

#include "quantize_types.h"

namespace tfhfp8 {

// Output tile of one call of the loops: kTileRows rows of C by kTileCols columns, the
// columns in SIMD lanes (several vectors, so that the long dependency chain of one
// rounded addition is hidden behind the others).
constexpr int kTileRows = 4;
constexpr int kTileCols = 32;

// One float accumulator (tfhfp8.Accumulator), validated and precomputed.
struct FloatAccumulation {
  FloatParams<float> inner;     // the accumulator format
  FloatParams<float> outer;     // the format of the sum of chunks
  FloatParams<float> products;  // used when has_products
  bool has_products;
  int64_t k;           // terms per dot product
  int64_t chunk;       // terms per chunk, in [1, k] (k: one chunk, no outer sum)
  int64_t num_chunks;  // ceil(k / chunk)
  Keys inner_keys, outer_keys, product_keys;  // keys of seed, seed + 1, seed + 2
};

// C[i0 + r, j0 + c] for r < rows <= kTileRows, c < cols <= kTileCols:
//   a: the tile's first row of A (row stride k);
//   panel: B's columns j0..j0+kTileCols-1, packed as [k][kTileCols] (zero padded);
//   c: the tile's first output, row stride ldc;
//   first_index: flat output index of C[i0, j0] (stochastic rounding), row stride ldc.
// Returns the number of swamped inner additions.
using FloatTileLoop = int64_t (*)(const float* a, const float* panel, float* c, int rows,
                                  int cols, int64_t ldc, uint64_t first_index,
                                  const FloatAccumulation& acc);

// INT32 accumulation of one tile (see Hfp8Int32Matmul). When `pairs` is true, every
// |value| of A and B is <= 32767 and the inputs are packed by chunk into 16-bit pairs:
//   a: [rows][packed_k] int32 words (a_k | a_{k+1} << 16), panel: [packed_k][kTileCols];
// otherwise a is the plain [rows][k] row block and panel [k][kTileCols].
// Returns the number of overflows.
struct Int32Accumulation {
  int64_t k;
  int64_t chunk;      // terms per chunk, in [1, k]; == k: no float32 total
  int64_t packed_k;   // words per row of the packed A (pairs) or k
  bool saturate;
  bool pairs;
};

using Int32TileLoop = int64_t (*)(const int32_t* a, const int32_t* panel, float* c, int rows,
                                  int cols, int64_t ldc, const Int32Accumulation& acc);

// A matrix unit's fused dot-adds (Hfp8FusedMatmul, fused_loops.cc).
struct FusedArithmetic {
  int a_min_exponent, b_min_exponent, group_size, fraction_bits;
  int output_bits, output_min_exponent;
  bool nearest_even;
  int64_t chunk_size;  // 0: no promotion
  bool a_blocked, b_blocked;
  int a_block_emax, b_block_emax;
  // kind::mxf4nvf4: products summed exactly partial_sum_size at a time, each sum one
  // term with its blocks' scale exponents (MX blocks of block_size); 0: none.
  int block_size, partial_sum_size;
};

// The exponents (MMA-Sim's) of `count` operand values x[i * stride] into out[i * stride]:
// one group of an operand, an OCP MX block when `blocked`; with `scale_only`, the
// block's scale exponent for every value (what a partial sum's exponent adds).
using FusedExponentsLoop = void (*)(const double* x, int64_t count, int64_t stride,
                                    int min_exponent, bool blocked, int block_emax,
                                    bool scale_only, int* out);

// Output rows c[rows][n] of the fused sums of a's rows (a, ea: [rows][stride], zero padded
// to groups * group_size) with the columns of b (b, eb: [groups * group_size][n], zero
// padded), ea and eb their exponents (FusedExponentsLoop). Returns the number of nonzero
// products truncated to zero in finite groups.
using FusedRowsLoop = int64_t (*)(const double* a, const int* ea, int rows, int64_t stride,
                                  const double* b, const int* eb, int64_t groups, int64_t n,
                                  const FusedArithmetic& f, float* c);

// One CPU variant's loops.
struct AccumulateLoops {
  const char* name;
  // [has_products][rounding]; at [..][kRoundings] nearest even through
  // QuantizeFloatNearestEven (when every format allows it), at [..][kRoundings + 1]
  // through its plain form (when every format is plain, see PlainNearestEven), at
  // [0][kRoundings + 2] the same for IEEE binary16 without saturation (HalfFormat):
  // the hardware conversion where the variant has F16C.
  FloatTileLoop float_tile[2][kRoundings + 3];
  Int32TileLoop int32_tile;
  FusedExponentsLoop fused_exponents;
  FusedRowsLoop fused_rows;
};

}  // namespace tfhfp8

#endif  // TFHFP8_CUSTOM_OPS_ACCUMULATE_CC_KERNELS_ACCUMULATE_TYPES_H_
