// Launcher of the fused EMA kernel: raw pointers and a stream, no torch types.
#pragma once
#include <cuda_runtime_api.h>

#include "ema/layout.h"

namespace eman_fused {

// momentum_ptr == nullptr: use `momentum`; else read a float32 (or float64 when
// momentum_is_double) scalar from device memory in the kernel (CUDA-graph friendly).
cudaError_t launch_ema_update(const EmaTensorEntry* entries, const TensorChunk* chunks,
                              int64_t num_chunks, double momentum, const void* momentum_ptr,
                              bool momentum_is_double, cudaStream_t stream);

}  // namespace eman_fused
