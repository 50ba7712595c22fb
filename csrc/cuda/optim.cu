// Fused optimizer steps on CUDA: one block per chunk of the step's table (optim_plan_types.h);
// each thread updates param, state and teacher of its elements in registers, so the new param
// is written once and read by nobody. Branches on hyper-parameters are uniform per launch.
// No torch headers here, on purpose.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "convert.cuh"
#include "optim.h"

namespace eman_fused {
namespace {

constexpr int kThreads = 256;

template <typename TT>
__device__ __forceinline__ void ema_into(int64_t teacher, int64_t i, float p, float mt) {
  if constexpr (!std::is_void_v<TT>) {
    TT* t = reinterpret_cast<TT*>(teacher);
    t[i] = from_acc<TT>(mt * to_acc<float>(t[i]) + (1.0f - mt) * p);
  }
}

template <typename TT>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const OptimEntry* __restrict__ entries, const OptimChunk* __restrict__ chunks,
               SgdHyper h) {
  const OptimChunk c = chunks[blockIdx.x];
  const OptimEntry e = entries[c.tensor];
  const int64_t end = min(c.start + kOptimChunkElems, e.numel);
  float* p = reinterpret_cast<float*>(e.param);
  const float* g = reinterpret_cast<const float*>(e.grad);
  float* buf = reinterpret_cast<float*>(e.state0);
  const bool first = (e.flags & kOptimFirst) != 0;
  const float lr = h.lr_ptr != nullptr ? *h.lr_ptr : h.lr;
  const float mt = h.teacher_momentum_ptr != nullptr ? *h.teacher_momentum_ptr : h.teacher_momentum;
  for (int64_t i = c.start + threadIdx.x; i < end; i += blockDim.x) {
    const float pi = p[i];
    float d = h.sign * g[i];
    if (h.weight_decay != 0.0f) d = d + h.weight_decay * pi;
    if (buf != nullptr) {
      const float b = first ? d : h.momentum * buf[i] + (1.0f - h.dampening) * d;
      buf[i] = b;
      d = h.nesterov ? d + h.momentum * b : b;
    }
    const float np = pi - lr * d;
    p[i] = np;
    ema_into<TT>(e.teacher, i, np, mt);
  }
}

template <typename TT>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const OptimEntry* __restrict__ entries, const OptimChunk* __restrict__ chunks,
                 AdamWHyper h) {
  const OptimChunk c = chunks[blockIdx.x];
  const OptimEntry e = entries[c.tensor];
  const int64_t end = min(c.start + kOptimChunkElems, e.numel);
  float* p = reinterpret_cast<float*>(e.param);
  const float* g = reinterpret_cast<const float*>(e.grad);
  float* m = reinterpret_cast<float*>(e.state0);
  float* v = reinterpret_cast<float*>(e.state1);
  float* vmax = reinterpret_cast<float*>(e.state2);
  const float lr = h.lr_ptr != nullptr ? *h.lr_ptr : h.lr;
  const float mt = h.teacher_momentum_ptr != nullptr ? *h.teacher_momentum_ptr : h.teacher_momentum;
  float step_size = static_cast<float>(e.scalar0), bc2 = static_cast<float>(e.scalar1);
  if (e.step != 0) {  // capturable: the bias corrections from the device step count, in double
    const double k = *reinterpret_cast<const float*>(e.step);
    step_size = static_cast<float>(static_cast<double>(lr) / (1.0 - pow(static_cast<double>(h.beta1), k)));
    bc2 = static_cast<float>(sqrt(1.0 - pow(static_cast<double>(h.beta2), k)));
  }
  const float decay = 1.0f - lr * h.weight_decay, w1 = 1.0f - h.beta1, w2 = 1.0f - h.beta2;
  const bool small = fabsf(w1) < 0.5f;
  for (int64_t i = c.start + threadIdx.x; i < end; i += blockDim.x) {
    const float gi = h.sign * g[i];
    const float pi = p[i] * decay;
    const float mi = small ? m[i] + w1 * (gi - m[i]) : gi - (gi - m[i]) * (1.0f - w1);
    const float vi = v[i] * h.beta2 + w2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float s = vi;
    if (vmax != nullptr) {
      s = fmaxf(vmax[i], vi);
      vmax[i] = s;
    }
    const float np = pi - step_size * (mi / (sqrtf(s) / bc2 + h.eps));
    p[i] = np;
    ema_into<TT>(e.teacher, i, np, mt);
  }
}

// Fixed-order block sum (deterministic): a shared-memory tree over kThreads values.
__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = shared[0];
  __syncthreads();
  return total;
}

__global__ void __launch_bounds__(kThreads)
    lars_norms_kernel(const OptimEntry* __restrict__ entries,
                      const OptimChunk* __restrict__ chunks, LarsHyper h, double* partials) {
  __shared__ double shared[kThreads];
  const OptimChunk c = chunks[blockIdx.x];
  const OptimEntry e = entries[c.tensor];
  if ((e.flags & kOptimAdapt) == 0) return;  // uniform per block
  const int64_t end = min(c.start + kOptimChunkElems, e.numel);
  const float* p = reinterpret_cast<const float*>(e.param);
  const float* g = reinterpret_cast<const float*>(e.grad);
  float sp = 0.0f, sd = 0.0f;
  for (int64_t i = c.start + threadIdx.x; i < end; i += blockDim.x) {
    const float pi = p[i], d = h.sign * g[i] + h.weight_decay * pi;
    sp += pi * pi;
    sd += d * d;
  }
  const double tp = block_sum(sp, shared), td = block_sum(sd, shared);
  if (threadIdx.x == 0) partials[2 * blockIdx.x] = tp, partials[2 * blockIdx.x + 1] = td;
}

template <typename TT>
__global__ void __launch_bounds__(kThreads)
    lars_update_kernel(const OptimEntry* __restrict__ entries,
                       const OptimChunk* __restrict__ chunks, LarsHyper h,
                       const double* __restrict__ partials) {
  __shared__ double shared[kThreads];
  const OptimChunk c = chunks[blockIdx.x];
  const OptimEntry e = entries[c.tensor];
  const bool adapt = (e.flags & kOptimAdapt) != 0, first = (e.flags & kOptimFirst) != 0;
  float trust = 1.0f;
  if (adapt) {  // every block of the tensor sums the same partials in the same order
    double sp = 0.0, sd = 0.0;
    for (int64_t k = e.first_chunk + threadIdx.x; k < e.first_chunk + e.num_chunks; k += blockDim.x) {
      sp += partials[2 * k];
      sd += partials[2 * k + 1];
    }
    const double pn = sqrt(block_sum(sp, shared)), dn = sqrt(block_sum(sd, shared));
    if (pn > 0.0 && dn > 0.0) trust = static_cast<float>(h.trust_coefficient * pn / dn);
  }
  const int64_t end = min(c.start + kOptimChunkElems, e.numel);
  float* p = reinterpret_cast<float*>(e.param);
  const float* g = reinterpret_cast<const float*>(e.grad);
  float* buf = reinterpret_cast<float*>(e.state0);
  const float lr = h.lr_ptr != nullptr ? *h.lr_ptr : h.lr;
  const float mt = h.teacher_momentum_ptr != nullptr ? *h.teacher_momentum_ptr : h.teacher_momentum;
  for (int64_t i = c.start + threadIdx.x; i < end; i += blockDim.x) {
    const float pi = p[i];
    float d = h.sign * g[i];
    if (adapt) d = (d + h.weight_decay * pi) * trust;
    const float b = first ? d : h.momentum * buf[i] + d;
    buf[i] = b;
    const float np = pi - lr * b;
    p[i] = np;
    ema_into<TT>(e.teacher, i, np, mt);
  }
}

template <typename F>
cudaError_t with_teacher_type(int tag, F&& f) {
  switch (tag) {
    case 0: return f(static_cast<void*>(nullptr));
    case 1: return f(static_cast<float*>(nullptr));
    case 2: return f(static_cast<__nv_bfloat16*>(nullptr));
    case 3: return f(static_cast<__half*>(nullptr));
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_sgd_ema(const OptimEntry* entries, const OptimChunk* chunks, int64_t num_chunks,
                           int teacher_tag, SgdHyper h, cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  if (num_chunks > INT32_MAX) return cudaErrorInvalidConfiguration;
  return with_teacher_type(teacher_tag, [&](auto* tag) {
    using TT = std::remove_pointer_t<decltype(tag)>;
    sgd_kernel<TT><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(entries, chunks, h);
    return cudaGetLastError();
  });
}

cudaError_t launch_adamw_ema(const OptimEntry* entries, const OptimChunk* chunks,
                             int64_t num_chunks, int teacher_tag, AdamWHyper h, cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  if (num_chunks > INT32_MAX) return cudaErrorInvalidConfiguration;
  return with_teacher_type(teacher_tag, [&](auto* tag) {
    using TT = std::remove_pointer_t<decltype(tag)>;
    adamw_kernel<TT><<<static_cast<unsigned>(num_chunks), kThreads, 0, stream>>>(entries, chunks, h);
    return cudaGetLastError();
  });
}

cudaError_t launch_lars_ema(const OptimEntry* entries, const OptimChunk* chunks, int64_t num_chunks,
                            int teacher_tag, LarsHyper h, double* partials, cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  if (num_chunks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const auto blocks = static_cast<unsigned>(num_chunks);
  lars_norms_kernel<<<blocks, kThreads, 0, stream>>>(entries, chunks, h, partials);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return with_teacher_type(teacher_tag, [&](auto* tag) {
    using TT = std::remove_pointer_t<decltype(tag)>;
    lars_update_kernel<TT><<<blocks, kThreads, 0, stream>>>(entries, chunks, h, partials);
    return cudaGetLastError();
  });
}

}  // namespace eman_fused
