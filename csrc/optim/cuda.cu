// Fused optimizer steps on CUDA: one block per chunk of the step's table (optim/layout.h);
// each thread updates param, state and teacher of its elements in registers, so the new param
// is written once and read by nobody. The element math is optim/math.h's (shared with the CPU
// loops); branches on hyper-parameters are uniform per launch, on flags uniform per block.
// PT: the params' (grads', state's) element type; 16-bit values are loaded into float32 math and
// rounded once per store, as torch's fused optimizers do.
// No torch headers here, on purpose.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "common/convert.cuh"
#include "common/dtype.h"
#include "common/ema_lerp.h"
#include "common/launch.cuh"
#include "optim/cuda.h"
#include "optim/math.h"

namespace eman_fused {
namespace {

constexpr int kThreads = 256;

// The hyper-parameters as the kernel sees them: device scalars where given, host values else.
template <typename Hyper>
__device__ __forceinline__ Hyper resolve_hyper(const HyperArgs& a) {
  Hyper h;
  double* v = reinterpret_cast<double*>(&h);
#pragma unroll
  for (int k = 0; k < static_cast<int>(sizeof(Hyper) / sizeof(double)); ++k) {
    v[k] = a.device[k] != nullptr ? static_cast<double>(*a.device[k]) : a.value[k];
  }
  return h;
}

template <typename PT>
__device__ __forceinline__ float ld(const PT* x, int64_t i) {
  return to_acc<float>(x[i]);
}

template <typename PT>
__device__ __forceinline__ void st(PT* x, int64_t i, float v) {  // rounds to nearest even
  x[i] = from_acc<PT>(v);
}

// The teacher from the param as stored: the lerp of common/ema_lerp.h, or at momentum 0 the
// param itself, exactly as ema_update_ (momentum 1: never called, nothing touched).
template <typename TT>
__device__ __forceinline__ void teacher_into(int64_t teacher, int64_t i, float p,
                                             EmaWeights<float> k, bool copy) {
  if constexpr (!std::is_void_v<TT>) {
    TT* t = reinterpret_cast<TT*>(teacher);
    t[i] = from_acc<TT>(copy ? p : ema_lerp(to_acc<float>(t[i]), p, k));
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

// SGD and both LARS formulas (momentum_update). LARS: the tensor's factor from pass 1's partials,
// summed by every block of the tensor in the same order.
template <typename PT, typename TT>
__global__ void __launch_bounds__(kThreads)
    momentum_kernel(const OptimEntry* __restrict__ entries, const TensorChunk* __restrict__ chunks,
                    HyperArgs ha, Optimizer optimizer, const double* __restrict__ partials) {
  __shared__ double shared[kThreads];
  const TensorChunk c = chunks[blockIdx.x];
  const OptimEntry e = entries[c.tensor];
  MomentumFloats f;
  EmaWeights<float> tk;
  float factor = 1.0f;
  bool decay, nesterov;
  double teacher_momentum;
  if (optimizer == Optimizer::kSgd) {
    const SgdHyper h = resolve_hyper<SgdHyper>(ha);
    const SgdScalars s = sgd_scalars(h);
    f = momentum_floats(s);
    tk = teacher_weights(s), teacher_momentum = h.teacher_momentum;
    decay = h.weight_decay != 0.0, nesterov = h.nesterov != 0.0;
  } else {
    const bool you2017 = optimizer == Optimizer::kLarsYou2017;
    const LarsHyper h = resolve_hyper<LarsHyper>(ha);
    const LarsScalars s = lars_scalars(h, you2017);
    f = momentum_floats(s);
    tk = teacher_weights(s), teacher_momentum = h.teacher_momentum;
    nesterov = h.nesterov != 0.0;
    const bool adapt = (e.flags & kOptimAdapt) != 0;  // uniform per block
    decay = you2017 || adapt;
    double p2 = 0.0, n2 = 0.0;
    if (adapt) {
      for (int64_t k = e.first_chunk + threadIdx.x; k < e.first_chunk + e.num_chunks; k += blockDim.x) {
        p2 += partials[2 * k];
        n2 += partials[2 * k + 1];
      }
      p2 = block_sum(p2, shared);
      n2 = block_sum(n2, shared);
    }
    factor = lars_factor(s, you2017, adapt, p2, n2);
  }
  const EmaMode tmode = e.teacher != 0 ? ema_mode(teacher_momentum) : EmaMode::kSkip;
  const int64_t end = min(c.start + kOptimChunkElems, e.numel);
  PT* p = reinterpret_cast<PT*>(e.param);
  const PT* g = reinterpret_cast<const PT*>(e.grad);
  PT* buf = reinterpret_cast<PT*>(e.first_moment);
  const bool first = (e.flags & kOptimFirst) != 0;
  for (int64_t i = c.start + threadIdx.x; i < end; i += blockDim.x) {
    const float b0 = buf != nullptr && !first ? ld(buf, i) : 0.0f;
    const MomentumOut o = momentum_update(ld(p, i), ld(g, i), b0, f, factor, decay, buf != nullptr,
                                          nesterov, first);
    if (buf != nullptr) st(buf, i, o.buf);
    const PT stored = from_acc<PT>(o.param);  // the teacher averages the param as stored
    p[i] = stored;
    if (tmode != EmaMode::kSkip) {
      teacher_into<TT>(e.teacher, i, to_acc<float>(stored), tk, tmode == EmaMode::kCopy);
    }
  }
}

template <typename PT, typename TT>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const OptimEntry* __restrict__ entries, const TensorChunk* __restrict__ chunks,
                 HyperArgs ha) {
  const TensorChunk c = chunks[blockIdx.x];
  const OptimEntry e = entries[c.tensor];
  const AdamWHyper h = resolve_hyper<AdamWHyper>(ha);
  const AdamWScalars s = adamw_scalars(h);
  double bc1 = e.bias_correction1, bc2 = e.bias_correction2_sqrt;
  if (e.step != 0) {  // a device step count (capturable): this step is its value + 1
    const double k = static_cast<double>(*reinterpret_cast<const float*>(e.step)) + 1.0;
    adamw_bias_corrections(h.beta1, h.beta2, k, &bc1, &bc2);
  }
  const float step_size = static_cast<float>(h.lr / bc1), bc2f = static_cast<float>(bc2);
  const AdamWFloats f = adamw_floats(s);
  const EmaWeights<float> tk = teacher_weights(s);
  const bool small = lerp_weight_small(f.w1);
  const EmaMode tmode = e.teacher != 0 ? ema_mode(h.teacher_momentum) : EmaMode::kSkip;
  const int64_t end = min(c.start + kOptimChunkElems, e.numel);
  PT* p = reinterpret_cast<PT*>(e.param);
  const PT* g = reinterpret_cast<const PT*>(e.grad);
  PT* m = reinterpret_cast<PT*>(e.first_moment);
  PT* v = reinterpret_cast<PT*>(e.second_moment);
  PT* vmax = reinterpret_cast<PT*>(e.max_second_moment);
  for (int64_t i = c.start + threadIdx.x; i < end; i += blockDim.x) {
    const float vmax0 = vmax != nullptr ? ld(vmax, i) : 0.0f;
    const AdamWOut o = adamw_update(ld(p, i), ld(g, i), ld(m, i), ld(v, i), vmax0, f, step_size, bc2f,
                                    small, vmax != nullptr);
    st(m, i, o.exp_avg);
    st(v, i, o.exp_avg_sq);
    if (vmax != nullptr) st(vmax, i, o.max_exp_avg_sq);
    const PT stored = from_acc<PT>(o.param);  // the teacher averages the param as stored
    p[i] = stored;
    if (tmode != EmaMode::kSkip) {
      teacher_into<TT>(e.teacher, i, to_acc<float>(stored), tk, tmode == EmaMode::kCopy);
    }
  }
}

// LARS pass 1: this chunk's sums of p^2 and of (sign*g + norm_weight_decay*p)^2.
template <typename PT>
__global__ void __launch_bounds__(kThreads)
    lars_norms_kernel(const OptimEntry* __restrict__ entries,
                      const TensorChunk* __restrict__ chunks, HyperArgs ha, Optimizer optimizer,
                      double* partials) {
  __shared__ double shared[kThreads];
  const TensorChunk c = chunks[blockIdx.x];
  const OptimEntry e = entries[c.tensor];
  if ((e.flags & kOptimAdapt) == 0) return;  // uniform per block
  const LarsScalars s = lars_scalars(resolve_hyper<LarsHyper>(ha), optimizer == Optimizer::kLarsYou2017);
  const float sign = s.sign, nwd = s.norm_weight_decay;
  const int64_t end = min(c.start + kOptimChunkElems, e.numel);
  const PT* p = reinterpret_cast<const PT*>(e.param);
  const PT* g = reinterpret_cast<const PT*>(e.grad);
  float sp = 0.0f, sd = 0.0f;
  for (int64_t i = c.start + threadIdx.x; i < end; i += blockDim.x) {
    const float pi = ld(p, i), d = lars_norm_term(pi, ld(g, i), sign, nwd);
    sp += pi * pi;
    sd += d * d;
  }
  const double tp = block_sum(sp, shared), td = block_sum(sd, shared);
  if (threadIdx.x == 0) partials[2 * blockIdx.x] = tp, partials[2 * blockIdx.x + 1] = td;
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

cudaError_t launch_optim_ema(Optimizer optimizer, const OptimEntry* entries,
                             const TensorChunk* chunks, int64_t num_chunks, FloatTag param_tag,
                             FloatTag teacher_tag, const HyperArgs& hyper, double* partials,
                             cudaStream_t stream) {
  if (num_chunks == 0) return cudaSuccess;
  if (num_chunks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const auto blocks = static_cast<unsigned>(num_chunks);
  return with_types(param_tag, teacher_tag, [&](auto* ptag, auto* ttag) {
    using PT = std::remove_pointer_t<decltype(ptag)>;
    using TT = std::remove_pointer_t<decltype(ttag)>;
    if (optimizer == Optimizer::kAdamW) {
      EMAN_FUSED_LAUNCH(blocks, kThreads, 0, stream, adamw_kernel<PT, TT>)(entries, chunks, hyper);
      return cudaGetLastError();
    }
    if (is_lars(optimizer)) {
      EMAN_FUSED_LAUNCH(blocks, kThreads, 0, stream, lars_norms_kernel<PT>)(
          entries, chunks, hyper, optimizer, partials);
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    EMAN_FUSED_LAUNCH(blocks, kThreads, 0, stream, momentum_kernel<PT, TT>)(
        entries, chunks, hyper, optimizer, partials);
    return cudaGetLastError();
  });
}

}  // namespace eman_fused
