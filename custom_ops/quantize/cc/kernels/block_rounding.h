// Block-scaled rounding (tfhfp8.BlockScaled: OCP MX, NVFP4), fused: per block the
// absolute maximum, the scale and the element rounding, while the block is in cache.
//
// The same algorithm as tfhfp8/ops/tf_block.py, which documents it step by step; the
// two are tested to agree bit for bit. The element rounding is rounding.h's
// QuantizeFloatElement, with the same random bits (a hash of the flat index).
// Two headers: this one has the scales that are FloatFormats (NVFP4's E4M3; P3109's
// formats, signed or unsigned), FloatScaler, with their loops, and BlockRange, the entry
// point of both kinds of scale; block_pow2.h, which it includes, the E8M0 scales and
// what both kinds share.
// Compiled once per CPU variant (see cpu_dispatch.h), like rounding.h.

#ifndef TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_BLOCK_ROUNDING_H_
#define TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_BLOCK_ROUNDING_H_

#include <cstdint>

#include "block_pow2.h"
#include "quantize_types.h"
#include "rounding.h"

namespace tfhfp8 {
inline namespace TFHFP8_VARIANT {

// A float32 (or float64) value's bits as a float64, exactly, on the bits: TensorFlow's
// threads treat subnormal operands of float instructions as zero. All in 64-bit lanes
// (no int-to-float conversion), so that float32 loops calling it vectorize.
TFHFP8_ELEMENT_INLINE double ToFloat64(uint32_t bits) {
  const uint64_t a = bits & 0x7FFFFFFFu;
  const uint64_t exponent = a >> 23;
  const uint64_t fraction = (a & 0x7FFFFFu) << 29;
  const double normal = FromBits<double>(((exponent + (1023 - 127)) << 52) | fraction);
  // A subnormal: (1 + m 2^-23) - 1 = m 2^-23 exactly, times 2^-126 (float64 normals).
  const double sub = (FromBits<double>(uint64_t{1023} << 52 | fraction) - 1.0) * 0x1p-126;
  const double value = exponent == 0 ? sub : normal;
  return FromBits<double>(ToBits(value) | (static_cast<uint64_t>(bits >> 31) << 63));
}
TFHFP8_ELEMENT_INLINE double ToFloat64(uint64_t bits) { return FromBits<double>(bits); }

// A float64 holding a float32 value (subnormals too) as float32 bits
// (tf_block._float64_to_float32).
TFHFP8_ELEMENT_INLINE uint32_t Float32BitsOf(double y) {
  const uint64_t bits = ToBits(y);
  const uint64_t sign = bits & SignBit<double>();
  const uint64_t a = bits & ~SignBit<double>();
  const int exponent = static_cast<int>(a >> 52);
  const uint64_t fraction = a & ((uint64_t{1} << 52) - 1);
  const uint64_t normal_bits =
      (static_cast<uint64_t>(exponent - 896 > 0 ? exponent - 896 : 0) << 23) | (fraction >> 29);
  const uint64_t sig = fraction | (exponent > 0 ? uint64_t{1} << 52 : uint64_t{0});
  const int raw_shift = 926 - exponent;
  const int shift = raw_shift < 0 ? 0 : (raw_shift > 63 ? 63 : raw_shift);
  const uint64_t sub_bits = sig >> shift;
  const uint64_t out = (exponent >= 897 ? normal_bits : sub_bits) | (sign >> 32);
  return static_cast<uint32_t>(out);
}

// ---------------------------------------------------------------------------------
// Float-format scales (a scaler: see block_pow2.h).

// The per-block scale of a FloatFormat (NVFP4's E4M3, a P3109 format, signed or
// unsigned: amax / max_element is never negative), within the tensor scale S, in
// float64 (tf_block._float_scale).
template <typename T>
struct FloatScaler {
  using UInt = typename Container<T>::UInt;
  using Rand = uint64_t;  // the element rounding runs in float64

  // d = s_block * S (0: the block becomes zeros); true for a NaN block.
  static bool Scale(UInt amax, const BlockParams<T>& p, double* d_out) {
    const bool bad = amax >= InfBits<T>();
    const double amax64 = ToFloat64(bad ? UInt{0} : amax);
    const double quotient = amax64 / p.element_max_times_s;
    const double block_scale =
        p.scale_toward_zero
            ? QuantizeFloatElement<double, Rounding::kTowardZero>(quotient, p.scale64, 0)
            : QuantizeFloatElement<double, Rounding::kNearestEven>(quotient, p.scale64, 0);
    *d_out = block_scale * p.s;  // exact: <= 24 + 24 significant bits
    return bad;
  }

  // A float64 quotient v rounded to odd in float32 (toward zero, the last bit set when
  // inexact): rounding that to nearest (either tie), toward zero or toward +-infinity
  // at precision p gives v's own rounding when p <= 22 (Boldo & Melquiond, "Emulation of
  // FMA and correctly rounded sums: proved algorithms using rounding to odd", 2008), and
  // so the exact quotient's (a float64 quotient of a float32 by a 28-bit d is never
  // closer to a midpoint of the element than 2^-32 relatively, unless on it). Below
  // 2^-126 a tiny odd value and beyond float32 its largest (odd) value stand in: they
  // round like v when the element's quantum exceeds 2^-125 and it saturates
  // (BlockParams::element_rounds_in_float32).
  TFHFP8_ELEMENT_INLINE static float OddQuotient(double v) {
    const uint64_t bits = ToBits(v);
    const uint64_t a = bits & ~SignBit<double>();
    const uint64_t truncated = (a >> 29) - (uint64_t{1023 - 127} << 23);
    const uint64_t sticky = (a & ((uint64_t{1} << 29) - 1)) != 0 ? 1 : 0;
    uint64_t f = truncated | sticky;
    f = a < (uint64_t{1023 - 126} << 52) ? uint64_t{1} : f;
    f = a >= (uint64_t{1023 + 128} << 52) ? uint64_t{0x7F7FFFFF} : f;
    return FromBits<float>(static_cast<uint32_t>(f | (bits >> 32 & SignBit<float>())));
  }

  // Scale for blocks [0, n) from their amax: the same as Scale, the quotient rounded to
  // odd in float32 and then to the scale format in float32 (R: its rounding), as
  // OddQuotient argues (BlockParams::scale_rounds_in_float32).
  template <Rounding R>
  static void OddScales(const UInt* amax, int64_t n, const BlockParams<T>& p, double* d,
                        bool* bad) {
    const FloatParams<float> scale = p.scale32;
    const double divisor = p.element_max_times_s;
    const double s = p.s;
    for (int64_t b = 0; b < n; ++b) {
      const bool is_bad = amax[b] >= InfBits<T>();
      const double amax64 = ToFloat64(is_bad ? UInt{0} : amax[b]);
      const float block_scale =
          QuantizeFloatElement<float, R>(OddQuotient(amax64 / divisor), scale, 0);
      d[b] = static_cast<double>(block_scale) * s;
      bad[b] = is_bad;
    }
  }

  // d != 0 (a zero d is the caller's: zeros). `float32`: the final rounding of a
  // float32 result (unused for float64).
  template <Rounding R>
  TFHFP8_ELEMENT_INLINE static T Element(T x, double d, const FloatParams<double>& element,
                                         const FloatParams<double>& float32, uint64_t rand) {
    const UInt bits = ToBits(x);
    const double x64 = ToFloat64((bits & SignBit<T>()) | BlockMagnitude<T>(bits));
    const double q = QuantizeFloatElement<double, R>(x64 / d, element, rand);
    const double y = q * d;
    if constexpr (sizeof(T) == 8) {
      return y;
    } else {
      const double y32 = QuantizeFloatElement<double, Rounding::kNearestEven>(y, float32, 0);
      return FromBits<float>(Float32BitsOf(y32));
    }
  }
};

// ---------------------------------------------------------------------------------
// The loops.

// The largest magnitude of in[begin, end) (see TensorAmaxLoop).
template <typename T>
typename Container<T>::UInt TensorAmaxRange(const T* in, int64_t begin, int64_t end,
                                            bool saturate) {
  using UInt = typename Container<T>::UInt;
  constexpr UInt kMagnitude = ~SignBit<T>();
  constexpr UInt kInf = InfBits<T>();
  const UInt inf_as = saturate ? kInf - 1 : UInt{0};
  UInt largest = 0;
  for (int64_t j = begin; j < end; ++j) {
    const UInt a = ToBits(in[j]) & kMagnitude;
    const UInt v = a < kInf ? a : (a == kInf ? inf_as : UInt{0});
    largest = v > largest ? v : largest;
  }
  return largest;
}

template <typename T, Rounding R>
inline void FloatContiguous(const T* in, T* out, int64_t start, int64_t count,
                            const BlockParams<T>& p, const Keys& keys) {
  double d;
  if (FloatScaler<T>::Scale(BlockAmax(in + start, count, InfAs<T>(p.saturate)), p, &d)) {
    FillNan(out + start, count);
    return;
  }
  if (d == 0) {  // the scale underflows: zeros, signed where the element has a -0
    const auto zero_sign_mask = p.element.zero_sign_mask;
    for (int64_t j = start; j < start + count; ++j) {
      out[j] = FromBits<T>(ToBits(in[j]) & zero_sign_mask);
    }
    return;
  }
  const FloatParams<double> element = p.element64;
  const FloatParams<double> float32 = p.float32;
  QuantizeRangeIndexed<T, R, uint64_t>(in, out, start, start + count, keys,
                                       [=](T x, uint64_t rand, int64_t) {
    return FloatScaler<T>::template Element<R>(x, d, element, float32, rand);
  });
}

template <typename T, Rounding R>
inline void FloatColumns(const T* in, T* out, int64_t base, int64_t rows, int64_t width,
                         int64_t inner, const BlockParams<T>& p, const Keys& keys) {
  using UInt = typename Container<T>::UInt;
  UInt amax[kBlockTile];
  ColumnAmax(in, base, rows, width, inner, InfAs<T>(p.saturate), amax);
  double d[kBlockTile];
  bool bad[kBlockTile];
  for (int64_t c = 0; c < width; ++c) bad[c] = FloatScaler<T>::Scale(amax[c], p, &d[c]);
  const T nan = FromBits<T>(QuietNanBits<T>());
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t start = base + r * inner;
    QuantizeRangeIndexed<T, R, uint64_t>(in, out, start, start + width, keys,
                                         [&](T x, uint64_t rand, int64_t c) {
      if (bad[c]) return nan;
      if (d[c] == 0) return FromBits<T>(ToBits(x) & p.element.zero_sign_mask);
      return FloatScaler<T>::template Element<R>(x, d[c], p.element64, p.float32, rand);
    });
  }
}

// FloatRun's per-block cases.
enum class FloatBlock : uint8_t { kFast, kNan, kZero, kGeneral };

// Consecutive float32 blocks of one row with a FloatFormat scale (NVFP4), as Pow2Run:
// the scale d of every block first, then one long vectorized loop. The loop is
// FloatScaler::Element with its last step, the rounding of q * d to float32, done by
// the FPU's conversion, which is the same round-to-nearest-even when no result is
// below float32's smallest normal (the thread flushes those to zero) or above its
// largest: the blocks where some might be (a tiny or a huge d) are rounded again
// afterwards with FloatScaler::Element itself, as are NaN and zero-scale blocks.
template <typename T, Rounding R>
inline void FloatRun(const T* in, T* out, int64_t start, int64_t count, int64_t block_size,
                     const BlockParams<T>& p, const Keys& keys) {
  static_assert(sizeof(T) == 4, "FloatRun rounds float32 results");
  using UInt = typename Container<T>::UInt;
  double d_of[kRunElements];
  FloatBlock kind[kRunElements];  // per block
  bool any_general = false;
  // |q * d| for the smallest non-zero and the largest element q.
  const double smallest_q = FromBits<double>(
      p.element64.quantum_exponent >= -1022
          ? static_cast<uint64_t>(p.element64.quantum_exponent + 1023) << 52
          : uint64_t{1});
  const double largest_q = FromBits<double>(p.element64.max_bits);
  constexpr double kMinNormal = 0x1p-126;
  constexpr double kMax = 0x1.fffffep127;
  // Per block: amax, then scale d (one loop over the blocks, vectorized when the scale
  // rounds in float32 too), then its case.
  const int64_t blocks = (count + block_size - 1) / block_size;
  UInt amax[kRunElements];
  double d_block[kRunElements];
  bool bad[kRunElements];
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t first = b * block_size;
    const int64_t size = count - first < block_size ? count - first : block_size;
    amax[b] = BlockAmax(in + start + first, size, InfAs<T>(p.saturate));
  }
  if (p.scale_rounds_in_float32) {
    if (p.scale_toward_zero) {
      FloatScaler<T>::template OddScales<Rounding::kTowardZero>(amax, blocks, p, d_block, bad);
    } else {
      FloatScaler<T>::template OddScales<Rounding::kNearestEven>(amax, blocks, p, d_block, bad);
    }
  } else {
    for (int64_t b = 0; b < blocks; ++b) bad[b] = FloatScaler<T>::Scale(amax[b], p, &d_block[b]);
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const double d = d_block[b];
    const bool fast = !bad[b] && d > 0 && smallest_q * d >= kMinNormal && largest_q * d <= kMax;
    kind[b] = bad[b] ? FloatBlock::kNan
                     : (d == 0 ? FloatBlock::kZero
                               : (fast ? FloatBlock::kFast : FloatBlock::kGeneral));
    any_general |= !fast;
    // A placeholder for the other blocks' loop (their results are overwritten).
    d_block[b] = fast ? d : 1.0;
  }
  if (block_size == 16) {  // NVFP4's blocks: a constant trip count
    for (int64_t j = 0; j < count; ++j) d_of[j] = d_block[j / 16];
  } else {
    for (int64_t j = 0; j < count; ++j) d_of[j] = d_block[j / block_size];
  }
  const double* d_ptr = d_of;
  if (!DrawsBits(R) && p.element_rounds_in_float32) {
    // A rounding that draws no bits: the quotient rounded to odd in float32, then
    // rounded to the element in float32 (FloatScaler::OddQuotient).
    const FloatParams<float> element = p.element;
    QuantizeRangeIndexed<T, R, UInt>(in, out, start, start + count, keys,
                                     [=](T x, UInt, int64_t j) {
      const UInt bits = ToBits(x);
      const double d = d_ptr[j];
      const double x64 = ToFloat64((bits & SignBit<T>()) | BlockMagnitude<T>(bits));
      const float v = FloatScaler<T>::OddQuotient(x64 / d);
      const float q = QuantizeFloatElement<float, R>(v, element, 0);
      return static_cast<T>(static_cast<double>(q) * d);
    });
  } else {
    const FloatParams<double> element = p.element64;
    QuantizeRangeIndexed<T, R, uint64_t>(in, out, start, start + count, keys,
                                         [=](T x, uint64_t rand, int64_t j) {
      const UInt bits = ToBits(x);
      const double d = d_ptr[j];
      const double x64 = ToFloat64((bits & SignBit<T>()) | BlockMagnitude<T>(bits));
      const double q = QuantizeFloatElement<double, R>(x64 / d, element, rand);
      return static_cast<T>(q * d);
    });
  }
  if (!any_general) return;
  for (int64_t b = 0, first = 0; first < count; ++b, first += block_size) {
    const int64_t size = count - first < block_size ? count - first : block_size;
    if (kind[b] == FloatBlock::kNan) {
      FillNan(out + start + first, size);
    } else if (kind[b] != FloatBlock::kFast) {
      FloatContiguous<T, R>(in, out, start + first, size, p, keys);
    }
  }
}

// The units [begin, end) of `shape` (see BlockShape).
template <typename T, Rounding R>
void BlockRange(const T* in, T* out, const BlockShape& shape, int64_t begin, int64_t end,
                const BlockParams<T>& p, const Keys& keys) {
  constexpr bool kFloatRuns = sizeof(T) == 4;
  if (shape.inner == 1 && (p.power_of_two || kFloatRuns) && shape.block_size <= kRunElements) {
    // Runs of whole blocks of one row, at most kRunElements elements each.
    const int64_t per_run = kRunElements / shape.block_size;
    for (int64_t unit = begin; unit < end;) {
      const int64_t row = unit / shape.blocks;
      const int64_t block = unit % shape.blocks;
      int64_t stop = unit + per_run;
      stop = stop < end ? stop : end;
      stop = stop < (row + 1) * shape.blocks ? stop : (row + 1) * shape.blocks;
      const int64_t first = block * shape.block_size;
      const int64_t last = (block + stop - unit) * shape.block_size;
      const int64_t count = (last < shape.n ? last : shape.n) - first;
      if (p.power_of_two) {
        Pow2Run<T, R>(in, out, row * shape.n + first, count, shape.block_size, p, keys);
      } else if constexpr (kFloatRuns) {
        FloatRun<T, R>(in, out, row * shape.n + first, count, shape.block_size, p, keys);
      }
      unit = stop;
    }
    return;
  }
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t tile = unit % shape.tiles;
    const int64_t block = (unit / shape.tiles) % shape.blocks;
    const int64_t row = unit / shape.tiles / shape.blocks;
    const int64_t first = block * shape.block_size;
    const int64_t rows =
        shape.n - first < shape.block_size ? shape.n - first : shape.block_size;
    if (shape.inner == 1) {
      const int64_t start = row * shape.n + first;
      if (p.power_of_two) {
        Pow2Contiguous<T, R>(in, out, start, rows, p, keys);
      } else {
        FloatContiguous<T, R>(in, out, start, rows, p, keys);
      }
    } else {
      const int64_t column = tile * shape.tile;
      const int64_t width =
          shape.inner - column < shape.tile ? shape.inner - column : shape.tile;
      const int64_t base = (row * shape.n + first) * shape.inner + column;
      if (p.power_of_two) {
        Pow2Columns<T, R>(in, out, base, rows, width, shape.inner, p, keys);
      } else {
        FloatColumns<T, R>(in, out, base, rows, width, shape.inner, p, keys);
      }
    }
  }
}

}  // inline namespace TFHFP8_VARIANT
}  // namespace tfhfp8

#endif  // TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_BLOCK_ROUNDING_H_
