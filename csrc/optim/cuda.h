// Launcher of the fused optimizer kernels: the device copy of the step's table (entries and
// chunks), the hyper-parameters, a stream. No torch types.
#pragma once
#include <cuda_runtime_api.h>

#include "common/dtype.h"
#include "optim/hyper.h"
#include "optim/layout.h"

namespace eman_fused {

// The hyper-parameters of one call, in optim/hyper.h's order: host values, and for those given
// as device scalars (capturable) their float32 addresses, read by the kernels instead. The
// kernels form the call's scalars from these (optim/math.h) once per block.
struct HyperArgs {
  double value[kMaxHyper];
  const float* device[kMaxHyper];
};

// param_tag (params, grads and state): kF32, kBF16 or kF16; teacher_tag: the same, or kAbsent.
// LARS takes two launches: per-chunk sums of squares into `partials` (2 doubles per chunk),
// then the update, each block summing its tensor's partials in a fixed order (deterministic).
cudaError_t launch_optim_ema(Optimizer optimizer, const OptimEntry* entries,
                             const TensorChunk* chunks, int64_t num_chunks, FloatTag param_tag,
                             FloatTag teacher_tag, const HyperArgs& hyper, double* partials,
                             cudaStream_t stream);

}  // namespace eman_fused
