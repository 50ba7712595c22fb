// The fused multi-tensor EMA kernel: one launch for the whole list. Block b reads chunk b of
// the plan, finds its tensor entry, and walks its elements with 16-byte vector loads when
// both pointers allow (a scalar tail otherwise). No torch headers here, on purpose.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/dtype.h"
#include "common/convert.cuh"
#include "common/ema_lerp.h"
#include "common/launch.cuh"
#include "ema/cuda.h"

namespace eman_fused {
namespace {

constexpr int kThreads = 256;
constexpr int kIlp = 2;  // independent vectors in flight per thread and iteration

template <typename T, int N>
struct alignas(16) Pack {
  T v[N];
};

// copy: t = s (momentum 0, exact conversion); else the lerp of common/ema_lerp.h.
template <typename TT, typename ST, typename Acc>
__device__ __forceinline__ TT combine(TT t, ST s, EmaWeights<Acc> k, bool copy) {
  return copy ? from_acc<TT>(to_acc<Acc>(s)) : from_acc<TT>(ema_lerp(to_acc<Acc>(t), to_acc<Acc>(s), k));
}

template <typename TT, typename ST>
__device__ void lerp_chunk(TT* __restrict__ t, const ST* __restrict__ s, int64_t n, double m,
                           bool copy) {
  using Acc = acc_t<TT, ST>;
  constexpr int kVec = 16 / (sizeof(TT) < sizeof(ST) ? sizeof(TT) : sizeof(ST));
  const EmaWeights<Acc> kw = ema_weights<Acc>(m);
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(t) | reinterpret_cast<uintptr_t>(s)) & 15) == 0;
  const int64_t vec_end = aligned ? n / kVec * kVec : 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * kVec;
  for (int64_t base = threadIdx.x * kVec; base < vec_end; base += stride * kIlp) {
    Pack<TT, kVec> tv[kIlp];
    Pack<ST, kVec> sv[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + k * stride;
      if (i < vec_end) {
        tv[k] = *reinterpret_cast<const Pack<TT, kVec>*>(t + i);
        sv[k] = *reinterpret_cast<const Pack<ST, kVec>*>(s + i);
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + k * stride;
      if (i < vec_end) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) tv[k].v[j] = combine(tv[k].v[j], sv[k].v[j], kw, copy);
        *reinterpret_cast<Pack<TT, kVec>*>(t + i) = tv[k];
      }
    }
  }
  for (int64_t i = vec_end + threadIdx.x; i < n; i += blockDim.x)
    t[i] = combine(t[i], s[i], kw, copy);
}

__device__ void copy_bytes_chunk(uint8_t* __restrict__ t, const uint8_t* __restrict__ s,
                                 int64_t n) {
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(t) | reinterpret_cast<uintptr_t>(s)) & 15) == 0;
  const int64_t vec_end = aligned ? n / 16 * 16 : 0;
  for (int64_t i = threadIdx.x * 16; i < vec_end; i += blockDim.x * 16) {
    *reinterpret_cast<uint4*>(t + i) = *reinterpret_cast<const uint4*>(s + i);
  }
  for (int64_t i = vec_end + threadIdx.x; i < n; i += blockDim.x) t[i] = s[i];
}

__global__ void __launch_bounds__(kThreads)
    ema_update_kernel(const EmaTensorEntry* __restrict__ entries,
                      const TensorChunk* __restrict__ chunks, double momentum,
                      const void* momentum_ptr, bool momentum_is_double) {
  const TensorChunk c = chunks[blockIdx.x];
  const EmaTensorEntry e = entries[c.tensor];
  const int64_t n = min(kEmaChunkElems, e.numel - c.start);
  if (e.kind == kKindCopyBytes) {
    copy_bytes_chunk(reinterpret_cast<uint8_t*>(e.teacher) + c.start,
                     reinterpret_cast<const uint8_t*>(e.student) + c.start, n);
    return;
  }
  double m = momentum;
  if (momentum_ptr != nullptr) {
    m = momentum_is_double ? *static_cast<const double*>(momentum_ptr)
                           : static_cast<double>(*static_cast<const float*>(momentum_ptr));
  }
  if (m == 1.0) return;  // bit-identical teacher, no memory traffic
  visit_float_tag<__half, __nv_bfloat16>(e.kind / kNumFloatTags, [&](auto tt) {
    visit_float_tag<__half, __nv_bfloat16>(e.kind % kNumFloatTags, [&](auto st) {
      using TT = typename decltype(tt)::type;
      using ST = typename decltype(st)::type;
      lerp_chunk(reinterpret_cast<TT*>(e.teacher) + c.start,
                 reinterpret_cast<const ST*>(e.student) + c.start, n, m, m == 0.0);
    });
  });
}

}  // namespace

cudaError_t launch_ema_update(const EmaTensorEntry* entries, const TensorChunk* chunks,
                              int64_t num_chunks, double momentum, const void* momentum_ptr,
                              bool momentum_is_double, cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  if (num_chunks > INT32_MAX) return cudaErrorInvalidConfiguration;
  EMAN_FUSED_LAUNCH(static_cast<unsigned>(num_chunks), kThreads, 0, stream, ema_update_kernel)(
      entries, chunks, momentum, momentum_ptr, momentum_is_double);
  return cudaGetLastError();
}

}  // namespace eman_fused
