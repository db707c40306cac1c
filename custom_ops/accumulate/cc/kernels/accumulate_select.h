// The accumulation loops of the CPU variant that the quantization kernels run
// (cpu_dispatch.h), for the TensorFlow kernels of accumulate_kernels.cc and
// fused_kernels.cc. Compiled for the baseline only, with TensorFlow's headers.

#ifndef TFHFP8_CUSTOM_OPS_ACCUMULATE_CC_KERNELS_ACCUMULATE_SELECT_H_
#define TFHFP8_CUSTOM_OPS_ACCUMULATE_CC_KERNELS_ACCUMULATE_SELECT_H_

#include <string>

#include "accumulate_types.h"
#include "cpu_dispatch.h"
#include "kernel_util.h"

namespace tfhfp8 {

extern const AccumulateLoops kAccumulateLoops_baseline;
#if defined(__x86_64__)
extern const AccumulateLoops kAccumulateLoops_x86_64_v3;
extern const AccumulateLoops kAccumulateLoops_x86_64_v4;
#endif

// The loops of the CPU variant that the quantization kernels run (cpu_dispatch.h).
inline absl::Status SelectAccumulateLoops(const AccumulateLoops** loops) {
  const Loops* quantize;
  TF_RETURN_IF_ERROR(SelectLoopsOrError(&quantize));
  for (const AccumulateLoops* candidate : {
#if defined(__x86_64__)
           &kAccumulateLoops_x86_64_v4, &kAccumulateLoops_x86_64_v3,
#endif
           &kAccumulateLoops_baseline}) {
    if (std::string(candidate->name) == quantize->name) {
      *loops = candidate;
      return absl::OkStatus();
    }
  }
  return tensorflow::errors::InvalidArgument("no accumulation loops for the CPU variant ",
                                             quantize->name);
}

}  // namespace tfhfp8

#endif  // TFHFP8_CUSTOM_OPS_ACCUMULATE_CC_KERNELS_ACCUMULATE_SELECT_H_
