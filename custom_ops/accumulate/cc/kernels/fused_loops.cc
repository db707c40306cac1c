// The fused dot-add loops of one CPU variant (Hfp8FusedMatmul; see accumulate_types.h
// and fused_kernels.cc), compiled once per CPU variant like accumulate_loops.cc, without
// TensorFlow headers. The same arithmetic as tfhfp8/ops/tf_fused.py, operation for
// operation, so that both backends (and every variant: no FMA contraction, exact double
// operations only) give the same bits.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "accumulate_types.h"

namespace tfhfp8 {
inline namespace TFHFP8_VARIANT {
namespace {

constexpr int kZeroExponent = -126;  // MMA-Sim's exponent of a zero operand or accumulator
constexpr int kE8m0MinExponent = -127;

// 2^e for e in [-1022, 1023], from its bits.
double Pow2(int e) {
  const uint64_t bits = static_cast<uint64_t>(e + 1023) << 52;
  double value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// floor(log2|x|) of a nonzero double normal in double (every value here is), from its
// exponent bits: 1024 for inf and NaN, as the TF ops compute it.
int FloorLog2(double x) {
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return static_cast<int>((bits >> 52) & 0x7FF) - 1023;
}

int ExponentOf(double x, int min_exponent) {
  return x == 0 ? kZeroExponent : std::max(FloorLog2(x), min_exponent);
}

// Finite `x` rounded to `bits` mantissa bits with smallest normal exponent `min_exponent`,
// to nearest even or toward zero; beyond the largest finite value, inf. (Scalings by
// powers of two from their bits: exact, and no libm call.)
double RoundToBits(double x, int bits, int min_exponent, bool nearest_even) {
  if (x == 0) return x;
  const int quantum = std::max(FloorLog2(x), min_exponent) - bits;
  double units = x * Pow2(-quantum);
  units = nearest_even ? std::nearbyint(units) : std::trunc(units);
  const double y = units * Pow2(quantum);
  return std::fabs(y) >= Pow2(2 - min_exponent) ? std::copysign(INFINITY, y) : y;
}

// A term truncated toward zero: |x| < 2^53 here (fraction_bits + 2 bits). x86-64
// without SSE4.1 has no vector `trunc`: there through int64 (the same value; a zero
// may lose its sign, which no sum of terms keeps).
inline double TruncateTerm(double x) {
#if defined(__x86_64__) && !defined(__SSE4_1__)
  return static_cast<double>(static_cast<int64_t>(x));
#else
  return std::trunc(x);
#endif
}

// Per-column state of one output row (see FusedRows).
struct RowState {
  std::vector<double> c, total, scale, sum;
  std::vector<int> top;
  std::vector<char> finite;
  std::vector<int64_t> lost;
  explicit RowState(int64_t n)
      : c(n), total(n), scale(n), sum(n), top(n), finite(n), lost(n) {}
};

// The accumulator after a group (a: the row's, b: its rows of B) whose finite terms
// were summed into s.sum (truncated at s.top); in a group that is not finite, the sum
// of its products (NaN or +-inf, whatever the order) plus the accumulator.
void FinishGroup(const double* a, const double* b, int64_t n, const FusedArithmetic& f,
                 RowState& s) {
  for (int64_t j = 0; j < n; ++j) {
    double& c = s.c[j];
    if (s.finite[j]) {
      const double sum = s.sum[j] + std::trunc(c * s.scale[j]);
      c = RoundToBits(sum * Pow2(s.top[j] - f.fraction_bits), f.output_bits,
                      f.output_min_exponent, f.nearest_even);
    } else {  // off the hot path: rare
      double special = 0;
      for (int t = 0; t < f.group_size; ++t) special += a[t] * b[t * n + j];
      c = special + c;
    }
  }
}

}  // namespace

// The exponents (MMA-Sim's) of `count` operand values `x[i * stride]`, into
// `out[i * stride]`; one block of an MX operand when `blocked` (see _operand_exponents
// in tf_fused.py), its scale alone when `scale_only` (_partial_scales).
void FusedExponents(const double* x, int64_t count, int64_t stride, int min_exponent,
                    bool blocked, int block_emax, bool scale_only, int* out) {
  int scale = 0;
  if (blocked) {  // (a block with NaN or inf makes its groups non-finite: scale unused)
    double amax = 0;
    for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(x[i * stride]));
    scale = amax == 0 ? kE8m0MinExponent
                      : std::clamp(FloorLog2(amax) - block_emax, kE8m0MinExponent, 1000);
  }
  for (int64_t i = 0; i < count; ++i) {
    out[i * stride] =
        scale_only ? scale : ExponentOf(x[i * stride] * Pow2(-scale), min_exponent) + scale;
  }
}

namespace {

// One fused dot-add of one output row: s.c[j] plus the g products a[t] * b[t * n + j]
// (a, ea: the row's group; b, eb: the group's rows of B). Returns the number of nonzero
// products truncated to zero in finite groups.
int64_t FusedGroup(const double* a, const int* ea, const double* __restrict b,
                   const int* __restrict eb, int64_t n, const FusedArithmetic& f,
                   RowState& state) {
  // The state's arrays through restrict pointers, so that the loops over j vectorize.
  struct {
    double* __restrict c;
    double* __restrict scale;
    double* __restrict sum;
    int* __restrict top;
    char* __restrict finite;
  } s = {state.c.data(), state.scale.data(), state.sum.data(), state.top.data(),
         state.finite.data()};
  for (int64_t j = 0; j < n; ++j) {
    s.top[j] = ExponentOf(s.c[j], -126);
    s.finite[j] = std::isfinite(s.c[j]);
    s.sum[j] = 0;
  }
  for (int t = 0; t < f.group_size; ++t) {  // the largest exponent; NaN or inf
    const double* b_row = b + t * n;
    const int* eb_row = eb + t * n;
    for (int64_t j = 0; j < n; ++j) {
      const double product = a[t] * b_row[j];
      s.top[j] = std::max(s.top[j], ea[t] + eb_row[j]);
      s.finite[j] &= std::isfinite(product);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    s.scale[j] = s.finite[j] ? Pow2(f.fraction_bits - s.top[j]) : 0.0;
  }
  int64_t swamped = 0;
  for (int t = 0; t < f.group_size; ++t) {  // the truncated terms, summed exactly
    const double* b_row = b + t * n;
    for (int64_t j = 0; j < n; ++j) {
      const double product = a[t] * b_row[j];
      const double term = TruncateTerm(s.finite[j] ? product * s.scale[j] : 0.0);
      swamped += s.finite[j] && term == 0 && product != 0;
      s.sum[j] += term;
    }
  }
  FinishGroup(a, b, n, f, state);
  return swamped;
}

// One fused dot-add of partial sums (kind::mxf4nvf4; _fused_partial_group in
// tf_fused.py): per f.partial_sum_size products, their exact sum (any order: they share
// their blocks' power of two and are multiples of its 2^-2), a term whose exponent is
// its blocks' scales (ea, eb: scale_only exponents). Returns the nonzero products of
// partial sums truncated to zero in finite groups.
int64_t FusedPartialGroup(const double* a, const int* ea, const double* __restrict b,
                          const int* __restrict eb, int64_t n, const FusedArithmetic& f,
                          RowState& s) {
  const int p = f.partial_sum_size;
  for (int64_t j = 0; j < n; ++j) {
    s.top[j] = ExponentOf(s.c[j], -126);
    s.finite[j] = std::isfinite(s.c[j]);
    s.sum[j] = 0;
    s.lost[j] = 0;
  }
  for (int t = 0; t < f.group_size; ++t) {  // the largest exponent; NaN or inf
    for (int64_t j = 0; j < n; ++j) {
      if (t % p == 0) s.top[j] = std::max(s.top[j], ea[t] + eb[t * n + j]);
      s.finite[j] &= std::isfinite(a[t] * b[t * n + j]);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    s.scale[j] = s.finite[j] ? Pow2(f.fraction_bits - s.top[j]) : 0.0;
  }
  for (int t0 = 0; t0 < f.group_size; t0 += p) {  // the truncated partial sums
    for (int64_t j = 0; j < n; ++j) {
      if (!s.finite[j]) continue;
      double partial = 0;
      int64_t nonzero = 0;
      for (int t = t0; t < t0 + p; ++t) {
        partial += a[t] * b[t * n + j];
        nonzero += a[t] != 0 && b[t * n + j] != 0;
      }
      const double term = TruncateTerm(partial * s.scale[j]);
      s.lost[j] += term == 0 && partial != 0 ? nonzero : 0;
      s.sum[j] += term;
    }
  }
  int64_t swamped = 0;
  for (int64_t j = 0; j < n; ++j) swamped += s.finite[j] ? s.lost[j] : 0;
  FinishGroup(a, b, n, f, s);
  return swamped;
}

}  // namespace

// Output rows c[r * n + j], r < rows: the fused sums of a's rows (a, ea: [rows][stride],
// zero padded to whole groups) with b's columns (b, eb: [groups * group_size][n]), group
// by group, every row at a group before the next group: B's group is read once per
// `rows` rows. Returns the number of nonzero products truncated to zero in finite groups.
int64_t FusedRows(const double* a, const int* ea, int rows, int64_t stride, const double* b,
                  const int* eb, int64_t groups, int64_t n, const FusedArithmetic& f,
                  float* c) {
  std::vector<RowState> states(rows, RowState(n));
  const int g = f.group_size;
  const int64_t per_chunk = f.chunk_size ? f.chunk_size / g : groups + 1;
  int64_t swamped = 0;
  for (int64_t group = 0; group < groups; ++group) {
    const int64_t k0 = group * g;
    const bool promote = f.chunk_size && ((group + 1) % per_chunk == 0 || group + 1 == groups);
    for (int r = 0; r < rows; ++r) {
      RowState& s = states[r];
      swamped += (f.partial_sum_size ? FusedPartialGroup : FusedGroup)(
          a + r * stride + k0, ea + r * stride + k0, b + k0 * n, eb + k0 * n, n, f, s);
      for (int64_t j = 0; promote && j < n; ++j) {
        const double summed = s.total[j] + s.c[j];
        s.total[j] = std::isfinite(summed) ? RoundToBits(summed, 23, -126, true) : summed;
        s.c[j] = 0;
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; ++j) {
      c[r * n + j] = static_cast<float>(f.chunk_size ? states[r].total[j] : states[r].c[j]);
    }
  }
  return swamped;
}

}  // inline namespace TFHFP8_VARIANT
}  // namespace tfhfp8
