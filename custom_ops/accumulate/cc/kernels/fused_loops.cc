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

// floor(log2|x|) from the exponent bits of a double (1024 for inf and NaN, as the TF ops).
int FloorLog2(double x) { return std::ilogb(x) == FP_ILOGBNAN ? 1024 : std::ilogb(x); }

int ExponentOf(double x, int min_exponent) {
  if (x == 0) return kZeroExponent;
  if (!std::isfinite(x)) return 1024;
  return std::max(FloorLog2(x), min_exponent);
}

// Finite `x` rounded to `bits` mantissa bits with smallest normal exponent `min_exponent`,
// to nearest even or toward zero; beyond the largest finite value, inf.
double RoundToBits(double x, int bits, int min_exponent, bool nearest_even) {
  if (x == 0) return x;
  const int quantum = std::max(FloorLog2(x), min_exponent) - bits;
  double units = std::ldexp(x, -quantum);
  units = nearest_even ? std::nearbyint(units) : std::trunc(units);
  const double y = std::ldexp(units, quantum);
  return std::fabs(y) >= std::ldexp(1.0, 2 - min_exponent) ? std::copysign(INFINITY, y) : y;
}

// 2^e for e in [-1022, 1023], from its bits.
double Pow2(int e) {
  const uint64_t bits = static_cast<uint64_t>(e + 1023) << 52;
  double value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

// Per-column state of one output row (see FusedRow).
struct RowState {
  std::vector<double> c, total, special, scale, sum;
  std::vector<int> top;
  std::vector<char> finite;
  explicit RowState(int64_t n)
      : c(n), total(n), special(n), scale(n), sum(n), top(n), finite(n) {}
};

}  // namespace

// The exponents (MMA-Sim's) of `count` operand values `x[i * stride]`, into
// `out[i * stride]`; one group of an MX operand when `blocked` (see _operand_exponents
// in tf_fused.py).
void FusedExponents(const double* x, int64_t count, int64_t stride, int min_exponent,
                    bool blocked, int block_emax, int* out) {
  int scale = 0;
  if (blocked) {
    double amax = 0;
    bool nan = false;
    for (int64_t i = 0; i < count; ++i) {
      nan |= std::isnan(x[i * stride]);
      amax = std::max(amax, std::fabs(x[i * stride]));
    }
    scale = amax == 0 ? kE8m0MinExponent
                      : std::max(FloorLog2(nan ? NAN : amax) - block_emax, kE8m0MinExponent);
    scale = std::min(scale, 1024);
  }
  for (int64_t i = 0; i < count; ++i) {
    out[i * stride] = ExponentOf(std::ldexp(x[i * stride], -scale), min_exponent) + scale;
  }
}

// One output row: c_row[j] = the fused sums of a_row [k_padded] with b's columns (b:
// [k_padded][n], both zero padded to whole groups), exponents ea [k_padded] and eb
// [k_padded][n]; group by group, the columns in the inner loops. Returns the number of
// nonzero products truncated to zero in finite groups.
int64_t FusedRow(const double* a_row, const int* ea, const double* b, const int* eb,
                 int64_t groups, int64_t n, const FusedArithmetic& f, float* c_row) {
  RowState s(n);
  const int g = f.group_size;
  const int64_t per_chunk = f.chunk_size ? f.chunk_size / g : groups + 1;
  std::fill(s.c.begin(), s.c.end(), 0.0);
  std::fill(s.total.begin(), s.total.end(), 0.0);
  int64_t swamped = 0;
  for (int64_t group = 0; group < groups; ++group) {
    const int64_t k0 = group * g;
    for (int64_t j = 0; j < n; ++j) {
      s.top[j] = ExponentOf(s.c[j], -126);
      s.finite[j] = std::isfinite(s.c[j]);
      s.special[j] = 0;
      s.sum[j] = 0;
    }
    for (int t = 0; t < g; ++t) {  // the largest exponent; NaN or inf
      const double a = a_row[k0 + t];
      const double* b_row = b + (k0 + t) * n;
      const int* eb_row = eb + (k0 + t) * n;
      for (int64_t j = 0; j < n; ++j) {
        const double product = a * b_row[j];
        s.top[j] = std::max(s.top[j], ea[k0 + t] + eb_row[j]);
        s.finite[j] &= std::isfinite(product);
        s.special[j] += product;
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      s.scale[j] = s.finite[j] ? Pow2(f.fraction_bits - s.top[j]) : 0.0;
    }
    for (int t = 0; t < g; ++t) {  // the truncated terms, summed exactly
      const double a = a_row[k0 + t];
      const double* b_row = b + (k0 + t) * n;
      for (int64_t j = 0; j < n; ++j) {
        const double product = a * b_row[j];
        const double term = std::trunc(s.finite[j] ? product * s.scale[j] : 0.0);
        swamped += s.finite[j] && term == 0 && product != 0;
        s.sum[j] += term;
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      double& c = s.c[j];
      if (s.finite[j]) {
        const double sum = s.sum[j] + std::trunc(c * s.scale[j]);
        c = RoundToBits(std::ldexp(sum, s.top[j] - f.fraction_bits), f.output_bits,
                        f.output_min_exponent, f.nearest_even);
      } else {
        c = s.special[j] + c;  // NaN or +-inf
      }
    }
    if (f.chunk_size && ((group + 1) % per_chunk == 0 || group + 1 == groups)) {
      for (int64_t j = 0; j < n; ++j) {
        const double summed = s.total[j] + s.c[j];
        s.total[j] = std::isfinite(summed) ? RoundToBits(summed, 23, -126, true) : summed;
        s.c[j] = 0;
      }
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    c_row[j] = static_cast<float>(f.chunk_size ? s.total[j] : s.c[j]);
  }
  return swamped;
}

}  // inline namespace TFHFP8_VARIANT
}  // namespace tfhfp8
