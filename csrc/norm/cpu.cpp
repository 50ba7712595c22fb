// CPU backend of eman_norm: one pass over x for the forward; one fused pass for the backward
// (grad_x, grad_residual and the per-channel sums for grad_weight / grad_bias together).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <cmath>
#include <cstring>
#include <vector>

#include "norm/geometry.h"
#include "common/convert.h"
#include "common/isa.h"

namespace eman_fused {
namespace {

constexpr int64_t kGrainElems = 32768;

// scale = w * rsqrt(var + eps), shift = b - mean * scale, in the math type Acc.
template <typename Acc, typename S>
void channel_affine(const at::Tensor& mean, const at::Tensor& var,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                    double eps, std::vector<Acc>& scale, std::vector<Acc>& shift,
                    std::vector<Acc>& invstd) {
  const int64_t c = mean.numel();
  // [C] vectors may be strided views (e.g. stats[::2]): read them contiguous.
  const at::Tensor mc = mean.contiguous(), vc = var.contiguous();
  const at::Tensor wc = weight ? weight->contiguous() : at::Tensor();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  const S* m = mc.const_data_ptr<S>();
  const S* v = vc.const_data_ptr<S>();
  const S* w = wc.defined() ? wc.const_data_ptr<S>() : nullptr;
  const S* b = bc.defined() ? bc.const_data_ptr<S>() : nullptr;
  scale.resize(c), shift.resize(c), invstd.resize(c);
  for (int64_t i = 0; i < c; ++i) {
    invstd[i] = Acc(1) / std::sqrt(static_cast<Acc>(v[i]) + static_cast<Acc>(eps));
    scale[i] = (w ? static_cast<Acc>(w[i]) : Acc(1)) * invstd[i];
    shift[i] = (b ? static_cast<Acc>(b[i]) : Acc(0)) - static_cast<Acc>(m[i]) * scale[i];
  }
}

#define EMAN_FUSED_LOOPS "norm/cpu_loops.inc"
#include "common/isa_loops.h"

at::Tensor eman_norm_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, double eps,
                         const std::optional<at::Tensor>& residual, bool relu) {
  const NormGeometry g = check_eman_norm(x, mean, var, weight, bias, eps, residual);
  const at::Tensor xc = x.contiguous(g.format);
  const at::Tensor rc = residual ? residual->contiguous(g.format) : at::Tensor();
  at::Tensor y = at::empty_like(xc, at::TensorOptions(), g.format);
  if (y.numel() == 0) return y;  // the loops size their work by C or inner: C = 0 divides by 0
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "eman_norm_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    std::vector<Acc> scale, shift, invstd;
    if (x.scalar_type() == at::kDouble) {
      channel_affine<Acc, double>(mean, var, weight, bias, eps, scale, shift, invstd);
    } else {
      channel_affine<Acc, float>(mean, var, weight, bias, eps, scale, shift, invstd);
    }
    EMAN_FUSED_ISA_FN(forward_kernel<scalar_t, Acc>)(xc.const_data_ptr<scalar_t>(),
                       rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr,
                       y.mutable_data_ptr<scalar_t>(), g, scale.data(), shift.data(), relu);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eman_norm_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& out,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    double eps, bool relu, std::array<bool, 4> output_mask) {
  const NormGeometry g = check_eman_norm_backward(grad, x, out, mean, var, weight, eps, relu);
  const at::Tensor xc = x.contiguous(g.format);
  const at::Tensor gc = grad.contiguous(g.format);
  const at::Tensor oc = relu ? out->contiguous(g.format) : at::Tensor();
  at::Tensor gx = output_mask[0] ? at::empty_like(xc, at::TensorOptions(), g.format) : at::Tensor();
  at::Tensor gr = output_mask[1] ? at::empty_like(xc, at::TensorOptions(), g.format) : at::Tensor();
  const bool need_sums = output_mask[2] || output_mask[3];
  std::vector<double> sums(need_sums ? 2 * g.channels : 0, 0.0);
  at::Tensor gw, gb;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "eman_norm_bwd_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    std::vector<Acc> scale, shift, invstd, mean_acc(g.channels);
    const at::Tensor mc = mean.contiguous();  // once: a strided view would copy per read
    if (x.scalar_type() == at::kDouble) {
      channel_affine<Acc, double>(mean, var, weight, std::nullopt, eps, scale, shift, invstd);
      for (int64_t c = 0; c < g.channels; ++c) mean_acc[c] = mc.const_data_ptr<double>()[c];
    } else {
      channel_affine<Acc, float>(mean, var, weight, std::nullopt, eps, scale, shift, invstd);
      for (int64_t c = 0; c < g.channels; ++c) mean_acc[c] = mc.const_data_ptr<float>()[c];
    }
    EMAN_FUSED_ISA_FN(backward_dispatch<scalar_t, Acc>)(relu, gx.defined(), gr.defined(), need_sums,
                                     gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                                     relu ? oc.const_data_ptr<scalar_t>() : nullptr,
                                     gx.defined() ? gx.mutable_data_ptr<scalar_t>() : nullptr,
                                     gr.defined() ? gr.mutable_data_ptr<scalar_t>() : nullptr, g,
                                     scale.data(), mean_acc.data(), need_sums ? sums.data() : nullptr);
    const auto stats_options = mean.options();
    if (output_mask[2]) {
      gw = at::empty({g.channels}, stats_options);
      for (int64_t c = 0; c < g.channels; ++c) {
        const double v = sums[g.channels + c] * static_cast<double>(invstd[c]);
        if (x.scalar_type() == at::kDouble) gw.mutable_data_ptr<double>()[c] = v;
        else gw.mutable_data_ptr<float>()[c] = static_cast<float>(v);
      }
    }
    if (output_mask[3]) {
      gb = at::empty({g.channels}, stats_options);
      for (int64_t c = 0; c < g.channels; ++c) {
        if (x.scalar_type() == at::kDouble) gb.mutable_data_ptr<double>()[c] = sums[c];
        else gb.mutable_data_ptr<float>()[c] = static_cast<float>(sums[c]);
      }
    }
  });
  return {gx, gr, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CPU, m) {
  m.impl("eman_norm", &eman_norm_cpu);
  m.impl("eman_norm_backward", &eman_norm_backward_cpu);
}

}  // namespace eman_fused
