// EMAN normalization: validation and geometry shared by every backend.
//   y = act(x * scale[c] + shift[c] + residual),  scale = w * rsqrt(var + eps),
//   shift = b - mean * scale  (per channel, in the statistics' precision)
// A dense input of either memory format is walked as [outer, C, inner] in memory order:
// contiguous N,C,*S -> outer = N, inner = prod(S); channels_last -> outer = N*prod(S), inner = 1.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace eman_fused {

struct NormGeometry {
  int64_t outer = 0, channels = 0, inner = 0;
  at::MemoryFormat format = at::MemoryFormat::Contiguous;
};

// Checks every argument (before anything is allocated or written) and returns the geometry.
NormGeometry check_eman_norm(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                             const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, double eps,
                             const std::optional<at::Tensor>& residual);

// The backward's arguments: those of the forward, grad matching x, and the forward output
// (for the ReLU mask) when relu is set.
NormGeometry check_eman_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                      const std::optional<at::Tensor>& out, const at::Tensor& mean,
                                      const at::Tensor& var,
                                      const std::optional<at::Tensor>& weight, double eps,
                                      bool relu);

// x (and a tensor that must match it, e.g. residual or grad) in the memory format the
// kernels walk: x's own when it is contiguous or channels_last(_3d), else contiguous.
at::MemoryFormat norm_memory_format(const at::Tensor& x);

}  // namespace eman_fused
