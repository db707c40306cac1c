// Block-scaled rounding (tfhfp8.BlockScaled: OCP MX, NVFP4), fused: per block the
// absolute maximum, the scale and the element rounding, while the block is in cache.
//
// The same algorithm as tfhfp8/ops/tf_block.py, which documents it step by step; the
// two are tested to agree bit for bit. The element rounding is rounding.h's
// QuantizeFloatElement, with the same random bits (a hash of the flat index).
// Compiled once per CPU variant (see cpu_dispatch.h), like rounding.h.

#ifndef TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_BLOCK_ROUNDING_H_
#define TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_BLOCK_ROUNDING_H_

#include <cstdint>

#include "quantize_types.h"
#include "rounding.h"

namespace tfhfp8 {
inline namespace TFHFP8_VARIANT {

// Columns of one unit when the blocks run along a non-last axis (BlockShape::tile).
constexpr int kBlockTile = 128;
// E8M0 scales are 2^k for k in [-127, 127].
constexpr int kE8m0MaxExponent = 127;

// |x|'s bits as a block's element: an infinity becomes the largest finite value.
// (Without saturation an infinity makes its block NaN and is never rounded.)
template <typename T>
TFHFP8_ELEMENT_INLINE typename Container<T>::UInt BlockMagnitude(typename Container<T>::UInt bits) {
  const auto a = bits & ~SignBit<T>();
  return a == InfBits<T>() ? a - 1 : a;
}

// x * 2^k on the bits (tf_block._ldexp): exact when representable; results below the
// container's smallest subnormal are truncated toward zero. Finite x only.
template <typename T>
TFHFP8_ELEMENT_INLINE typename Container<T>::UInt LdexpBits(typename Container<T>::UInt bits,
                                                            int k) {
  using C = Container<T>;
  using UInt = typename C::UInt;
  constexpr int kMinExponent = 1 - C::kExponentBias - C::kMantissa;
  const UInt sign = bits & SignBit<T>();
  int exponent1;
  UInt sig;
  Significand<T>(bits & ~SignBit<T>(), &exponent1, &sig);
  const int qe = exponent1 - (C::kExponentBias + C::kMantissa) + k;
  const int raw_shift = kMinExponent - qe;
  const int shift = raw_shift < 0 ? 0 : (raw_shift > C::kWidth - 1 ? C::kWidth - 1 : raw_shift);
  const UInt code = sig >> shift;
  return sign | ScaledBits<T>(code, qe > kMinExponent ? qe : kMinExponent);
}

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
// Scales. A scaler holds the scale of up to kBlockTile blocks (one per column) and
// rounds elements with it.

// OCP MX: the scale 2^k of each block, from its amax (tf_block._power_of_two).
template <typename T>
struct Pow2Scaler {
  using UInt = typename Container<T>::UInt;
  using Rand = UInt;  // the element rounding runs in T

  // Returns true for a NaN block (a NaN, or an infinity without saturation, or a
  // float64 block beyond 2^127 * 2^emax without saturation).
  static bool Scale(UInt amax, const BlockParams<T>& p, int* k_out) {
    using C = Container<T>;
    constexpr UInt kMask = (UInt{1} << C::kMantissa) - 1;
    bool bad = amax >= InfBits<T>();
    if (bad) amax = 0;
    const UInt v = amax > 1 ? amax : UInt{1};
    const int field = static_cast<int>(v >> C::kMantissa);
    int e;
    UInt fraction;
    if (field == 0) {
      // A subnormal's integer mantissa field converts exactly to a float with the same
      // significand; its exponent gives the position of the top bit.
      const UInt as_float = ToBits(static_cast<T>(v & kMask));
      e = static_cast<int>(as_float >> C::kMantissa) - C::kExponentBias +
          (1 - C::kExponentBias - C::kMantissa);
      fraction = as_float & kMask;
    } else {
      e = field - C::kExponentBias;
      fraction = v & kMask;
    }
    int k = e - p.emax;
    if (p.ceil && fraction > p.max_fraction) ++k;  // up when amax's significand exceeds max's
    if (amax == 0) k = -kE8m0MaxExponent;
    if (!p.saturate && k > kE8m0MaxExponent) bad = true;
    k = k < -kE8m0MaxExponent ? -kE8m0MaxExponent : (k > kE8m0MaxExponent ? kE8m0MaxExponent : k);
    *k_out = bad ? 0 : k;
    return bad;
  }

  template <Rounding R>
  TFHFP8_ELEMENT_INLINE static T Element(T x, int k, const FloatParams<T>& element, UInt rand) {
    const UInt a = BlockMagnitude<T>(ToBits(x));
    const UInt scaled = LdexpBits<T>((ToBits(x) & SignBit<T>()) | a, -k);
    const T q = QuantizeFloatElement<T, R>(FromBits<T>(scaled), element, rand);
    return FromBits<T>(LdexpBits<T>(ToBits(q), k));
  }
};

// The per-block scale of a FloatFormat (NVFP4), within the tensor scale S, in float64
// (tf_block._float_scale).
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
    *d_out = block_scale * p.s;  // exact: <= 4 + 24 significant bits
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

template <typename T>
inline void FillNan(T* out, int64_t count) {
  const T nan = FromBits<T>(QuietNanBits<T>());
  for (int64_t j = 0; j < count; ++j) out[j] = nan;
}

// The block's amax as bits: the largest of the magnitudes, where an infinity counts as
// `inf_as` (the largest finite value when saturating, else itself: a NaN block).
template <typename T>
inline typename Container<T>::UInt BlockAmax(const T* in, int64_t count,
                                             typename Container<T>::UInt inf_as) {
  using UInt = typename Container<T>::UInt;
  UInt amax = 0;
  for (int64_t j = 0; j < count; ++j) {
    const UInt a = ToBits(in[j]) & ~SignBit<T>();
    const UInt v = a == InfBits<T>() ? inf_as : a;
    amax = v > amax ? v : amax;
  }
  return amax;
}

template <typename T>
constexpr typename Container<T>::UInt InfAs(bool saturate) {
  return saturate ? InfBits<T>() - 1 : InfBits<T>();
}

// One block of contiguous elements [start, start + count).
template <typename T, Rounding R>
inline void Pow2Contiguous(const T* in, T* out, int64_t start, int64_t count,
                           const BlockParams<T>& p, const Keys& keys) {
  using UInt = typename Container<T>::UInt;
  int k;
  if (Pow2Scaler<T>::Scale(BlockAmax(in + start, count, InfAs<T>(p.saturate)), p, &k)) {
    FillNan(out + start, count);
    return;
  }
  const FloatParams<T> element = p.element;
  QuantizeRange<T, R>(in, out, start, start + count, keys, [=](T x, UInt rand) {
    return Pow2Scaler<T>::template Element<R>(x, k, element, rand);
  });
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

// amax[c] of the columns c < width of `rows` rows (stride `inner`) from `base`.
template <typename T>
inline void ColumnAmax(const T* in, int64_t base, int64_t rows, int64_t width, int64_t inner,
                       typename Container<T>::UInt inf_as, typename Container<T>::UInt* amax) {
  using UInt = typename Container<T>::UInt;
  for (int64_t c = 0; c < width; ++c) amax[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = in + base + r * inner;
    for (int64_t c = 0; c < width; ++c) {
      const UInt a = ToBits(row[c]) & ~SignBit<T>();
      const UInt v = a == InfBits<T>() ? inf_as : a;
      amax[c] = v > amax[c] ? v : amax[c];
    }
  }
}

// Blocks along a non-last axis: a unit is `rows` rows (stride `inner`) of `width`
// consecutive columns starting at flat index `base`; each column is one block.
template <typename T, Rounding R>
inline void Pow2Columns(const T* in, T* out, int64_t base, int64_t rows, int64_t width,
                        int64_t inner, const BlockParams<T>& p, const Keys& keys) {
  using UInt = typename Container<T>::UInt;
  UInt amax[kBlockTile];
  ColumnAmax(in, base, rows, width, inner, InfAs<T>(p.saturate), amax);
  int k[kBlockTile];
  UInt nan_mask[kBlockTile];  // all ones in a NaN block
  for (int64_t c = 0; c < width; ++c) {
    nan_mask[c] = Pow2Scaler<T>::Scale(amax[c], p, &k[c]) ? ~UInt{0} : UInt{0};
  }
  const FloatParams<T> element = p.element;
  const UInt nan = QuietNanBits<T>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t start = base + r * inner;
    QuantizeRangeIndexed<T, R, UInt>(in, out, start, start + width, keys,
                                     [&](T x, UInt rand, int64_t c) {
      const UInt y = ToBits(Pow2Scaler<T>::template Element<R>(x, k[c], element, rand));
      return FromBits<T>((y & ~nan_mask[c]) | (nan & nan_mask[c]));
    });
  }
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

// Pow2Run's element loop for float32 and round-to-nearest-even, when every scale 2^k
// of the run is large enough (k >= -125 - quantum exponent of the element) that what
// the scaling would make a float32 subnormal rounds to a signed zero: then scaling is
// an exponent-field shift, and the element rounding QuantizeFloatNearestEven (its FPU
// step sees normal operands only, so TF's flush-to-zero does not matter). The same
// bits as Pow2Scaler::Element; returns false, doing nothing, when it does not apply.
// `min_k`: the smallest k of the run.
template <typename T, Rounding R>
inline bool Pow2NearestEvenFast(const T* in, T* out, int64_t start, int64_t count,
                                const int* k_of, int min_k, const FloatParams<T>& element) {
  if constexpr (sizeof(T) != 4 || R != Rounding::kNearestEven) {
    return false;
  } else {
    const FloatParams<float> e = element;
    if (!NearestEvenFastApplies(e) || e.quantum_exponent < -125) return false;
    if (min_k < -125 - e.quantum_exponent) return false;
    const uint32_t zero_sign_mask = e.zero_sign_mask;
    // An unsigned (P3109) element: a negative x is below its range, +0 when saturating,
    // which a zero magnitude gives (P3109 formats keep no sign on a zero).
    const uint32_t unsigned_mask = e.is_unsigned != 0 ? ~0u : 0u;
    // kPlain: the operand is never negative nor NaN (NaN blocks are filled afterwards).
    MapElements(in + start, out + start, count, [=](float x, int64_t j) {
      const int k = k_of[j];
      const uint32_t bits = ToBits(x);
      const uint32_t sign = bits & SignBit<float>();
      const uint32_t below = unsigned_mask & (0u - (bits >> 31));
      const uint32_t a = BlockMagnitude<float>(bits) & ~below;
      // |x| 2^-k below 2^-126 (x subnormal, or its exponent field <= k): rounds to
      // zero. (One comparison: GCC does not vectorize a select between two conditions.)
      const int exponent = static_cast<int>(a >> 23);
      const bool tiny = exponent <= (k > 0 ? k : 0);
      const uint32_t shift = static_cast<uint32_t>(k) << 23;
      const float scaled = FromBits<float>(tiny ? 0u : a - shift);
      const uint32_t q = ToBits(QuantizeFloatNearestEven<true>(scaled, e));
      return FromBits<float>(q == 0 ? (sign & zero_sign_mask) : (sign | (q + shift)));
    });
    return true;
  }
}

// Elements of one run of short contiguous blocks (Pow2Run).
constexpr int64_t kRunElements = 4096;

// Consecutive blocks of one row, [start, start + count), the first block starting at
// `start` (the last may be partial): the scales of all of them first, then one long
// vectorized loop with each element's exponent (a loop per short block would be mostly
// overhead), then NaN blocks filled.
template <typename T, Rounding R>
inline void Pow2Run(const T* in, T* out, int64_t start, int64_t count, int64_t block_size,
                    const BlockParams<T>& p, const Keys& keys) {
  using UInt = typename Container<T>::UInt;
  int k_of[kRunElements];
  bool bad[kRunElements];  // per block
  bool any_bad = false;
  int min_k = kE8m0MaxExponent;
  for (int64_t b = 0, first = 0; first < count; ++b, first += block_size) {
    const int64_t size = count - first < block_size ? count - first : block_size;
    int k;
    bad[b] =
        Pow2Scaler<T>::Scale(BlockAmax(in + start + first, size, InfAs<T>(p.saturate)), p, &k);
    any_bad |= bad[b];
    min_k = k < min_k ? k : min_k;
    for (int64_t j = first; j < first + size; ++j) k_of[j] = k;
  }
  const FloatParams<T> element = p.element;
  const int* k_ptr = k_of;
  if (!Pow2NearestEvenFast<T, R>(in, out, start, count, k_ptr, min_k, element)) {
    QuantizeRangeIndexed<T, R, UInt>(in, out, start, start + count, keys,
                                     [=](T x, UInt rand, int64_t j) {
      return Pow2Scaler<T>::template Element<R>(x, k_ptr[j], element, rand);
    });
  }
  if (!any_bad) return;
  for (int64_t b = 0, first = 0; first < count; ++b, first += block_size) {
    const int64_t size = count - first < block_size ? count - first : block_size;
    if (bad[b]) FillNan(out + start + first, size);
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
