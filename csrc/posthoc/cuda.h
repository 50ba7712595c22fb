// Launcher of the fused post-hoc EMA kernel: raw pointers and a stream, no torch types.
#pragma once
#include <cuda_runtime_api.h>

#include "posthoc/layout.h"

namespace eman_fused {

struct PosthocGammas {
  double gamma[kMaxPosthocProfiles];
  int64_t count;
};

// step: device int64, the updates done before this one (the kernel uses t = *step + 1).
// The launcher then advances *step by one, on the same stream, after every block has read it.
cudaError_t launch_posthoc_ema_update(const PosthocTensorEntry* entries, const TensorChunk* chunks,
                                      int64_t num_chunks, PosthocGammas gammas, int64_t* step,
                                      cudaStream_t stream);

}  // namespace eman_fused
