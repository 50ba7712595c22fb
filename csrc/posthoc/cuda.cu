// The fused K-profile post-hoc EMA kernel: one launch for the whole model. Block b reads chunk
// b of the plan, loads each 16-byte student vector once and updates every profile from it
// (2K + 1 tensor passes instead of the 3K of K separate EMA updates). The coefficients are
// formed on the device from the step counter, so a CUDA graph can replay the update.
// No torch headers here, on purpose.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/convert.cuh"
#include "common/dtype.h"
#include "common/launch.cuh"
#include "posthoc/cuda.h"

namespace eman_fused {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(16) Pack {
  T v[N];
};

// The EMA update's expression (ema/cuda.cu: torch.lerp's two forms, t + w(s - t), or
// s - (s - t)v with v = 1 - w for w >= 1/2), so a profile gets the bits ema_update_ gives.
template <typename TT, typename ST, typename Acc>
__device__ __forceinline__ TT combine(TT t, ST s, Acc w, Acc v, bool small, bool copy) {
  const Acc ta = to_acc<Acc>(t), sa = to_acc<Acc>(s);
  return copy ? from_acc<TT>(sa) : from_acc<TT>(small ? ta + w * (sa - ta) : sa - (sa - ta) * v);
}

template <typename TT, typename ST>
__device__ void posthoc_chunk(const PosthocTensorEntry& e, int64_t start, int64_t n,
                              const double* betas) {
  using Acc = acc_t<TT, ST>;
  constexpr int kVec = 16 / (sizeof(TT) < sizeof(ST) ? sizeof(TT) : sizeof(ST));
  const int k = static_cast<int>(e.num_profiles);
  const ST* __restrict__ s = reinterpret_cast<const ST*>(e.student) + start;
  Acc ww[kMaxPosthocProfiles], vv[kMaxPosthocProfiles];
  bool small[kMaxPosthocProfiles], copy[kMaxPosthocProfiles], skip[kMaxPosthocProfiles];
  uintptr_t align = reinterpret_cast<uintptr_t>(s);
  for (int j = 0; j < k; ++j) {
    ww[j] = static_cast<Acc>(1.0 - betas[j]);
    vv[j] = static_cast<Acc>(1) - ww[j];
    small[j] = ww[j] < static_cast<Acc>(0.5);
    copy[j] = betas[j] == 0.0;
    skip[j] = betas[j] == 1.0;
    align |= reinterpret_cast<uintptr_t>(reinterpret_cast<TT*>(e.profiles[j]) + start);
  }
  const int64_t vec_end = (align & 15) == 0 ? n / kVec * kVec : 0;
  for (int64_t i = threadIdx.x * kVec; i < vec_end; i += static_cast<int64_t>(blockDim.x) * kVec) {
    const Pack<ST, kVec> sv = *reinterpret_cast<const Pack<ST, kVec>*>(s + i);
    for (int j = 0; j < k; ++j) {
      if (skip[j]) continue;
      TT* t = reinterpret_cast<TT*>(e.profiles[j]) + start + i;
      Pack<TT, kVec> tv = *reinterpret_cast<const Pack<TT, kVec>*>(t);
#pragma unroll
      for (int q = 0; q < kVec; ++q) tv.v[q] = combine(tv.v[q], sv.v[q], ww[j], vv[j], small[j], copy[j]);
      *reinterpret_cast<Pack<TT, kVec>*>(t) = tv;
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < n; i += blockDim.x) {
    const ST sv = s[i];
    for (int j = 0; j < k; ++j) {
      if (skip[j]) continue;
      TT* t = reinterpret_cast<TT*>(e.profiles[j]) + start + i;
      *t = combine(*t, sv, ww[j], vv[j], small[j], copy[j]);
    }
  }
}

__device__ void copy_bytes_chunk(const PosthocTensorEntry& e, int64_t start, int64_t n) {
  const uint8_t* s = reinterpret_cast<const uint8_t*>(e.student) + start;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const uint8_t v = s[i];
    for (int64_t j = 0; j < e.num_profiles; ++j) reinterpret_cast<uint8_t*>(e.profiles[j])[start + i] = v;
  }
}

__global__ void __launch_bounds__(kThreads)
    posthoc_ema_kernel(const PosthocTensorEntry* __restrict__ entries,
                       const TensorChunk* __restrict__ chunks, PosthocGammas gammas,
                       const int64_t* __restrict__ step) {
  const TensorChunk c = chunks[blockIdx.x];
  const PosthocTensorEntry e = entries[c.tensor];
  const int64_t n = min(kPosthocChunkElems, e.numel - c.start);
  if (e.kind == kKindCopyBytes) {
    copy_bytes_chunk(e, c.start, n);
    return;
  }
  // EDM2's power-function coefficient beta_t = (1 - 1/t)^(gamma + 1), in double.
  const double t = static_cast<double>(*step + 1);
  double betas[kMaxPosthocProfiles];
  for (int j = 0; j < gammas.count; ++j) betas[j] = t <= 1.0 ? 0.0 : pow(1.0 - 1.0 / t, gammas.gamma[j] + 1.0);
  visit_float_tag<__half, __nv_bfloat16>(e.kind / kNumFloatTags, [&](auto tt) {
    visit_float_tag<__half, __nv_bfloat16>(e.kind % kNumFloatTags, [&](auto st) {
      using TT = typename decltype(tt)::type;
      using ST = typename decltype(st)::type;
      posthoc_chunk<TT, ST>(e, c.start, n, betas);
    });
  });
}

__global__ void advance_step_kernel(int64_t* step) { *step += 1; }

}  // namespace

cudaError_t launch_posthoc_ema_update(const PosthocTensorEntry* entries, const TensorChunk* chunks,
                                      int64_t num_chunks, PosthocGammas gammas, int64_t* step,
                                      cudaStream_t stream) {
  if (num_chunks > INT32_MAX) return cudaErrorInvalidConfiguration;
  if (num_chunks > 0) {
    EMAN_FUSED_LAUNCH(static_cast<unsigned>(num_chunks), kThreads, 0, stream, posthoc_ema_kernel)(
        entries, chunks, gammas, step);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  EMAN_FUSED_LAUNCH(1, 1, 0, stream, advance_step_kernel)(step);
  return cudaGetLastError();
}

}  // namespace eman_fused
