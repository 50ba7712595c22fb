// Launchers of the fused optimizer kernels: the device copy of the step's table, the
// hyper-parameters, a stream. No torch types.
#pragma once
#include <cuda_runtime_api.h>

#include "common/dtype.h"
#include "optim/layout.h"

namespace eman_fused {

// lr_ptr / teacher_momentum_ptr non-null (capturable): read those float32 device scalars in
// the kernel instead of lr / teacher_momentum.
struct SgdHyper {
  float lr, momentum, dampening, weight_decay, sign, teacher_momentum;
  bool nesterov;
  const float* lr_ptr;
  const float* teacher_momentum_ptr;
};
// Entries with a step pointer (capturable) get their bias corrections from that device count,
// formed in double from the exact betas (the float32 math rounds them once, as the CPU loops).
struct AdamWHyper {
  float lr;
  double beta1, beta2;
  float eps, weight_decay, sign, teacher_momentum;
  const float* lr_ptr;
  const float* teacher_momentum_ptr;
};
struct LarsHyper {
  float lr, momentum, weight_decay, trust_coefficient, sign, teacher_momentum;
  const float* lr_ptr;
  const float* teacher_momentum_ptr;
};

// param_tag (params, grads and state): kF32, kBF16 or kF16; teacher_tag: the same, or kAbsent.
cudaError_t launch_sgd_ema(const OptimEntry* entries, const TensorChunk* chunks, int64_t num_chunks,
                           FloatTag param_tag, FloatTag teacher_tag, SgdHyper h, cudaStream_t stream);
cudaError_t launch_adamw_ema(const OptimEntry* entries, const TensorChunk* chunks,
                             int64_t num_chunks, FloatTag param_tag, FloatTag teacher_tag, AdamWHyper h,
                             cudaStream_t stream);
// Two launches: per-chunk sums of squares into `partials` (2 doubles per chunk), then the
// update, each block summing its tensor's partials in a fixed order (deterministic).
cudaError_t launch_lars_ema(const OptimEntry* entries, const TensorChunk* chunks, int64_t num_chunks,
                            FloatTag param_tag, FloatTag teacher_tag, LarsHyper h, double* partials,
                            cudaStream_t stream);

}  // namespace eman_fused
