// Fused optimizer steps on CUDA: one block per chunk of the step's table (optim/layout.h);
// each thread updates param, state and teacher of its elements in registers, so the new param
// is written once and read by nobody. Branches on hyper-parameters are uniform per launch.
// PT: the params' (grads', state's) element type; 16-bit values are loaded into float32 math and
// rounded once per store, as torch's fused optimizers do.
// No torch headers here, on purpose.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/convert.cuh"
#include "common/dtype.h"
#include "common/launch.cuh"
#include "optim/cuda.h"

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

template <typename PT>
__device__ __forceinline__ float ld(const PT* x, int64_t i) {
  return to_acc<float>(x[i]);
}

template <typename PT>
__device__ __forceinline__ void st(PT* x, int64_t i, float v) {  // rounds to nearest even
  x[i] = from_acc<PT>(v);
}

template <typename PT, typename TT>
__global__ void __launch_bounds__(kThreads)
    sgd_kernel(const OptimEntry* __restrict__ entries, const TensorChunk* __restrict__ chunks,
               SgdHyper h) {
  const TensorChunk c = chunks[blockIdx.x];
  const OptimEntry e = entries[c.tensor];
  const int64_t end = min(c.start + kOptimChunkElems, e.numel);
  PT* p = reinterpret_cast<PT*>(e.param);
  const PT* g = reinterpret_cast<const PT*>(e.grad);
  PT* buf = reinterpret_cast<PT*>(e.state0);
  const bool first = (e.flags & kOptimFirst) != 0;
  const float lr = h.lr_ptr != nullptr ? *h.lr_ptr : h.lr;
  const float mt = h.teacher_momentum_ptr != nullptr ? *h.teacher_momentum_ptr : h.teacher_momentum;
  for (int64_t i = c.start + threadIdx.x; i < end; i += blockDim.x) {
    const float pi = ld(p, i);
    float d = h.sign * ld(g, i);
    if (h.weight_decay != 0.0f) d = d + h.weight_decay * pi;
    if (buf != nullptr) {
      const float b = first ? d : h.momentum * ld(buf, i) + (1.0f - h.dampening) * d;
      st(buf, i, b);
      d = h.nesterov ? d + h.momentum * b : b;
    }
    const float np = pi - lr * d;
    const PT stored = from_acc<PT>(np);  // the teacher averages the param as stored
    p[i] = stored;
    ema_into<TT>(e.teacher, i, to_acc<float>(stored), mt);
  }
}

template <typename PT, typename TT>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const OptimEntry* __restrict__ entries, const TensorChunk* __restrict__ chunks,
                 AdamWHyper h) {
  const TensorChunk c = chunks[blockIdx.x];
  const OptimEntry e = entries[c.tensor];
  const int64_t end = min(c.start + kOptimChunkElems, e.numel);
  PT* p = reinterpret_cast<PT*>(e.param);
  const PT* g = reinterpret_cast<const PT*>(e.grad);
  PT* m = reinterpret_cast<PT*>(e.state0);
  PT* v = reinterpret_cast<PT*>(e.state1);
  PT* vmax = reinterpret_cast<PT*>(e.state2);
  const float lr = h.lr_ptr != nullptr ? *h.lr_ptr : h.lr;
  const float mt = h.teacher_momentum_ptr != nullptr ? *h.teacher_momentum_ptr : h.teacher_momentum;
  float step_size = static_cast<float>(e.scalar0), bc2 = static_cast<float>(e.scalar1);
  if (e.step != 0) {  // capturable: the bias corrections from the device step count, in double
    const double k = *reinterpret_cast<const float*>(e.step);
    step_size = static_cast<float>(static_cast<double>(lr) / (1.0 - pow(h.beta1, k)));
    bc2 = static_cast<float>(sqrt(1.0 - pow(h.beta2, k)));
  }
  const float b1 = static_cast<float>(h.beta1), b2 = static_cast<float>(h.beta2);
  const float decay = 1.0f - lr * h.weight_decay, w1 = 1.0f - b1, w2 = 1.0f - b2;
  const bool small = fabsf(w1) < 0.5f;
  for (int64_t i = c.start + threadIdx.x; i < end; i += blockDim.x) {
    const float gi = h.sign * ld(g, i);
    const float pi = ld(p, i) * decay;
    const float m0 = ld(m, i);
    const float mi = small ? m0 + w1 * (gi - m0) : gi - (gi - m0) * (1.0f - w1);
    const float vi = ld(v, i) * b2 + w2 * gi * gi;
    st(m, i, mi);
    st(v, i, vi);
    float s = vi;
    if (vmax != nullptr) {
      s = fmaxf(ld(vmax, i), vi);
      st(vmax, i, s);
    }
    const float np = pi - step_size * (mi / (sqrtf(s) / bc2 + h.eps));
    const PT stored = from_acc<PT>(np);  // the teacher averages the param as stored
    p[i] = stored;
    ema_into<TT>(e.teacher, i, to_acc<float>(stored), mt);
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

template <typename PT>
__global__ void __launch_bounds__(kThreads)
    lars_norms_kernel(const OptimEntry* __restrict__ entries,
                      const TensorChunk* __restrict__ chunks, LarsHyper h, double* partials) {
  __shared__ double shared[kThreads];
  const TensorChunk c = chunks[blockIdx.x];
  const OptimEntry e = entries[c.tensor];
  if ((e.flags & kOptimAdapt) == 0) return;  // uniform per block
  const int64_t end = min(c.start + kOptimChunkElems, e.numel);
  const PT* p = reinterpret_cast<const PT*>(e.param);
  const PT* g = reinterpret_cast<const PT*>(e.grad);
  float sp = 0.0f, sd = 0.0f;
  for (int64_t i = c.start + threadIdx.x; i < end; i += blockDim.x) {
    const float pi = ld(p, i), d = h.sign * ld(g, i) + h.weight_decay * pi;
    sp += pi * pi;
    sd += d * d;
  }
  const double tp = block_sum(sp, shared), td = block_sum(sd, shared);
  if (threadIdx.x == 0) partials[2 * blockIdx.x] = tp, partials[2 * blockIdx.x + 1] = td;
}

template <typename PT, typename TT>
__global__ void __launch_bounds__(kThreads)
    lars_update_kernel(const OptimEntry* __restrict__ entries,
                       const TensorChunk* __restrict__ chunks, LarsHyper h,
                       const double* __restrict__ partials) {
  __shared__ double shared[kThreads];
  const TensorChunk c = chunks[blockIdx.x];
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
  PT* p = reinterpret_cast<PT*>(e.param);
  const PT* g = reinterpret_cast<const PT*>(e.grad);
  PT* buf = reinterpret_cast<PT*>(e.state0);
  const float lr = h.lr_ptr != nullptr ? *h.lr_ptr : h.lr;
  const float mt = h.teacher_momentum_ptr != nullptr ? *h.teacher_momentum_ptr : h.teacher_momentum;
  for (int64_t i = c.start + threadIdx.x; i < end; i += blockDim.x) {
    const float pi = ld(p, i);
    float d = h.sign * ld(g, i);
    if (adapt) d = (d + h.weight_decay * pi) * trust;
    const float b = first ? d : h.momentum * ld(buf, i) + d;
    st(buf, i, b);
    const float np = pi - lr * b;
    const PT stored = from_acc<PT>(np);  // the teacher averages the param as stored
    p[i] = stored;
    ema_into<TT>(e.teacher, i, to_acc<float>(stored), mt);
  }
}

// Calls f(PT*, TT*) (null pointers as type tags) for the params' and teachers' types.
template <typename F>
cudaError_t with_types(FloatTag param_tag, FloatTag teacher_tag, F&& f) {
  auto with_teacher = [&](auto* pt) {
    switch (teacher_tag) {
      case kAbsent: return f(pt, static_cast<void*>(nullptr));
      case kF32: return f(pt, static_cast<float*>(nullptr));
      case kBF16: return f(pt, static_cast<__nv_bfloat16*>(nullptr));
      case kF16: return f(pt, static_cast<__half*>(nullptr));
      default: return cudaErrorInvalidValue;
    }
  };
  switch (param_tag) {
    case kF32: return with_teacher(static_cast<float*>(nullptr));
    case kBF16: return with_teacher(static_cast<__nv_bfloat16*>(nullptr));
    case kF16: return with_teacher(static_cast<__half*>(nullptr));
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_sgd_ema(const OptimEntry* entries, const TensorChunk* chunks, int64_t num_chunks,
                           FloatTag param_tag, FloatTag teacher_tag, SgdHyper h, cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  if (num_chunks > INT32_MAX) return cudaErrorInvalidConfiguration;
  return with_types(param_tag, teacher_tag, [&](auto* ptag, auto* ttag) {
    using PT = std::remove_pointer_t<decltype(ptag)>;
    using TT = std::remove_pointer_t<decltype(ttag)>;
    EMAN_FUSED_LAUNCH(static_cast<unsigned>(num_chunks), kThreads, 0, stream, sgd_kernel<PT, TT>)(
        entries, chunks, h);
    return cudaGetLastError();
  });
}

cudaError_t launch_adamw_ema(const OptimEntry* entries, const TensorChunk* chunks,
                             int64_t num_chunks, FloatTag param_tag, FloatTag teacher_tag, AdamWHyper h,
                             cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  if (num_chunks > INT32_MAX) return cudaErrorInvalidConfiguration;
  return with_types(param_tag, teacher_tag, [&](auto* ptag, auto* ttag) {
    using PT = std::remove_pointer_t<decltype(ptag)>;
    using TT = std::remove_pointer_t<decltype(ttag)>;
    EMAN_FUSED_LAUNCH(static_cast<unsigned>(num_chunks), kThreads, 0, stream, adamw_kernel<PT, TT>)(
        entries, chunks, h);
    return cudaGetLastError();
  });
}

cudaError_t launch_lars_ema(const OptimEntry* entries, const TensorChunk* chunks, int64_t num_chunks,
                            FloatTag param_tag, FloatTag teacher_tag, LarsHyper h, double* partials,
                            cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  if (num_chunks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const auto blocks = static_cast<unsigned>(num_chunks);
  return with_types(param_tag, teacher_tag, [&](auto* ptag, auto* ttag) {
    using PT = std::remove_pointer_t<decltype(ptag)>;
    using TT = std::remove_pointer_t<decltype(ttag)>;
    EMAN_FUSED_LAUNCH(blocks, kThreads, 0, stream, lars_norms_kernel<PT>)(
        entries, chunks, h, partials);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    EMAN_FUSED_LAUNCH(blocks, kThreads, 0, stream, lars_update_kernel<PT, TT>)(
        entries, chunks, h, partials);
    return cudaGetLastError();
  });
}

}  // namespace eman_fused
