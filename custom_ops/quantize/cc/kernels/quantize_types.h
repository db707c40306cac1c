// Plain data shared by every CPU variant of the quantization loops and by the
// TensorFlow kernels: enums, parameter structs and the table of loop functions.
//
// Nothing here has code that the compiler could emit with one variant's instruction
// set and the linker then hand to another (see cpu_dispatch.h): the structs have no
// member functions, and the functions are defined once, in cpu_dispatch.cc.

#ifndef TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_QUANTIZE_TYPES_H_
#define TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_QUANTIZE_TYPES_H_

#include <cstdint>

// The functions called once per element: inlined into their loops whatever GCC's
// growth limits decide (an out-of-line call per element keeps a loop from vectorizing;
// seen at 10x the time when more loops were added to one translation unit).
#define TFHFP8_ELEMENT_INLINE __attribute__((always_inline)) inline

namespace tfhfp8 {

// The quantization loops have all kFloatRoundings (tfhfp8.formats.roundings; the *Bits
// ones draw `random_bits` bits); the accumulating GEMMs the first kRoundings.
enum class Rounding {
  kNearestEven = 0, kStochastic = 1, kTowardZero = 2, kNearestAway = 3, kTowardPositive = 4,
  kTowardNegative = 5, kStochasticBits = 6, kStochasticOddBits = 7, kStochasticFastBits = 8
};
constexpr int kRoundings = 3;
constexpr int kFloatRoundings = 9;
enum class Specials { kIeee, kFn, kFnuz, kFinite, kP3109Extended, kP3109Finite };

// A FloatFormat (tfhfp8.FloatFormat), as its op attributes give it (format_attrs.h).
struct FloatFormatSpec {
  int exponent_bits;
  int mantissa_bits;
  int bias;
  Specials specials;
  bool subnormals;
  bool is_signed;  // false: P3109's unsigned formats
};

// How a rounding to a FloatFormat treats what the format itself leaves open.
struct RoundingOptions {
  bool saturate = false;       // finite overflows give the largest finite value
  bool propagate_inf = false;  // with saturate: P3109's sat_propagate (infinities stay)
  int random_bits = 0;         // the r of the *Bits stochastic roundings
};

// Bit layout of the float type the rounding runs in.
template <typename T>
struct Container;

template <>
struct Container<float> {
  using UInt = uint32_t;
  static constexpr int kWidth = 32;
  static constexpr int kMantissa = 23;
  static constexpr int kExponentBias = 127;
};

template <>
struct Container<double> {
  using UInt = uint64_t;
  static constexpr int kWidth = 64;
  static constexpr int kMantissa = 52;
  static constexpr int kExponentBias = 1023;
};

// Keys of the counter-based random bits (a hash of seed and element index).
struct Keys {
  uint32_t key0;
  uint32_t key1;
};

// Everything the rounding to a FloatFormat needs, precomputed (MakeFloatParams).
template <typename T>
struct FloatParams {
  using UInt = typename Container<T>::UInt;
  int emin;            // container-biased exponent of the format's min normal
  int d;               // mantissa bits dropped on the normal path
  int sub_mantissa;    // mantissa bits of the subnormal range (0 without subnormals)
  UInt rebias;         // (emin - 1) << container mantissa
  UInt half_minus_one; // 2^(d-1) - 1, or 0
  UInt lsb;            // d > 0
  UInt max_code;       // largest finite code (E << m) | M
  UInt max_bits;       // the largest finite value in the container
  UInt overflow_bits;  // magnitude given to finite values that overflow
  UInt inf_bits_out;   // magnitude given to infinities
  // Flags as UInt (0 or 1), not bool: a bool field read in a loop keeps GCC from
  // vectorizing it.
  UInt saturate_finite;  // finite overflows give max whatever the rounding (saturating)
  UInt is_unsigned;    // P3109 unsigned: a negative nonzero result is below the range
  UInt below_bits;     // ... and becomes this (0 or NaN), an infinite one below_inf_bits
  UInt below_inf_bits;
  int random_bits;     // the *Bits stochastic roundings' r
  UInt nan_xor;        // NaN output = sign ^ nan_xor (a NaN, or ml_dtypes' zero)
  UInt zero_sign_mask;  // sign bits kept on a zero: none for fnuz (-0 becomes +0)
  int quantum_exponent;  // one code unit on the fixed-quantum path is 2^this
};

// out[begin, end) = rounding of in[begin, end) to a FloatFormat.
template <typename T>
using FloatLoop = void (*)(const T* in, T* out, int64_t begin, int64_t end,
                           const FloatParams<T>& params, const Keys& keys);
// out[begin, end) = rounding of in[begin, end) to multiples of 2^k; infinities become
// `inf_magnitude` (inf, or the largest mantissa times 2^k when saturating);
// `random_bits`: the r of the *Bits roundings.
template <typename T>
using FixedLoop = void (*)(const T* in, T* out, int64_t begin, int64_t end, int k,
                           typename Container<T>::UInt inf_magnitude, int random_bits,
                           const Keys& keys);
// The largest finite |in[j]| over [begin, end), as its bits (0 if none).
template <typename T>
using MaxAbsLoop = typename Container<T>::UInt (*)(const T* in, int64_t begin, int64_t end);

// A tensor seen as [outer, n, inner] and cut into blocks of `block_size` along n (the
// last block of a row may be shorter). Work is split into units: one block when
// inner == 1, else one block times a tile of at most `tile` consecutive columns.
struct BlockShape {
  int64_t outer;
  int64_t n;
  int64_t inner;
  int64_t block_size;
  int64_t blocks;  // per row along n: ceil(n / block_size)
  int64_t tile;    // columns per unit (inner == 1: 1)
  int64_t tiles;   // units per block: ceil(inner / tile)
};

// Everything a block-scaled rounding (tfhfp8.BlockScaled) needs, precomputed.
template <typename T>
struct BlockParams {
  using UInt = typename Container<T>::UInt;
  bool power_of_two;  // E8M0 scales; else a FloatFormat scale, computed in float64
  bool saturate;      // an infinity counts as the largest finite value
  // E8M0: the element rounding (saturating) in T; scale 2^k from the block's amax.
  FloatParams<T> element;
  int emax;           // exponent of the element format's largest value
  bool ceil;          // "ceil" scale rounding (else OCP's "floor")
  bool rceil;         // "rceil": Transformer Engine's float_to_e8m0 (RceilExponent)
  double max_rcp;     // fl32(1 / element max), for "rceil"
  UInt max_fraction;  // fraction field of the element max in T
  // Float scales, all in float64.
  FloatParams<double> element64;  // element rounding, saturating
  FloatParams<double> scale64;    // block scale rounding, saturating
  bool scale_toward_zero;         // scale rounding "floor" (else nearest even)
  FloatParams<double> float32;    // the final rounding of a float32 result
  double element_max_times_s;     // max_element * S
  double s;                       // the tensor scale S (1 without one)
  // The element's round-to-nearest-even and toward-zero roundings may run in float32
  // on a quotient rounded to odd (FloatScaler::OddQuotient): at most 21 mantissa
  // bits, a quantum above 2^-125, a largest value below 2^128.
  bool element_rounds_in_float32;
  // The same for the scale format (and its rounding, in float32: scale32).
  bool scale_rounds_in_float32;
  FloatParams<float> scale32;
};

// out = in rounded block by block, for the units [begin, end) of `shape`.
template <typename T>
using BlockLoop = void (*)(const T* in, T* out, const BlockShape& shape, int64_t begin,
                           int64_t end, const BlockParams<T>& params, const Keys& keys);
// The largest magnitude over [begin, end) as its bits, NaN left out; infinities count
// as the largest finite value when `saturate`, else are left out too (0 if none).
template <typename T>
using TensorAmaxLoop = typename Container<T>::UInt (*)(const T* in, int64_t begin, int64_t end,
                                                       bool saturate);

// One CPU variant's loops, indexed by Rounding.
struct Loops {
  const char* name;
  FloatLoop<float> float32[kFloatRoundings];
  FloatLoop<double> float64[kFloatRoundings];
  FixedLoop<float> fixed32[kFloatRoundings];
  FixedLoop<double> fixed64[kFloatRoundings];
  MaxAbsLoop<float> max_abs32;
  MaxAbsLoop<double> max_abs64;
  BlockLoop<float> block32[kFloatRoundings];
  BlockLoop<double> block64[kFloatRoundings];
  TensorAmaxLoop<float> tensor_amax32;
  TensorAmaxLoop<double> tensor_amax64;
};

}  // namespace tfhfp8

#endif  // TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_QUANTIZE_TYPES_H_
