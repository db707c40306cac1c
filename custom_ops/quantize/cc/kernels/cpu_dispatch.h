// Runtime CPU dispatch of the quantization loops.
//
// The loops (quantize_loops.cc) are compiled several times, once per variant below,
// each with its own -march; the kernels pick, per call, the best variant that the
// running CPU supports, or the one named by the TFHFP8_CPU_VARIANT environment
// variable. So one library is portable to every CPU of its architecture and still
// uses AVX2 / AVX-512 where they exist.
//
//   variant      -march (x86-64)    needs
//   baseline     (compiler default)  nothing
//   x86_64_v3    x86-64-v3           AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE
//   x86_64_v4    x86-64-v4           x86-64-v3 + AVX-512 F/BW/CD/DQ/VL
//
// Other architectures build the baseline only.

#ifndef TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_CPU_DISPATCH_H_
#define TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_CPU_DISPATCH_H_

#include <string>

#include "quantize_types.h"

namespace tfhfp8 {

// The loops to use now, or nullptr with `*error` set (an unknown or unsupported
// TFHFP8_CPU_VARIANT).
const Loops* SelectLoops(std::string* error);

// "name name ...": the variants built into this library that this CPU can run.
std::string SupportedVariants();

// Parameters of the rounding to a FloatFormat (validated by the caller; see
// ComputeFloatParams in rounding.h).
template <typename T>
FloatParams<T> MakeFloatParams(const FloatFormatSpec& format, const RoundingOptions& options);

// Keys of the counter-based random bits of a seed.
Keys MakeSeedKeys(int64_t seed);

// Bits of code * 2^k (see ScaledBits in rounding.h).
template <typename T>
typename Container<T>::UInt ScaledValueBits(typename Container<T>::UInt code, int k);

}  // namespace tfhfp8

#endif  // TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_CPU_DISPATCH_H_
