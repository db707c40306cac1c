// Block-scaled rounding, part 1 (block_rounding.h includes it and has the rest: the
// float-format scales and BlockRange, the entry point). Here: what both kinds of scale
// share (the block's amax, x * 2^k on the bits, the tile and run sizes) and the E8M0
// power-of-two scales of OCP MX, Pow2Scaler, with their loops (one block, the columns
// of a tile, runs of short blocks and their float32 nearest-even fast path): the same
// algorithm as tf_block._power_of_two, tested to agree bit for bit.
// Compiled once per CPU variant (see cpu_dispatch.h), like rounding.h.

#ifndef TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_BLOCK_POW2_H_
#define TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_BLOCK_POW2_H_

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "quantize_types.h"
#include "rounding.h"

namespace tfhfp8 {
inline namespace TFHFP8_VARIANT {

// Columns of one unit when the blocks run along a non-last axis (BlockShape::tile).
constexpr int kBlockTile = 128;
// E8M0 scales are 2^k for k in [-127, 127].
constexpr int kE8m0MaxExponent = 127;

// Elements of one run of short contiguous blocks (Pow2Run, FloatRun).
constexpr int64_t kRunElements = 4096;

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

// ---------------------------------------------------------------------------------
// Scales. A scaler holds the scale of up to kBlockTile blocks (one per column) and
// rounds elements with it.

// Transformer Engine's MXFP8 scale exponent (cuBLAS' "RCEIL"): float_to_e8m0 of the
// float32 product fl32(amax * max_rcp), i.e. the least k in [-127, 127] with 2^k >=
// that product. `amax` is first rounded to float32 (a float64 block). The product is
// exact in double; rounding it to float32 matters only just above a power of two 2^j,
// within half a float32 ulp (2^(max(j, -126) - 24)), where it rounds down onto 2^j.
// (An amax a float32 flush would zero gives k = -127 either way.)
inline int RceilExponent(double amax, double max_rcp) {
  const double v = static_cast<double>(static_cast<float>(amax)) * max_rcp;
  if (!(v > 0)) return -kE8m0MaxExponent;
  if (!std::isfinite(v)) return kE8m0MaxExponent;
  const int j = std::ilogb(v);
  const double above = v - std::ldexp(1.0, j);  // exact: v lies in [2^j, 2^(j+1))
  const int k = above <= std::ldexp(1.0, std::max(j, -126) - 24) ? j : j + 1;
  return std::clamp(k, -kE8m0MaxExponent, kE8m0MaxExponent);
}

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
    if (p.rceil) k = RceilExponent(static_cast<double>(FromBits<T>(amax)), p.max_rcp);
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

// ---------------------------------------------------------------------------------
// The loops: the amax of blocks (both kinds of scale), then E8M0's.

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

}  // inline namespace TFHFP8_VARIANT
}  // namespace tfhfp8

#endif  // TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_BLOCK_POW2_H_
