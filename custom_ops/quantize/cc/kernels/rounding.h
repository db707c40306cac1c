// Exact rounding of float32/float64 values to narrower formats, element by element.
//
// The same algorithm as tfhfp8/ops/tf_backend.py, which documents it; the two are
// tested to agree bit for bit. Everything here is branch-free integer arithmetic on
// the input's bits so that the loops in quantize_loops.cc vectorize.
//
// This header is compiled once per CPU variant (cpu_dispatch.h), each time with other
// instruction sets: everything in it lives in the inline namespace TFHFP8_VARIANT, so
// that no variant's copy of an inline function can stand in for another's at link time.

#ifndef TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_ROUNDING_H_
#define TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_ROUNDING_H_

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "quantize_types.h"

#ifndef TFHFP8_VARIANT
#define TFHFP8_VARIANT baseline
#endif

namespace tfhfp8 {
inline namespace TFHFP8_VARIANT {




template <typename T>
TFHFP8_ELEMENT_INLINE typename Container<T>::UInt ToBits(T x) {
  typename Container<T>::UInt u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

template <typename T>
TFHFP8_ELEMENT_INLINE T FromBits(typename Container<T>::UInt u) {
  T x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

template <typename T>
constexpr typename Container<T>::UInt InfBits() {
  using C = Container<T>;
  return ((typename C::UInt{1} << (C::kWidth - C::kMantissa - 1)) - 1) << C::kMantissa;
}

template <typename T>
constexpr typename Container<T>::UInt QuietNanBits() {
  return InfBits<T>() | (typename Container<T>::UInt{1} << (Container<T>::kMantissa - 1));
}

template <typename T>
constexpr typename Container<T>::UInt SignBit() {
  return typename Container<T>::UInt{1} << (Container<T>::kWidth - 1);
}

// a < b for magnitudes (bits with the sign clear), compared as signed integers: one
// instruction where AVX2 has no unsigned comparison. A rounded NaN magnitude may carry
// into the sign bit; every caller gives NaNs their own result.
template <typename UInt>
TFHFP8_ELEMENT_INLINE bool MagnitudeLess(UInt a, UInt b) {
  using SInt = std::make_signed_t<UInt>;
  return static_cast<SInt>(a) < static_cast<SInt>(b);
}

// ---------------------------------------------------------------------------------
// Counter-based random bits: a hash of (seed, element index). The constants are
// shared with tf_backend.py.

// lowbias32 (C. Wellons): a bijective 32-bit integer hash.
TFHFP8_ELEMENT_INLINE uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

inline Keys MakeKeys(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint32_t lo = static_cast<uint32_t>(s);
  const uint32_t hi = static_cast<uint32_t>(s >> 32);
  Keys keys;
  keys.key0 = Mix32(lo ^ Mix32(hi ^ 0x2545F491u));
  keys.key1 = Mix32(keys.key0 ^ 0x68E31DA4u);
  return keys;
}

template <typename UInt>
inline UInt RandomBits(uint64_t index, const Keys& keys);

template <>
TFHFP8_ELEMENT_INLINE uint32_t RandomBits<uint32_t>(uint64_t index, const Keys& keys) {
  const uint32_t lo = static_cast<uint32_t>(index);
  const uint32_t hi = static_cast<uint32_t>(index >> 32);
  return Mix32((lo * 0x9E3779B9u) ^ (hi * 0x85EBCA77u) ^ keys.key0);
}

template <>
TFHFP8_ELEMENT_INLINE uint64_t RandomBits<uint64_t>(uint64_t index, const Keys& keys) {
  const uint32_t lo = static_cast<uint32_t>(index);
  const uint32_t hi = static_cast<uint32_t>(index >> 32);
  const uint32_t word0 = Mix32((lo * 0x9E3779B9u) ^ (hi * 0x85EBCA77u) ^ keys.key0);
  const uint32_t word1 = Mix32((lo * 0xC2B2AE3Du) ^ (hi * 0x27D4EB2Fu) ^ keys.key1);
  return (static_cast<uint64_t>(word0) << 32) | word1;
}

// ---------------------------------------------------------------------------------
// Integer rounding primitives.

constexpr bool DrawsBits(Rounding r) {
  return r == Rounding::kStochastic || r >= Rounding::kStochasticBits;
}

// The dropped fraction `dropped / 2^d` of v = kept * 2^d + dropped as a `bits`-bit
// integer (bits <= 24), rounded to nearest (ties to odd when `odd`) or truncated
// (`nearest` false). d may exceed kLimit only where v < 2^(kLimit - 1), whose bits all
// narrow to 0 then.
template <int kLimit, typename UInt>
TFHFP8_ELEMENT_INLINE UInt FractionBits(UInt v, UInt kept, UInt dropped, int d, int bits,
                                        bool nearest, bool odd) {
  constexpr int kWidth = sizeof(UInt) * 8;
  const int up = bits - d < 0 ? 0 : (bits - d > kWidth - 1 ? kWidth - 1 : bits - d);
  const UInt wide = dropped << up;
  const int shift = d - bits < 1 ? 1 : (d - bits > kLimit ? kLimit : d - bits);
  const UInt low = (v >> shift) & 1;
  const UInt tie_up = odd ? UInt{1} - low : low;
  const UInt rounded = (v + ((UInt{1} << (shift - 1)) - 1) + tie_up) >> shift;
  const UInt narrowed = (nearest ? rounded : v >> shift) - (kept << bits);
  // d == bits + 1 when truncating: `shift` 1 is right, as for any d > bits.
  return d > bits ? narrowed : wide;
}

// Whether the roundings other than nearest even, toward zero and the full-precision
// stochastic one add one to `kept` (see tf_backend._round_up): `d` dropped bits, at most
// kLimit of them for nearest-away; `rand` the r = `bits` random bits.
template <Rounding R, int kLimit, typename UInt>
TFHFP8_ELEMENT_INLINE UInt RoundUp(UInt v, UInt kept, UInt dropped, int d, bool negative, UInt rand,
                                   int bits) {
  if (R == Rounding::kNearestAway) {
    const int clamped = d < kLimit ? d : kLimit;
    const UInt half = (UInt{1} << clamped) >> 1;
    return static_cast<UInt>((dropped >= half) & (half > 0));
  }
  if (R == Rounding::kTowardPositive) return static_cast<UInt>((dropped != 0) & !negative);
  if (R == Rounding::kTowardNegative) return static_cast<UInt>((dropped != 0) & negative);
  if (R == Rounding::kStochasticFastBits) {
    // delta + (0.5 + rand) 2^-r >= 1: floor(delta 2^(r+1)) + 2 rand + 1 reaches 2^(r+1).
    const UInt t = FractionBits<kLimit>(v, kept, dropped, d, bits + 1, false, false);
    return static_cast<UInt>(t + (rand << 1) + 1 >= (UInt{1} << (bits + 1)));
  }
  const bool odd = R == Rounding::kStochasticOddBits;
  const UInt f = FractionBits<kLimit>(v, kept, dropped, d, bits, true, odd);
  return static_cast<UInt>(f + rand >= (UInt{1} << bits));
}

// Drops the d low bits of v (0 <= d < width). `half_minus_one` = 2^(d-1) - 1 and
// `lsb` = (d > 0) are precomputed so that d == 0 needs no branch. `negative` and
// `bits` (the r of the *Bits roundings) only matter to the roundings beyond the first
// three.
template <Rounding R, typename UInt>
TFHFP8_ELEMENT_INLINE UInt RoundStatic(UInt v, int d, UInt half_minus_one, UInt lsb, UInt rand,
                                       bool negative = false, int bits = 0) {
  constexpr int kWidth = sizeof(UInt) * 8;
  const UInt kept = v >> d;
  if (R == Rounding::kTowardZero) return kept;
  if (R == Rounding::kNearestEven) return (v + half_minus_one + (kept & lsb)) >> d;
  const UInt dropped = v & ((UInt{1} << d) - 1);
  if (R != Rounding::kStochastic) {
    return kept + RoundUp<R, kWidth - 1>(v, kept, dropped, d, negative, rand, bits);
  }
  const UInt threshold = d == 0 ? UInt{0} : rand >> ((kWidth - d) & (kWidth - 1));
  return kept + static_cast<UInt>(threshold < dropped);
}

// Rounds sig / 2^s to an integer, s >= 0, sig < 2^(mantissa + 1). (s == 0 occurs for
// the subnormals of a format with the container's own layout, e.g. FloatFormat(8, 23).)
template <Rounding R, typename T>
TFHFP8_ELEMENT_INLINE typename Container<T>::UInt RoundVariable(
    typename Container<T>::UInt sig, int s, typename Container<T>::UInt rand, bool negative = false,
    int bits = 0) {
  using C = Container<T>;
  using UInt = typename C::UInt;
  constexpr int kWidth = C::kWidth;
  const int shift = s < C::kMantissa + 2 ? s : C::kMantissa + 2;
  const UInt kept = sig >> shift;
  if (R == Rounding::kTowardZero) return kept;
  if (R == Rounding::kNearestEven) {
    const UInt lsb = shift > 0 ? UInt{1} : UInt{0};
    const UInt half_minus_one = ((UInt{1} << shift) >> 1) - lsb;
    return (sig + half_minus_one + (kept & lsb)) >> shift;
  }
  const UInt dropped = sig & ((UInt{1} << shift) - 1);
  if (R != Rounding::kStochastic) {
    return kept + RoundUp<R, C::kMantissa + 2>(sig, kept, dropped, s, negative, rand, bits);
  }
  const int up_shift = kWidth - s < 0 ? 0 : (kWidth - s > kWidth - 1 ? kWidth - 1 : kWidth - s);
  const int down_shift = s - kWidth < 0 ? 0 : (s - kWidth > kWidth - 1 ? kWidth - 1 : s - kWidth);
  const UInt fraction = s <= kWidth ? dropped << up_shift : sig >> down_shift;
  return kept + static_cast<UInt>(rand < fraction);
}

// (biased exponent clamped to >= 1, significand with its implicit bit) of |x|'s bits.
template <typename T>
TFHFP8_ELEMENT_INLINE void Significand(typename Container<T>::UInt a, int* exponent1,
                                       typename Container<T>::UInt* sig) {
  using C = Container<T>;
  using UInt = typename C::UInt;
  const int exponent = static_cast<int>(a >> C::kMantissa);
  const UInt implicit = exponent > 0 ? (UInt{1} << C::kMantissa) : UInt{0};
  *sig = (a & ((UInt{1} << C::kMantissa) - 1)) | implicit;
  *exponent1 = exponent > 1 ? exponent : 1;
}

// Bits of code * 2^qe, exactly, for qe >= the container's smallest subnormal exponent.
// Integer arithmetic only: TensorFlow's threads flush subnormal products to zero.
template <typename T>
TFHFP8_ELEMENT_INLINE typename Container<T>::UInt ScaledBits(
    typename Container<T>::UInt code, int qe) {
  using C = Container<T>;
  using UInt = typename C::UInt;
  constexpr int kMinExponent = 1 - C::kExponentBias - C::kMantissa;
  // Below 2^(2 - bias) (subnormals and the first binade) bits are linear in the value.
  const int limit = 2 - C::kExponentBias - qe;
  const bool linear = code < (UInt{1} << (limit > 0 ? limit : 0));
  const int shift = qe - kMinExponent;
  const UInt linear_bits = code << (shift < C::kWidth - 1 ? shift : C::kWidth - 1);
  const UInt offset = static_cast<UInt>(static_cast<int64_t>(qe)) << C::kMantissa;
  // code < 2^(kMantissa + 2): converted as a signed integer, one instruction (AVX2 has
  // no unsigned conversion).
  using SInt = std::make_signed_t<UInt>;
  const UInt normal_bits = ToBits(static_cast<T>(static_cast<SInt>(code))) + offset;
  return linear ? linear_bits : normal_bits;
}

// ---------------------------------------------------------------------------------
// Rounding to a FloatFormat.

// The parameters of the rounding to a FloatFormat.
template <typename T>
inline FloatParams<T> ComputeFloatParams(const FloatFormatSpec& format,
                                         const RoundingOptions& options) {
  using UInt = typename Container<T>::UInt;
  FloatParams<T> p;
  using C = Container<T>;
  const int m = format.mantissa_bits;
  const int exponent_bits = format.exponent_bits;
  const Specials specials = format.specials;
  const bool is_signed = format.is_signed;
  const bool saturate = options.saturate;
  const bool propagate_inf = options.propagate_inf;
  p.emin = 1 - format.bias + C::kExponentBias;
  p.d = C::kMantissa - m;
  p.sub_mantissa = format.subnormals ? m : 0;
  p.rebias = static_cast<UInt>(p.emin - 1) << C::kMantissa;
  p.half_minus_one = p.d > 0 ? (UInt{1} << (p.d - 1)) - 1 : 0;
  p.lsb = p.d > 0 ? 1 : 0;
  const UInt all_ones = (UInt{1} << (exponent_bits + m)) - 1;
  const bool p3109 = specials == Specials::kP3109Extended || specials == Specials::kP3109Finite;
  if (specials == Specials::kIeee) {
    p.max_code = (((UInt{1} << exponent_bits) - 1) << m) - 1;
  } else {
    // As tfhfp8.FloatFormat.max_code: fn's NaN or P3109's inf above max, and unsigned
    // P3109's NaN at the top.
    const bool reserved = specials == Specials::kFn || specials == Specials::kP3109Extended;
    p.max_code = all_ones - (reserved ? 1 : 0) - (is_signed ? 0 : 1);
  }
  p.max_bits = (p.max_code << p.d) + p.rebias;
  const bool has_inf = specials == Specials::kIeee || specials == Specials::kP3109Extended;
  const UInt unsaturated = specials == Specials::kFinite ? p.max_bits
                           : has_inf                     ? InfBits<T>()
                                                         : QuietNanBits<T>();
  p.overflow_bits = saturate ? p.max_bits : unsaturated;
  p.inf_bits_out = saturate && !propagate_inf ? p.max_bits : unsaturated;
  p.saturate_finite = saturate && propagate_inf;
  const bool has_nan = specials != Specials::kFinite;
  p.nan_xor = (has_nan || saturate) ? QuietNanBits<T>() : SignBit<T>();
  p.zero_sign_mask = specials == Specials::kFnuz || p3109 ? UInt{0} : SignBit<T>();
  p.is_unsigned = !is_signed;
  p.below_bits = saturate ? UInt{0} : QuietNanBits<T>();
  p.below_inf_bits = saturate && !propagate_inf ? UInt{0} : QuietNanBits<T>();
  p.random_bits = options.random_bits;
  p.quantum_exponent = 1 - format.bias - p.sub_mantissa;
  return p;
}

// What every rounding to a FloatFormat ends with, given the input's magnitude bits `a`
// and sign bit, the rounded magnitude and whether it overflows: the overflow
// behaviour, the sign of zero, NaN, and the range of unsigned formats.
// kSigned: p.is_unsigned and p.saturate_finite are known to be 0 (fewer instructions).
template <typename T, Rounding R, bool kSigned = false>
TFHFP8_ELEMENT_INLINE T FinishFloat(typename Container<T>::UInt a, typename Container<T>::UInt sign,
                                    typename Container<T>::UInt magnitude, bool overflow,
                                    const FloatParams<T>& p) {
  using UInt = typename Container<T>::UInt;
  // A rounding toward zero never grows a magnitude: a finite overflow gives max (IEEE
  // 754 §7.4), as under sat_propagate. (Masks, not bools: GCC vectorizes bool selects
  // on the sign only for some R.)
  const UInt negative_mask = UInt{0} - (sign >> (Container<T>::kWidth - 1));
  const UInt toward_zero_mask = R == Rounding::kTowardZero       ? ~UInt{0}
                                : R == Rounding::kTowardPositive ? negative_mask
                                : R == Rounding::kTowardNegative ? ~negative_mask
                                                                 : UInt{0};
  const UInt max_mask =
      kSigned ? toward_zero_mask : toward_zero_mask | (UInt{0} - p.saturate_finite);
  const bool is_inf = a == InfBits<T>();
  const UInt finite_overflow = (p.max_bits & max_mask) | (p.overflow_bits & ~max_mask);
  magnitude = overflow ? (is_inf ? p.inf_bits_out : finite_overflow) : magnitude;
  sign = magnitude == 0 ? (sign & p.zero_sign_mask) : sign;
  const bool is_nan = MagnitudeLess(InfBits<T>(), a);
  // Unsigned: a negative nonzero result is below the range (a zero's sign is gone).
  const UInt below = is_inf ? p.below_inf_bits : p.below_bits;
  const UInt result =
      (!kSigned & (p.is_unsigned != 0) & (sign != 0)) ? below : (sign | magnitude);
  return FromBits<T>(is_nan ? (sign ^ p.nan_xor) : result);
}

template <typename T, Rounding R>
TFHFP8_ELEMENT_INLINE T QuantizeFloatElement(T x, const FloatParams<T>& p,
                                             typename Container<T>::UInt rand) {
  using C = Container<T>;
  using UInt = typename C::UInt;
  const UInt bits = ToBits(x);
  UInt sign = bits & SignBit<T>();
  const UInt a = bits & ~SignBit<T>();
  const int exponent = static_cast<int>(a >> C::kMantissa);
  const bool normal = exponent >= p.emin;
  const bool negative = sign != 0;
  // The *Bits roundings use the top r bits.
  if (R >= Rounding::kStochasticBits) rand >>= (C::kWidth - p.random_bits) & (C::kWidth - 1);

  // Normal path: the target code, then its bits in the container.
  const UInt code = RoundStatic<R, UInt>(a - p.rebias, p.d, p.half_minus_one, p.lsb, rand,
                                         negative, p.random_bits);
  const UInt normal_bits = (code << p.d) + p.rebias;
  const bool overflow = normal & (code > p.max_code);  // `&`: no branch

  // Fixed-quantum path: the format's subnormals and zero.
  int exponent1;
  UInt sig;
  Significand<T>(a, &exponent1, &sig);
  const int s_raw = C::kMantissa - p.sub_mantissa + p.emin - exponent1;
  const int s = s_raw > 0 ? s_raw : 0;  // 0: the container's own subnormals, exact
  const UInt sub_code = RoundVariable<R, T>(sig, s, rand, negative, p.random_bits);
  const UInt sub_bits = ScaledBits<T>(sub_code, p.quantum_exponent);

  return FinishFloat<T, R>(a, sign, normal ? normal_bits : sub_bits, overflow, p);
}


// QuantizeFloatElement<float, Rounding::kNearestEven>(x, p, 0) in about half the
// instructions, for the inner loop of the accumulating matmul (accumulate_loops.cc):
// the same bits for every float32 x (tested bit for bit against it), provided that
// NearestEvenFastApplies(p) and that the thread keeps IEEE subnormals and rounds to
// nearest: the format's subnormal range is rounded by the FPU itself, adding and
// subtracting 2^(quantum_exponent + 23), whose ulp is the format's quantum. (TF's
// threads flush subnormals to zero: the quantize kernels use it only where that cannot
// matter, see NearestEvenIgnoresFlush.) Ties go to the even float32 bit above the dropped
// ones, which is the code's last bit unless no mantissa bit is kept and the rebias
// shifts the exponent by an odd amount (m = 0 and even emin): not then.
inline bool NearestEvenFastApplies(const FloatParams<float>& p) {
  return p.quantum_exponent + 23 <= 127 && ((p.rebias >> p.d) & 1) == 0;
}

// kPlain (when PlainNearestEven(p)): the zero-sign rule of fnuz formats is left out and
// a NaN becomes the default NaN (NaNs' signs and payloads are not kept).
inline bool PlainNearestEven(const FloatParams<float>& p) {
  return p.zero_sign_mask == SignBit<float>() && p.nan_xor == QuietNanBits<float>();
}

// kLinear (when LinearNearestEven(p)): the format's subnormals are float32's own, so the
// integer rounding of the bits is right below min_normal too, and no FPU step is taken.
inline bool LinearNearestEven(const FloatParams<float>& p) {
  return p.emin == 1 && p.sub_mantissa == 23 - p.d;
}

// Whether QuantizeFloatNearestEven needs no IEEE subnormals: its FPU step gives the same
// bits under TensorFlow's flush-to-zero and denormals-are-zero modes when the format's
// quantum is at least 2^-125 (a float32 subnormal input rounds to a signed zero either
// way, and no sum or result is subnormal), and kLinear takes no FPU step.
inline bool NearestEvenIgnoresFlush(const FloatParams<float>& p) {
  return NearestEvenFastApplies(p) && p.quantum_exponent >= -125;
}

template <bool kPlain, bool kLinear = false>
TFHFP8_ELEMENT_INLINE float QuantizeFloatNearestEven(float x, const FloatParams<float>& p) {
  using UInt = uint32_t;
  const UInt bits = ToBits(x);
  const UInt sign = bits & SignBit<float>();
  const UInt a = bits & ~SignBit<float>();
  // Normal range: round the bits (a carry into the exponent field is the right result;
  // the rebias of RoundStatic is a multiple of 2^d, so it is left out).
  const UInt keep = ~((UInt{1} << p.d) - 1);
  const UInt normal_bits = (a + p.half_minus_one + ((a >> p.d) & p.lsb)) & keep;
  // Subnormal range (and the gap below min_normal without subnormals).
  UInt magnitude = normal_bits;
  if constexpr (!kLinear) {
    const float magic =
        FromBits<float>(static_cast<UInt>(p.quantum_exponent + 23 + 127) << 23);
    const UInt sub_bits = ToBits((FromBits<float>(a) + magic) - magic);
    magnitude = MagnitudeLess(a, static_cast<UInt>(p.emin) << 23) ? sub_bits : normal_bits;
  }
  magnitude = MagnitudeLess(p.max_bits, magnitude) ? p.overflow_bits : magnitude;
  if constexpr (kPlain) {
    return FromBits<float>(MagnitudeLess(InfBits<float>(), a) ? QuietNanBits<float>()
                                                             : (sign | magnitude));
  }
  const UInt kept_sign = magnitude == 0 ? (sign & p.zero_sign_mask) : sign;
  return FromBits<float>(MagnitudeLess(InfBits<float>(), a) ? (sign ^ p.nan_xor)
                                                           : (kept_sign | magnitude));
}

// QuantizeFloatElement<float, Rounding::kTowardZero>(x, p, 0), the same way (and under
// the same conditions, NearestEvenIgnoresFlush(p) or kLinear): the bits truncated, and
// below min_normal the FPU's rounding to nearest stepped down one quantum where it
// rounded up.
template <bool kLinear>
TFHFP8_ELEMENT_INLINE float QuantizeFloatTowardZero(float x, const FloatParams<float>& p) {
  using UInt = uint32_t;
  const UInt bits = ToBits(x);
  const UInt sign = bits & SignBit<float>();
  const UInt a = bits & ~SignBit<float>();
  UInt magnitude = a & ~((UInt{1} << p.d) - 1);
  if constexpr (!kLinear) {
    const float magic =
        FromBits<float>(static_cast<UInt>(p.quantum_exponent + 23 + 127) << 23);
    const float quantum = FromBits<float>(static_cast<UInt>(p.quantum_exponent + 127) << 23);
    const float nearest = (FromBits<float>(a) + magic) - magic;
    const float truncated = nearest > FromBits<float>(a) ? nearest - quantum : nearest;
    magnitude = MagnitudeLess(a, static_cast<UInt>(p.emin) << 23) ? ToBits(truncated) : magnitude;
  }
  // Toward zero never grows a magnitude: a finite overflow gives max (IEEE 754 §7.4),
  // an infinity overflow_bits.
  magnitude = MagnitudeLess(magnitude, p.max_bits) ? magnitude : p.max_bits;
  magnitude = a == InfBits<float>() ? p.overflow_bits : magnitude;
  const UInt kept_sign = magnitude == 0 ? (sign & p.zero_sign_mask) : sign;
  return FromBits<float>(MagnitudeLess(InfBits<float>(), a) ? (sign ^ p.nan_xor)
                                                           : (kept_sign | magnitude));
}

// Whether QuantizeFloatFastForm<R> gives the bits of QuantizeFloatElement<float, R> on
// TF's threads: as NearestEvenIgnoresFlush or kLinear (the format's subnormals are
// float32's own: no FPU step), and for the r-bit roundings a quantum of at least 2^-100,
// so that a float32 subnormal input, which the FPU reads as 0, lies below 2^-26 of a
// quantum, where any r <= 23 bits round it to 0 as well, and few enough bits that a
// float32 holds a subnormal of the format with r + 2 more (RoundFractionBitsBelowNormal).
inline bool FastFormApplies(const FloatParams<float>& p, Rounding rounding) {
  // Ties to even: the even float32 bit must be the code's (see NearestEvenFastApplies).
  if (rounding == Rounding::kNearestEven && !NearestEvenFastApplies(p)) return false;
  if (LinearNearestEven(p)) return true;
  const bool draws_bits = rounding >= Rounding::kStochasticBits;
  if (draws_bits && p.sub_mantissa + p.random_bits > 22) return false;
  const int limit = draws_bits ? -100 : -125;
  return p.quantum_exponent + 23 <= 127 && p.quantum_exponent >= limit;
}

// The r-bit roundings (RoundUp) as one carry: the fraction of a quantum rounded in place
// to `RoundedFractionBits<R>(r)` bits (to nearest, ties to even or to odd; StochasticFast
// truncates), `Addend<R>(draw)` added at its last bit, then the quantum's fraction
// dropped: the sum carries into the quantum exactly when RoundUp rounds up.
template <Rounding R>
constexpr int RoundedFractionBits(int r) {
  return R == Rounding::kStochasticFastBits ? r + 1 : r;
}

template <Rounding R>
TFHFP8_ELEMENT_INLINE uint32_t Addend(uint32_t draw) {
  return R == Rounding::kStochasticFastBits ? 2 * draw + 1 : draw;
}

// ... on the bits of a normal float32 `a`, whose quantum is 2^d of them (d above the
// rounded fraction's bits: it is rounded at bit d - bits; else it is exact, and the
// addend's low bits, below a's last one, cannot carry).
template <Rounding R>
TFHFP8_ELEMENT_INLINE uint32_t RoundFractionBits(uint32_t a, int d, int r, uint32_t draw) {
  const int s = d - RoundedFractionBits<R>(r);
  const int up = s > 0 ? s : 0;
  const int down = s > 0 ? 0 : -s;
  const uint32_t unit = uint32_t{1} << up;
  uint32_t rounded = a & ~(unit - 1);
  if constexpr (R != Rounding::kStochasticFastBits) {
    const uint32_t lsb = s > 0 ? 1 : 0;
    const uint32_t parity = (a >> up) & lsb;
    const uint32_t tie_up = R == Rounding::kStochasticOddBits ? lsb - parity : parity;
    rounded = (a + (unit >> 1) - lsb + tie_up) & ~(unit - 1);
  }
  return (rounded + ((Addend<R>(draw) << up) >> down)) & ~((uint32_t{1} << d) - 1);
}

// ... by the FPU below min_normal, for the magnitude `fa` (quantum 2^qe): exact where
// FastFormApplies (every value involved has at most sub_mantissa + r + 2 bits).
template <Rounding R>
TFHFP8_ELEMENT_INLINE float RoundFractionBitsBelowNormal(float fa, int qe, int r,
                                                         uint32_t draw) {
  const int fine_exponent = qe - RoundedFractionBits<R>(r);
  const float fine = FromBits<float>(static_cast<uint32_t>(fine_exponent + 127) << 23);
  const float fine_magic = FromBits<float>(static_cast<uint32_t>(fine_exponent + 150) << 23);
  const float nearest = (fa + fine_magic) - fine_magic;  // ties to even
  float rounded = nearest;
  if constexpr (R == Rounding::kStochasticFastBits) {
    rounded = nearest > fa ? nearest - fine : nearest;
  } else if constexpr (R == Rounding::kStochasticOddBits) {
    const float diff = fa - nearest;  // on a tie, fa + diff is the odd neighbour
    rounded = (diff == 0.5f * fine) | (diff == -0.5f * fine) ? fa + diff : nearest;
  }
  const float sum = rounded + static_cast<float>(static_cast<int>(Addend<R>(draw))) * fine;
  const float magic = FromBits<float>(static_cast<uint32_t>(qe + 150) << 23);
  const float quantum = FromBits<float>(static_cast<uint32_t>(qe + 127) << 23);
  const float sum_nearest = (sum + magic) - magic;
  return sum_nearest > sum ? sum_nearest - quantum : sum_nearest;
}

// QuantizeFloatElement<float, R>(x, p, rand) for every rounding but the full-precision
// stochastic one, when FastFormApplies(p, R), in a third of the instructions (nearest
// even and toward zero come here for the unsigned formats and sat_propagate, which
// QuantizeFloatFast leaves out): the normal range on the bits with the fixed shift d;
// below min_normal the FPU's rounding to the quantum (nearest even), moved by one
// quantum on ties (nearest-away) or in the rounding's direction where inexact (directed);
// the r-bit roundings as one carry on either range (RoundFractionBits).
template <Rounding R, bool kLinear, bool kSigned>
TFHFP8_ELEMENT_INLINE float QuantizeFloatFastForm(float x, const FloatParams<float>& p,
                                                  uint32_t rand) {
  using UInt = uint32_t;
  const UInt bits = ToBits(x);
  const UInt sign = bits & SignBit<float>();
  const UInt a = bits & ~SignBit<float>();
  const int r = p.random_bits;
  const UInt draw = R >= Rounding::kStochasticBits ? rand >> ((32 - r) & 31) : 0;
  // Normal range: a carry into the exponent field is the right result, and the rebias,
  // a multiple of 2^d, changes nothing.
  const UInt low = (UInt{1} << p.d) - 1;
  // Directed: masks, not bools: GCC vectorizes bool selects on the sign only for some R.
  constexpr bool kDirected = R == Rounding::kTowardPositive || R == Rounding::kTowardNegative;
  const UInt negative_mask = UInt{0} - (sign >> 31);
  const UInt away_mask = R == Rounding::kTowardPositive ? ~negative_mask : negative_mask;
  UInt magnitude;
  if constexpr (R == Rounding::kNearestEven) {
    magnitude = (a + p.half_minus_one + ((a >> p.d) & p.lsb)) & ~low;
  } else if constexpr (R == Rounding::kTowardZero) {
    magnitude = a & ~low;
  } else if constexpr (R == Rounding::kNearestAway) {
    magnitude = (a + ((low + 1) >> 1)) & ~low;
  } else if constexpr (kDirected) {
    magnitude = (a + (low & away_mask)) & ~low;
  } else {
    magnitude = RoundFractionBits<R>(a, p.d, r, draw);
  }
  if constexpr (!kLinear) {
    const float magic = FromBits<float>(static_cast<UInt>(p.quantum_exponent + 23 + 127) << 23);
    const float quantum = FromBits<float>(static_cast<UInt>(p.quantum_exponent + 127) << 23);
    const float fa = FromBits<float>(a);
    const float nearest = (fa + magic) - magic;
    const float truncated = nearest > fa ? nearest - quantum : nearest;
    UInt sub;
    if constexpr (R == Rounding::kNearestEven) {
      sub = ToBits(nearest);
    } else if constexpr (R == Rounding::kTowardZero) {
      sub = ToBits(truncated);
    } else if constexpr (R == Rounding::kNearestAway) {
      // Nearest even, one quantum up on the ties it rounded down (the difference is exact).
      const float half = quantum * 0.5f;
      sub = ToBits(fa - nearest == half ? nearest + quantum : nearest);
    } else if constexpr (kDirected) {
      // A float32 subnormal input, read as 0, moves away from zero too.
      const UInt tiny = static_cast<UInt>((a != 0) & (a < (UInt{1} << 23)));
      const UInt inexact = static_cast<UInt>(fa > truncated) | tiny;
      const UInt up_mask = (UInt{0} - inexact) & away_mask;
      sub = (ToBits(truncated + quantum) & up_mask) | (ToBits(truncated) & ~up_mask);
    } else {
      sub = ToBits(RoundFractionBitsBelowNormal<R>(fa, p.quantum_exponent, r, draw));
    }
    magnitude = MagnitudeLess(a, static_cast<UInt>(p.emin) << 23) ? sub : magnitude;
  }
  return FinishFloat<float, R, kSigned>(a, sign, magnitude, MagnitudeLess(p.max_bits, magnitude),
                                        p);
}

// ---------------------------------------------------------------------------------
// Rounding to a multiple of 2^k (dynamic fixed point).

// `inf_magnitude`: the magnitude given to infinities (inf, or the largest value when
// saturating).
template <typename T, Rounding R>
TFHFP8_ELEMENT_INLINE T QuantizeFixedElement(T x, int k, typename Container<T>::UInt inf_magnitude,
                                             typename Container<T>::UInt rand, int random_bits) {
  using C = Container<T>;
  using UInt = typename C::UInt;
  const UInt bits = ToBits(x);
  const UInt sign = bits & SignBit<T>();
  const UInt a = bits & ~SignBit<T>();
  int exponent1;
  UInt sig;
  Significand<T>(a, &exponent1, &sig);
  const int s_raw = k + C::kExponentBias + C::kMantissa - exponent1;
  const int s = s_raw > 1 ? s_raw : 1;
  if (R >= Rounding::kStochasticBits) rand >>= (C::kWidth - random_bits) & (C::kWidth - 1);
  const UInt code = RoundVariable<R, T>(sig, s, rand, sign != 0, random_bits);
  // s_raw <= 0: x is already a multiple of 2^k (k at the container's smallest exponent).
  UInt magnitude = s_raw > 0 ? ScaledBits<T>(code, k) : a;
  magnitude = a == InfBits<T>() ? inf_magnitude : magnitude;
  const bool is_nan = a > InfBits<T>();
  return FromBits<T>((is_nan ? a : magnitude) | sign);
}

// ---------------------------------------------------------------------------------
// Loops over contiguous ranges, one per (type, rounding), written so that GCC
// vectorizes them (-O3; see -fopt-info-vec): every loop-invariant value is a local,
// the bodies are branch-free, and the flat index is split into a high word fixed per
// piece and a 32-bit counter so that float32 loops run on 32-bit lanes. (Converting
// an int to float may raise FE_INEXACT, so GCC only if-converts ScaledBits with
// -fno-trapping-math, which tfhfp8/ops/build.py passes.)

// Calls body(lo, count, hi, offset) for the pieces of [begin, end) whose flat
// indices share the high 32 bits `hi`; the piece's first index has low bits `lo` and
// lies `offset` elements after `begin`.
template <typename Body>
inline void ForEachIndexWord(int64_t begin, int64_t end, Body body) {
  int64_t i = begin;
  while (i < end) {
    const uint64_t u = static_cast<uint64_t>(i);
    const int64_t next = static_cast<int64_t>(((u >> 32) + 1) << 32);
    const int64_t stop = end < next ? end : next;
    body(static_cast<uint32_t>(u), stop - i, static_cast<uint32_t>(u >> 32), i - begin);
    i = stop;
  }
}

// out[j] = f(in[j], j) for j in [0, count), on non-overlapping arrays. (`Index`
// uint32_t, for counts below 2^32, keeps a vectorized j in 32-bit lanes.)
template <typename Index = int64_t, typename T, typename F>
inline void MapDisjoint(const T* __restrict in, T* __restrict out, Index count, F f) {
  for (Index j = 0; j < count; ++j) out[j] = f(in[j], j);
}

// data[j] = f(data[j], j) for j in [0, count).
template <typename Index = int64_t, typename T, typename F>
inline void MapInPlace(T* data, Index count, F f) {
  for (Index j = 0; j < count; ++j) data[j] = f(data[j], j);
}

// out[j] = f(in[j], j). The input may be forwarded as the output (out == in): that
// case has its own loop, since `restrict` would be wrong and a runtime overlap check
// would fall back to scalar code.
template <typename Index = int64_t, typename T, typename F>
inline void MapElements(const T* in, T* out, Index count, F f) {
  if (static_cast<const T*>(out) == in) {
    MapInPlace<Index>(out, count, f);
  } else {
    MapDisjoint<Index>(in, out, count, f);
  }
}

// Runs element(x, rand, j) over in[begin, end) -> out[begin, end), j = index - begin,
// with the random bits (`Rand`: 32 or 64 of them) of each flat index when R is
// stochastic.
template <typename T, Rounding R, typename Rand, typename Element>
inline void QuantizeRangeIndexed(const T* in, T* out, int64_t begin, int64_t end,
                                 const Keys& keys, Element element) {
  ForEachIndexWord(begin, end, [&](uint32_t lo, int64_t count, uint32_t hi, int64_t offset) {
    const T* src = in + begin + offset;
    T* dst = out + begin + offset;
    if constexpr (!DrawsBits(R)) {
      MapElements(src, dst, count,
                  [=](T x, int64_t j) { return element(x, Rand{0}, offset + j); });
    } else if constexpr (sizeof(Rand) == 4) {
      // RandomBits<uint32_t> with the index's high word folded into `base`.
      // A 32-bit loop counter: a 64-bit one is kept in 64-bit lanes and packed to 32
      // bits for every vector (cross-lane shuffles, slow on Zen 1).
      const uint32_t base = (hi * 0x85EBCA77u) ^ keys.key0;
      constexpr int64_t kRun = int64_t{1} << 31;  // pieces of < 2^32 elements
      for (int64_t done = 0; done < count; done += kRun) {
        const uint32_t first = lo + static_cast<uint32_t>(done);
        const int64_t at = offset + done;
        MapElements<uint32_t>(src + done, dst + done,
                              static_cast<uint32_t>(count - done < kRun ? count - done : kRun),
                              [=](T x, uint32_t j) {
                                return element(x, Mix32(((first + j) * 0x9E3779B9u) ^ base),
                                               at + j);
                              });
      }
    } else {
      const Keys k = keys;
      const uint64_t first = (static_cast<uint64_t>(hi) << 32) | lo;
      MapElements(src, dst, count, [=](T x, int64_t j) {
        return element(x, RandomBits<Rand>(first + static_cast<uint64_t>(j), k), offset + j);
      });
    }
  });
}

// Runs element(x, rand) over in[begin, end) -> out[begin, end), with the random bits
// of each flat index (as wide as T) when R is stochastic.
template <typename T, Rounding R, typename Element>
inline void QuantizeRange(const T* in, T* out, int64_t begin, int64_t end, const Keys& keys,
                          Element element) {
  using UInt = typename Container<T>::UInt;
  QuantizeRangeIndexed<T, R, UInt>(in, out, begin, end, keys,
                                   [=](T x, UInt rand, int64_t) { return element(x, rand); });
}

// float32 to nearest even or toward zero through QuantizeFloatNearestEven or
// QuantizeFloatTowardZero (a third to half the instructions), when their FPU step gives
// the bits of QuantizeFloatElement on TF's threads (see NearestEvenIgnoresFlush) or is
// not taken (LinearNearestEven); returns false, doing nothing, otherwise.
template <typename T, Rounding R>
bool QuantizeFloatFast(const T* in, T* out, int64_t begin, int64_t end,
                       const FloatParams<T>& params) {
  if constexpr (sizeof(T) != 4 || (R != Rounding::kNearestEven && R != Rounding::kTowardZero)) {
    return false;
  } else {
    const FloatParams<float> p = params;
    // Neither unsigned formats nor sat_propagate: the fast forms leave them out.
    if (p.is_unsigned != 0 || p.saturate_finite != 0) return false;
    const bool linear = LinearNearestEven(p);
    if (!NearestEvenFastApplies(p) || !(linear || NearestEvenIgnoresFlush(p))) return false;
    const auto run = [&](auto linear_type) {
      constexpr bool kLinear = decltype(linear_type)::value;
      MapElements(in + begin, out + begin, end - begin, [=](float x, int64_t) {
        // Not kPlain: a NaN keeps its sign, as in QuantizeFloatElement.
        return R == Rounding::kNearestEven ? QuantizeFloatNearestEven<false, kLinear>(x, p)
                                           : QuantizeFloatTowardZero<kLinear>(x, p);
      });
    };
    if (linear) {
      run(std::true_type{});
    } else {
      run(std::false_type{});
    }
    return true;
  }
}

template <typename T, Rounding R>
void QuantizeFloatRange(const T* in, T* out, int64_t begin, int64_t end,
                        const FloatParams<T>& params, const Keys& keys) {
  if (QuantizeFloatFast<T, R>(in, out, begin, end, params)) return;
  const FloatParams<T> p = params;
  if constexpr (sizeof(T) == 4 && R != Rounding::kStochastic) {
    if (FastFormApplies(p, R)) {
      const auto run = [&](auto linear_type, auto signed_type) {
        constexpr bool kLinear = decltype(linear_type)::value;
        constexpr bool kSigned = decltype(signed_type)::value;
        QuantizeRangeIndexed<float, R, uint32_t>(
            in, out, begin, end, keys, [=](float x, uint32_t rand, int64_t) {
              return QuantizeFloatFastForm<R, kLinear, kSigned>(x, p, rand);
            });
      };
      const bool plain = p.is_unsigned == 0 && p.saturate_finite == 0;
      if (LinearNearestEven(p)) {
        run(std::true_type{}, std::false_type{});
      } else if (plain) {
        run(std::false_type{}, std::true_type{});
      } else {
        run(std::false_type{}, std::false_type{});
      }
      return;
    }
  }
  QuantizeRange<T, R>(in, out, begin, end, keys, [=](T x, typename Container<T>::UInt rand) {
    return QuantizeFloatElement<T, R>(x, p, rand);
  });
}

// Dynamic fixed point over [begin, end), every element with the shared exponent k.
template <typename T, Rounding R>
void QuantizeFixedRange(const T* in, T* out, int64_t begin, int64_t end, int k,
                        typename Container<T>::UInt inf_magnitude, int random_bits,
                        const Keys& keys) {
  QuantizeRange<T, R>(in, out, begin, end, keys, [=](T x, typename Container<T>::UInt rand) {
    return QuantizeFixedElement<T, R>(x, k, inf_magnitude, rand, random_bits);
  });
}

// The bits of the largest finite |in[j]| over [begin, end), 0 if there is none: the
// bits of non-negative floats order like their values, and integer max vectorizes.
template <typename T>
typename Container<T>::UInt MaxAbsBitsRange(const T* in, int64_t begin, int64_t end) {
  using UInt = typename Container<T>::UInt;
  constexpr UInt kMagnitude = ~SignBit<T>();
  constexpr UInt kInf = InfBits<T>();
  UInt largest = 0;
  for (int64_t j = begin; j < end; ++j) {
    const UInt a = ToBits(in[j]) & kMagnitude;
    const UInt finite = a & (UInt{0} - static_cast<UInt>(a < kInf));  // a mask: vectorizes
    largest = finite > largest ? finite : largest;
  }
  return largest;
}

}  // inline namespace TFHFP8_VARIANT
}  // namespace tfhfp8

#endif  // TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_ROUNDING_H_
