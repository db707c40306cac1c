// Runtime CPU dispatch (see cpu_dispatch.h). Compiled for the baseline only.

#include "cpu_dispatch.h"

#include <cstdlib>
#include <cstring>

#include "rounding.h"

namespace tfhfp8 {

extern const Loops kLoops_baseline;
#if defined(__x86_64__)
extern const Loops kLoops_x86_64_v3;
extern const Loops kLoops_x86_64_v4;
#endif

namespace {

struct Variant {
  const Loops* loops;
  bool (*supported)();
};

#if defined(__x86_64__)
bool HasV3() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("lzcnt") &&
         __builtin_cpu_supports("movbe");
}

bool HasV4() {
  return HasV3() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}
#endif

bool Always() { return true; }

// Best first.
const Variant kVariants[] = {
#if defined(__x86_64__)
    {&kLoops_x86_64_v4, HasV4},
    {&kLoops_x86_64_v3, HasV3},
#endif
    {&kLoops_baseline, Always},
};

const Loops* Best() {
  static const Loops* const best = [] {
    for (const Variant& variant : kVariants) {
      if (variant.supported()) return variant.loops;
    }
    return &kLoops_baseline;
  }();
  return best;
}

}  // namespace

const Loops* SelectLoops(std::string* error) {
  const char* requested = std::getenv("TFHFP8_CPU_VARIANT");
  if (requested == nullptr || *requested == '\0' || std::strcmp(requested, "auto") == 0) {
    return Best();
  }
  for (const Variant& variant : kVariants) {
    if (std::strcmp(requested, variant.loops->name) != 0) continue;
    if (variant.supported()) return variant.loops;
    *error = std::string("TFHFP8_CPU_VARIANT=") + requested +
             " is not supported by this CPU; supported: " + SupportedVariants();
    return nullptr;
  }
  *error = std::string("TFHFP8_CPU_VARIANT must be 'auto' or one of: ") + SupportedVariants() +
           "; got '" + requested + "'";
  return nullptr;
}

std::string SupportedVariants() {
  std::string names;
  for (const Variant& variant : kVariants) {
    if (!variant.supported()) continue;
    if (!names.empty()) names += " ";
    names += variant.loops->name;
  }
  return names;
}

template <typename T>
FloatParams<T> MakeFloatParams(const FloatFormatSpec& format, const RoundingOptions& options) {
  return ComputeFloatParams<T>(format, options);
}
template FloatParams<float> MakeFloatParams<float>(const FloatFormatSpec&, const RoundingOptions&);
template FloatParams<double> MakeFloatParams<double>(const FloatFormatSpec&,
                                                     const RoundingOptions&);

Keys MakeSeedKeys(int64_t seed) { return MakeKeys(seed); }

template <typename T>
typename Container<T>::UInt ScaledValueBits(typename Container<T>::UInt code, int k) {
  return ScaledBits<T>(code, k);
}
template uint32_t ScaledValueBits<float>(uint32_t, int);
template uint64_t ScaledValueBits<double>(uint64_t, int);

}  // namespace tfhfp8
