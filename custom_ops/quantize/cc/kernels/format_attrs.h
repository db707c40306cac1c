// The attributes of a FloatFormat and a rounding, read and validated once for every
// kernel that takes them (as tfhfp8.FloatFormat validates them in Python). Compiled
// for the baseline only: it includes TensorFlow headers.

#ifndef TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_FORMAT_ATTRS_H_
#define TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_FORMAT_ATTRS_H_

#include <string>

#include "quantize_types.h"
#include "tensorflow/core/framework/op_kernel.h"

namespace tfhfp8 {

// The op's attribute lists allow only these names (tfhfp8.formats.roundings).
inline Rounding ParseRounding(const std::string& name) {
  if (name == "stochastic") return Rounding::kStochastic;
  if (name == "toward_zero") return Rounding::kTowardZero;
  if (name == "nearest_away") return Rounding::kNearestAway;
  if (name == "toward_positive") return Rounding::kTowardPositive;
  if (name == "toward_negative") return Rounding::kTowardNegative;
  if (name == "stochastic_bits") return Rounding::kStochasticBits;
  if (name == "stochastic_odd_bits") return Rounding::kStochasticOddBits;
  if (name == "stochastic_fast_bits") return Rounding::kStochasticFastBits;
  return Rounding::kNearestEven;
}

// The `rounding` and `saturate` attributes every rounding kernel takes.
inline absl::Status ReadRoundingAttrs(tensorflow::OpKernelConstruction* context,
                                      Rounding* rounding, bool* saturate) {
  std::string name;
  TF_RETURN_IF_ERROR(context->GetAttr("rounding", &name));
  TF_RETURN_IF_ERROR(context->GetAttr("saturate", saturate));
  *rounding = ParseRounding(name);
  return absl::OkStatus();
}

// The `random_bits` attribute: the r (1..23) of the *_bits roundings, 0 for the others.
inline absl::Status ReadRandomBits(tensorflow::OpKernelConstruction* context,
                                   Rounding rounding, int* random_bits) {
  TF_RETURN_IF_ERROR(context->GetAttr("random_bits", random_bits));
  const bool takes_bits = rounding >= Rounding::kStochasticBits;
  if (takes_bits ? (*random_bits < 1 || *random_bits > 23) : *random_bits != 0) {
    return tensorflow::errors::InvalidArgument(
        "random_bits must be in [1, 23] for the *_bits roundings and 0 otherwise, got ",
        *random_bits);
  }
  return absl::OkStatus();
}

inline Specials ParseSpecials(const std::string& name) {
  if (name == "fn") return Specials::kFn;
  if (name == "fnuz") return Specials::kFnuz;
  if (name == "finite") return Specials::kFinite;
  if (name == "p3109_extended") return Specials::kP3109Extended;
  if (name == "p3109_finite") return Specials::kP3109Finite;
  return Specials::kIeee;
}

// Reads and validates a FloatFormat's attributes `<prefix>exponent_bits`,
// `<prefix>mantissa_bits`, `<prefix>bias`, `<prefix>specials`, `<prefix>subnormals` and
// `<prefix>signed` (true where the op has none); `max_mantissa_bits` bounds
// mantissa_bits (23: any format).
inline absl::Status ReadFloatFormatAttrs(tensorflow::OpKernelConstruction* context,
                                         const std::string& prefix, int max_mantissa_bits,
                                         FloatFormatSpec* format) {
  using tensorflow::errors::InvalidArgument;
  int exponent_bits, mantissa_bits, bias;
  bool subnormals;
  std::string specials;
  TF_RETURN_IF_ERROR(context->GetAttr(prefix + "exponent_bits", &exponent_bits));
  TF_RETURN_IF_ERROR(context->GetAttr(prefix + "mantissa_bits", &mantissa_bits));
  TF_RETURN_IF_ERROR(context->GetAttr(prefix + "bias", &bias));
  TF_RETURN_IF_ERROR(context->GetAttr(prefix + "specials", &specials));
  TF_RETURN_IF_ERROR(context->GetAttr(prefix + "subnormals", &subnormals));
  bool is_signed = true;
  if (context->HasAttr(prefix + "signed")) {
    TF_RETURN_IF_ERROR(context->GetAttr(prefix + "signed", &is_signed));
  }
  const bool p3109 = specials == "p3109_extended" || specials == "p3109_finite";
  if (!is_signed && !p3109) {
    return InvalidArgument(prefix, "signed=false is for the P3109 specials, got specials='",
                           specials, "'");
  }
  if (exponent_bits < 1 || exponent_bits > 8) {
    return InvalidArgument(prefix, "exponent_bits must be in [1, 8], got ", exponent_bits);
  }
  if (mantissa_bits < 0 || mantissa_bits > max_mantissa_bits) {
    return InvalidArgument(prefix, "mantissa_bits must be in [0, ", max_mantissa_bits,
                           "], got ", mantissa_bits);
  }
  if (specials == "ieee" && exponent_bits < 2) {
    return InvalidArgument(prefix, "exponent_bits must be in [2, 8] for specials='ieee', got ",
                           exponent_bits);
  }
  // As tfhfp8.FloatFormat: normal numbers must be float32 normals.
  const int64_t all_ones = (int64_t{1} << (exponent_bits + mantissa_bits)) - 1;
  const int64_t reserved = (specials == "fn" || specials == "p3109_extended" ? 1 : 0) +
                           (is_signed ? 0 : 1);
  const int64_t max_code =
      specials == "ieee" ? ((((int64_t{1} << exponent_bits) - 1) << mantissa_bits) - 1)
                         : all_ones - reserved;
  if (max_code < (int64_t{1} << mantissa_bits)) {
    return InvalidArgument("a format with ", prefix, "exponent_bits=", exponent_bits, ", ",
                           prefix, "mantissa_bits=", mantissa_bits, " and specials='",
                           specials, "' has no normal numbers");
  }
  const int64_t low = (max_code >> mantissa_bits) - 127;
  if (low > 127) {
    return InvalidArgument(prefix, "exponent_bits=", exponent_bits, " with specials='",
                           specials, "' spans more binades than float32 can hold");
  }
  if (bias < low || bias > 127) {
    return InvalidArgument(prefix, "bias must be in [", low, ", 127], got ", bias);
  }
  *format = {exponent_bits, mantissa_bits, bias, ParseSpecials(specials), subnormals,
             is_signed};
  return absl::OkStatus();
}

}  // namespace tfhfp8

#endif  // TFHFP8_CUSTOM_OPS_QUANTIZE_CC_KERNELS_FORMAT_ATTRS_H_
