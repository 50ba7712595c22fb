// eman_norm's schemas and its validation op for the Triton backend. CPU and CUDA kernels:
// norm/cpu.cpp, norm/cuda_host.cpp; fake kernels and autograd: eman_fused/ops/norm.py.
#include <torch/library.h>

#include "norm/geometry.h"

namespace eman_fused {
namespace {

void eman_norm_check(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                     double eps, const std::optional<at::Tensor>& residual) {
  check_eman_norm(x, mean, var, weight, bias, eps, residual);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(eman_fused, m) {
  // EMAN normalization with running statistics: y = act(x*scale[c] + shift[c] + residual),
  // scale = weight * rsqrt(running_var + eps), shift = bias - running_mean * scale.
  m.def("eman_norm(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, "
        "Tensor? bias, float eps, Tensor? residual, bool relu) -> Tensor");
  // Frozen-statistics gradients in one pass: (grad_x, grad_residual, grad_weight, grad_bias);
  // `out` (the forward's output) gives the ReLU mask. Masked-out results are undefined.
  m.def("eman_norm_backward(Tensor grad, Tensor x, Tensor? out, Tensor running_mean, "
        "Tensor running_var, Tensor? weight, float eps, bool relu, bool[4] output_mask) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  // eman_norm's validation, for backends written outside C++ (Triton).
  m.def("_eman_norm_check(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, "
        "Tensor? bias, float eps, Tensor? residual) -> ()");
  m.impl("_eman_norm_check", c10::DispatchKey::CompositeExplicitAutograd, &eman_norm_check);
}

}  // namespace eman_fused
