// eman_norm on CUDA. Memory order [outer, C, inner]:
// - inner > 1 (contiguous): block (row = o*C + c, segment) walks one row segment; the channel's
//   scale/shift live in registers; the backward reduces the segment in the block.
// - inner == 1 (channels_last, N,C): a thread owns one channel and loops over rows (a warp
//   reads 32 consecutive channels: coalesced); sums stay in registers.
// Backward partial sums go to a workspace; a second kernel adds them in a fixed order.
// Scalar loads; the launch shapes have not been tuned on a GPU (README says what was measured).
#include <cstdint>

#include "common/convert.cuh"
#include "common/launch.cuh"
#include "norm/cuda.h"

namespace eman_fused {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSegment = 4096;   // elements of a row per block (inner > 1)
constexpr int64_t kRowGroups = 4096;  // blocks along rows (inner == 1)

template <typename S, typename Acc>
__device__ __forceinline__ void channel_params(const S* mean, const S* var, const S* w, const S* b,
                                               double eps, int64_t c, Acc& scale, Acc& shift,
                                               Acc& mu) {
  const Acc invstd = Acc(1) / sqrt(static_cast<Acc>(var[c]) + static_cast<Acc>(eps));
  scale = w ? static_cast<Acc>(w[c]) * invstd : invstd;
  mu = static_cast<Acc>(mean[c]);
  shift = (b ? static_cast<Acc>(b[c]) : Acc(0)) - mu * scale;
}

template <typename Acc>
__device__ __forceinline__ Acc relu_keep_nan(Acc v) {
  return v < Acc(0) ? Acc(0) : v;  // as torch.relu: NaN and -0.0 pass through
}

template <typename T, typename S, typename Acc>
__global__ void __launch_bounds__(kThreads)
    forward_rows(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y,
                 const S* mean, const S* var, const S* w, const S* b, double eps, int64_t C,
                 int64_t inner, bool relu) {
  const int64_t row = blockIdx.x;
  Acc scale, shift, mu;
  channel_params(mean, var, w, b, eps, row % C, scale, shift, mu);
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kSegment;
  const int64_t end = min(inner, begin + kSegment);
  const int64_t base = row * inner;
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
    Acc v = to_acc<Acc>(x[base + k]) * scale + shift;
    if (r) v += to_acc<Acc>(r[base + k]);
    if (relu) v = relu_keep_nan(v);
    y[base + k] = from_acc<T>(v);
  }
}

template <typename T, typename S, typename Acc>
__global__ void __launch_bounds__(kThreads)
    forward_channels(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y,
                     const S* mean, const S* var, const S* w, const S* b, double eps,
                     int64_t outer, int64_t C, bool relu) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Acc scale, shift, mu;
  channel_params(mean, var, w, b, eps, c, scale, shift, mu);
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    const int64_t i = o * C + c;
    Acc v = to_acc<Acc>(x[i]) * scale + shift;
    if (r) v += to_acc<Acc>(r[i]);
    if (relu) v = relu_keep_nan(v);
    y[i] = from_acc<T>(v);
  }
}

// gm = grad * (out > 0 | no relu); returns it after writing grad_x / grad_residual.
template <typename T, typename Acc>
__device__ __forceinline__ Acc backward_element(const T* grad, const T* out, T* gx, T* gr,
                                                int64_t i, Acc scale) {
  Acc gm = to_acc<Acc>(grad[i]);
  if (out && !(to_acc<Acc>(out[i]) > Acc(0))) gm = Acc(0);
  if (gx) gx[i] = from_acc<T>(gm * scale);
  if (gr) gr[i] = from_acc<T>(gm);
  return gm;
}

template <typename Acc>
__device__ Acc block_sum(Acc v, Acc* shared) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // shared is reused between calls
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : Acc(0);
  if (warp == 0) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;  // valid in thread 0
}

template <typename T, typename S, typename Acc>
__global__ void __launch_bounds__(kThreads)
    backward_rows(const T* __restrict__ grad, const T* __restrict__ x, const T* __restrict__ out,
                  T* __restrict__ gx, T* __restrict__ gr, const S* mean, const S* var, const S* w,
                  double eps, int64_t C, int64_t inner, Acc* __restrict__ partial) {
  __shared__ Acc shared[kThreads / 32];
  const int64_t row = blockIdx.x;
  Acc scale, shift, mu;
  channel_params<S, Acc>(mean, var, w, nullptr, eps, row % C, scale, shift, mu);
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kSegment;
  const int64_t end = min(inner, begin + kSegment);
  const int64_t base = row * inner;
  Acc s0 = 0, s1 = 0;
  for (int64_t k = begin + threadIdx.x; k < end; k += blockDim.x) {
    const Acc gm = backward_element(grad, out, gx, gr, base + k, scale);
    s0 += gm;
    s1 += gm * (to_acc<Acc>(x[base + k]) - mu);
  }
  if (partial == nullptr) return;
  s0 = block_sum(s0, shared);
  s1 = block_sum(s1, shared);
  if (threadIdx.x == 0) {
    Acc* p = partial + 2 * (row * gridDim.y + blockIdx.y);
    p[0] = s0, p[1] = s1;
  }
}

template <typename T, typename S, typename Acc>
__global__ void __launch_bounds__(kThreads)
    backward_channels(const T* __restrict__ grad, const T* __restrict__ x,
                      const T* __restrict__ out, T* __restrict__ gx, T* __restrict__ gr,
                      const S* mean, const S* var, const S* w, double eps, int64_t outer,
                      int64_t C, Acc* __restrict__ partial) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  Acc scale, shift, mu;
  channel_params<S, Acc>(mean, var, w, nullptr, eps, c, scale, shift, mu);
  Acc s0 = 0, s1 = 0;
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    const int64_t i = o * C + c;
    const Acc gm = backward_element(grad, out, gx, gr, i, scale);
    s0 += gm;
    s1 += gm * (to_acc<Acc>(x[i]) - mu);
  }
  if (partial == nullptr) return;
  Acc* p = partial + 2 * (static_cast<int64_t>(blockIdx.y) * C + c);
  p[0] = s0, p[1] = s1;
}

// grad_bias[c] = sum of gm, grad_weight[c] = rsqrt(var + eps) * sum of gm * (x - mean),
// partials added in a fixed order (double accumulation): deterministic.
template <typename S, typename Acc>
__global__ void finalize_sums(const Acc* __restrict__ partial, const S* var, double eps,
                              int64_t outer, int64_t C, int64_t groups, bool rows_layout,
                              S* gw, S* gb) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s0 = 0, s1 = 0;
  if (rows_layout) {  // partial[(o*C + c) * groups + g]
    for (int64_t o = 0; o < outer; ++o) {
      for (int64_t g = 0; g < groups; ++g) {
        const Acc* p = partial + 2 * ((o * C + c) * groups + g);
        s0 += p[0], s1 += p[1];
      }
    }
  } else {  // partial[g * C + c]
    for (int64_t g = 0; g < groups; ++g) {
      const Acc* p = partial + 2 * (g * C + c);
      s0 += p[0], s1 += p[1];
    }
  }
  if (gb) gb[c] = static_cast<S>(s0);
  if (gw) gw[c] = static_cast<S>(s1 / sqrt(static_cast<double>(var[c]) + eps));
}

int64_t row_groups(const NormShape& s) { return (s.inner + kSegment - 1) / kSegment; }
int64_t channel_row_groups(const NormShape& s) { return s.outer < kRowGroups ? s.outer : kRowGroups; }

template <typename F>
cudaError_t with_types(FloatTag dtype, F&& f) {
  switch (dtype) {
    case kF32: f(float{}, float{}); break;
    case kBF16: f(__nv_bfloat16{}, float{}); break;
    case kF16: f(__half{}, float{}); break;
    case kF64: f(double{}, double{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

int64_t norm_backward_workspace(const NormShape& s) {
  if (s.inner > 1) return 2 * s.outer * s.channels * row_groups(s);
  return 2 * s.channels * channel_row_groups(s);
}

cudaError_t launch_eman_norm_forward(const NormForwardArgs& a, cudaStream_t stream) {
  const NormShape& s = a.shape;
  if (s.outer * s.channels * s.inner == 0) return cudaSuccess;
  if (s.inner > 1 && (s.outer * s.channels > INT32_MAX || row_groups(s) > 65535)) {
    return cudaErrorInvalidConfiguration;
  }
  return with_types(a.dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    using Acc = decltype(acc);
    using S = Acc;  // float statistics, double with double activations
    const auto* x = static_cast<const T*>(a.x);
    const auto* r = static_cast<const T*>(a.residual);
    auto* y = static_cast<T*>(a.y);
    const auto *mean = static_cast<const S*>(a.mean), *var = static_cast<const S*>(a.var);
    const auto *w = static_cast<const S*>(a.weight), *b = static_cast<const S*>(a.bias);
    if (s.inner > 1) {
      const dim3 grid(static_cast<unsigned>(s.outer * s.channels), static_cast<unsigned>(row_groups(s)));
      EMAN_FUSED_LAUNCH(grid, kThreads, 0, stream, forward_rows<T, S, Acc>)(
          x, r, y, mean, var, w, b, a.eps, s.channels, s.inner, a.relu);
    } else {
      const dim3 grid(static_cast<unsigned>((s.channels + kThreads - 1) / kThreads),
                      static_cast<unsigned>(channel_row_groups(s)));
      EMAN_FUSED_LAUNCH(grid, kThreads, 0, stream, forward_channels<T, S, Acc>)(
          x, r, y, mean, var, w, b, a.eps, s.outer, s.channels, a.relu);
    }
  });
}

cudaError_t launch_eman_norm_backward(const NormBackwardArgs& a, cudaStream_t stream) {
  const NormShape& s = a.shape;
  if (s.inner > 1 && (s.outer * s.channels > INT32_MAX || row_groups(s) > 65535)) {
    return cudaErrorInvalidConfiguration;
  }
  const bool sums = a.grad_weight || a.grad_bias;
  return with_types(a.dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    using Acc = decltype(acc);
    using S = Acc;
    const auto *g = static_cast<const T*>(a.grad), *x = static_cast<const T*>(a.x);
    const auto* out = static_cast<const T*>(a.out);
    auto *gx = static_cast<T*>(a.grad_x), *gr = static_cast<T*>(a.grad_residual);
    const auto *mean = static_cast<const S*>(a.mean), *var = static_cast<const S*>(a.var);
    const auto* w = static_cast<const S*>(a.weight);
    auto* partial = sums ? static_cast<Acc*>(a.workspace) : nullptr;
    const bool rows = s.inner > 1;
    const int64_t groups = rows ? row_groups(s) : channel_row_groups(s);
    if (s.outer * s.channels * s.inner > 0) {
      if (rows) {
        const dim3 grid(static_cast<unsigned>(s.outer * s.channels), static_cast<unsigned>(groups));
        EMAN_FUSED_LAUNCH(grid, kThreads, 0, stream, backward_rows<T, S, Acc>)(
            g, x, out, gx, gr, mean, var, w, a.eps, s.channels, s.inner, partial);
      } else {
        const dim3 grid(static_cast<unsigned>((s.channels + kThreads - 1) / kThreads),
                        static_cast<unsigned>(groups));
        EMAN_FUSED_LAUNCH(grid, kThreads, 0, stream, backward_channels<T, S, Acc>)(
            g, x, out, gx, gr, mean, var, w, a.eps, s.outer, s.channels, partial);
      }
    }
    if (sums && s.channels > 0) {  // C = 0: no sum to write, and a 0-block grid is an error
      const unsigned blocks = static_cast<unsigned>((s.channels + kThreads - 1) / kThreads);
      EMAN_FUSED_LAUNCH(blocks, kThreads, 0, stream, finalize_sums<S, Acc>)(
          partial, var, a.eps, s.outer, s.channels, s.outer * s.channels * s.inner > 0 ? groups : 0,
          rows, static_cast<S*>(a.grad_weight), static_cast<S*>(a.grad_bias));
    }
  });
}

}  // namespace eman_fused
