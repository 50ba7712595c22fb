// eman_norm on CUDA: validation and geometry from norm/geometry.cpp, launches from norm/cuda.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "common/dtype_of.h"
#include "norm/cuda.h"
#include "norm/geometry.h"

namespace eman_fused {
namespace {

// check_eman_norm admits only the four floating dtypes.
FloatTag norm_dtype(at::ScalarType t) { return *float_tag_of(t); }

// A [C] vector read contiguous (it may be a strided view), or undefined when absent.
at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return t ? t->contiguous() : at::Tensor();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

at::Tensor eman_norm_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                          const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps,
                          const std::optional<at::Tensor>& residual, bool relu) {
  const NormGeometry g = check_eman_norm(x, mean, var, weight, bias, eps, residual);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(g.format);
  const at::Tensor rc = residual ? residual->contiguous(g.format) : at::Tensor();
  const at::Tensor m = mean.contiguous(), v = var.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight), b = contiguous_or_undefined(bias);
  at::Tensor y = at::empty_like(xc, at::TensorOptions(), g.format);
  NormForwardArgs a{xc.const_data_ptr(), rc.defined() ? rc.const_data_ptr() : nullptr,
                    y.mutable_data_ptr(), m.const_data_ptr(), v.const_data_ptr(), ptr_or_null(w),
                    ptr_or_null(b), eps, relu, norm_dtype(x.scalar_type()),
                    {g.outer, g.channels, g.inner}};
  C10_CUDA_CHECK(launch_eman_norm_forward(a, c10::cuda::getCurrentCUDAStream().stream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eman_norm_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& out,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    double eps, bool relu, std::array<bool, 4> output_mask) {
  const NormGeometry g = check_eman_norm_backward(grad, x, out, mean, var, weight, eps, relu);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous(g.format), gc = grad.contiguous(g.format);
  const at::Tensor oc = relu ? out->contiguous(g.format) : at::Tensor();
  const at::Tensor m = mean.contiguous(), v = var.contiguous();
  const at::Tensor w = contiguous_or_undefined(weight);
  at::Tensor gx = output_mask[0] ? at::empty_like(xc, at::TensorOptions(), g.format) : at::Tensor();
  at::Tensor gr = output_mask[1] ? at::empty_like(xc, at::TensorOptions(), g.format) : at::Tensor();
  at::Tensor gw = output_mask[2] ? at::empty({g.channels}, m.options()) : at::Tensor();
  at::Tensor gb = output_mask[3] ? at::empty({g.channels}, m.options()) : at::Tensor();
  const NormShape shape{g.outer, g.channels, g.inner};
  at::Tensor workspace = (gw.defined() || gb.defined())
                             ? at::empty({norm_backward_workspace(shape)}, m.options())
                             : at::Tensor();
  NormBackwardArgs a{gc.const_data_ptr(), xc.const_data_ptr(),
                     relu ? oc.const_data_ptr() : nullptr,
                     gx.defined() ? gx.mutable_data_ptr() : nullptr,
                     gr.defined() ? gr.mutable_data_ptr() : nullptr, m.const_data_ptr(),
                     v.const_data_ptr(), ptr_or_null(w), eps, norm_dtype(x.scalar_type()), shape,
                     gw.defined() ? gw.mutable_data_ptr() : nullptr,
                     gb.defined() ? gb.mutable_data_ptr() : nullptr,
                     workspace.defined() ? workspace.mutable_data_ptr() : nullptr};
  C10_CUDA_CHECK(launch_eman_norm_backward(a, c10::cuda::getCurrentCUDAStream().stream()));
  return {gx, gr, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CUDA, m) {
  m.impl("eman_norm", &eman_norm_cuda);
  m.impl("eman_norm_backward", &eman_norm_backward_cuda);
}

}  // namespace eman_fused
