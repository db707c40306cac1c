// The quantization loops of one CPU variant, as a table of function pointers.
//
// tfhfp8/ops/build.py compiles this file once per variant of cpu_dispatch.h, each time
// with that variant's -march and -DTFHFP8_VARIANT=<name>; it includes no TensorFlow
// header, so TensorFlow's headers are only ever compiled for the baseline.

#include "cpu_dispatch.h"
#include "block_rounding.h"
#include "rounding.h"

namespace tfhfp8 {
namespace {

template <typename T, Rounding R>
void FloatLoopOf(const T* in, T* out, int64_t begin, int64_t end, const FloatParams<T>& params,
                 const Keys& keys) {
  QuantizeFloatRange<T, R>(in, out, begin, end, params, keys);
}

template <typename T, Rounding R>
void FixedLoopOf(const T* in, T* out, int64_t begin, int64_t end, int k,
                 typename Container<T>::UInt inf_magnitude, int random_bits, const Keys& keys) {
  QuantizeFixedRange<T, R>(in, out, begin, end, k, inf_magnitude, random_bits, keys);
}

template <typename T, Rounding R>
void BlockLoopOf(const T* in, T* out, const BlockShape& shape, int64_t begin, int64_t end,
                 const BlockParams<T>& params, const Keys& keys) {
  BlockRange<T, R>(in, out, shape, begin, end, params, keys);
}

#define TFHFP8_BY_FLOAT_ROUNDING(F, T)                                                      \
  {                                                                                         \
    F<T, Rounding::kNearestEven>, F<T, Rounding::kStochastic>, F<T, Rounding::kTowardZero>, \
        F<T, Rounding::kNearestAway>, F<T, Rounding::kTowardPositive>,                      \
        F<T, Rounding::kTowardNegative>, F<T, Rounding::kStochasticBits>,                   \
        F<T, Rounding::kStochasticOddBits>, F<T, Rounding::kStochasticFastBits>             \
  }

}  // namespace

#define TFHFP8_STRINGIFY2(x) #x
#define TFHFP8_STRINGIFY(x) TFHFP8_STRINGIFY2(x)
#define TFHFP8_CONCAT2(a, b) a##b
#define TFHFP8_CONCAT(a, b) TFHFP8_CONCAT2(a, b)

extern const Loops TFHFP8_CONCAT(kLoops_, TFHFP8_VARIANT) = {
    TFHFP8_STRINGIFY(TFHFP8_VARIANT),
    TFHFP8_BY_FLOAT_ROUNDING(FloatLoopOf, float),
    TFHFP8_BY_FLOAT_ROUNDING(FloatLoopOf, double),
    TFHFP8_BY_FLOAT_ROUNDING(FixedLoopOf, float),
    TFHFP8_BY_FLOAT_ROUNDING(FixedLoopOf, double),
    MaxAbsBitsRange<float>,
    MaxAbsBitsRange<double>,
    TFHFP8_BY_FLOAT_ROUNDING(BlockLoopOf, float),
    TFHFP8_BY_FLOAT_ROUNDING(BlockLoopOf, double),
    TensorAmaxRange<float>,
    TensorAmaxRange<double>,
};

}  // namespace tfhfp8
