// Plain data shared by every CPU variant of the quantization loops and by the
// TensorFlow kernels: enums, parameter structs and the table of loop functions.
//
// Nothing here has code that the compiler could emit with one variant's instruction
// set and the linker then hand to another (see cpu_dispatch.h): the structs have no
// member functions, and the functions are defined once, in cpu_dispatch.cc.

#ifndef TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_QUANTIZE_TYPES_H_
#define TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_QUANTIZE_TYPES_H_

#include <cstdint>

namespace tfhfp8 {

enum class Rounding { kNearestEven = 0, kStochastic = 1, kTowardZero = 2 };
constexpr int kRoundings = 3;
enum class Specials { kIeee, kFn, kFnuz, kFinite };

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
  UInt overflow_bits;  // magnitude given to overflowing values
  UInt nan_xor;        // NaN output = sign ^ nan_xor (a NaN, or ml_dtypes' zero)
  UInt zero_sign_mask;  // sign bits kept on a zero: none for fnuz (-0 becomes +0)
  int quantum_exponent;  // one code unit on the fixed-quantum path is 2^this
};

// out[begin, end) = rounding of in[begin, end) to a FloatFormat.
template <typename T>
using FloatLoop = void (*)(const T* in, T* out, int64_t begin, int64_t end,
                           const FloatParams<T>& params, const Keys& keys);
// out[begin, end) = rounding of in[begin, end) to multiples of 2^k; infinities become
// `inf_magnitude` (inf, or the largest mantissa times 2^k when saturating).
template <typename T>
using FixedLoop = void (*)(const T* in, T* out, int64_t begin, int64_t end, int k,
                           typename Container<T>::UInt inf_magnitude, const Keys& keys);
// The largest finite |in[j]| over [begin, end), as its bits (0 if none).
template <typename T>
using MaxAbsLoop = typename Container<T>::UInt (*)(const T* in, int64_t begin, int64_t end);

// One CPU variant's loops, indexed by Rounding.
struct Loops {
  const char* name;
  FloatLoop<float> float32[kRoundings];
  FloatLoop<double> float64[kRoundings];
  FixedLoop<float> fixed32[kRoundings];
  FixedLoop<double> fixed64[kRoundings];
  MaxAbsLoop<float> max_abs32;
  MaxAbsLoop<double> max_abs64;
};

}  // namespace tfhfp8

#endif  // TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_QUANTIZE_TYPES_H_
