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
#include <cmath>
#include <vector>

#include "../norm.h"

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
  const S* m = mean.const_data_ptr<S>();
  const S* v = var.const_data_ptr<S>();
  const S* w = weight ? weight->const_data_ptr<S>() : nullptr;
  const S* b = bias ? bias->const_data_ptr<S>() : nullptr;
  scale.resize(c), shift.resize(c), invstd.resize(c);
  for (int64_t i = 0; i < c; ++i) {
    invstd[i] = Acc(1) / std::sqrt(static_cast<Acc>(v[i]) + static_cast<Acc>(eps));
    scale[i] = (w ? static_cast<Acc>(w[i]) : Acc(1)) * invstd[i];
    shift[i] = (b ? static_cast<Acc>(b[i]) : Acc(0)) - static_cast<Acc>(m[i]) * scale[i];
  }
}

template <typename T, typename Acc>
void forward_kernel(const T* x, const T* r, T* y, const NormGeometry& g, const Acc* scale,
                    const Acc* shift, bool relu) {
  // One row: n elements with per-element (inner == 1) or constant (inner > 1) channel params.
  auto row = [&](int64_t base, int64_t n, const Acc* sc, const Acc* sh, int64_t step) {
    for (int64_t k = 0; k < n; ++k) {
      Acc v = static_cast<Acc>(x[base + k]) * sc[k * step] + sh[k * step];
      if (r) v += static_cast<Acc>(r[base + k]);
      if (relu) v = v > Acc(0) ? v : (v == v ? Acc(0) : v);  // ReLU, NaN kept as torch does
      y[base + k] = static_cast<T>(v);
    }
  };
  if (g.inner > 1) {
    at::parallel_for(0, g.outer * g.channels, std::max<int64_t>(1, kGrainElems / g.inner),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t rw = begin; rw < end; ++rw) {
                         const int64_t c = rw % g.channels;
                         row(rw * g.inner, g.inner, scale + c, shift + c, 0);
                       }
                     });
  } else {
    at::parallel_for(0, g.outer, std::max<int64_t>(1, kGrainElems / g.channels),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t o = begin; o < end; ++o) row(o * g.channels, g.channels, scale, shift, 1);
                     });
  }
}

// One fused pass. gm = grad * (relu ? out > 0 : 1); gx = gm * scale[c]; gr = gm;
// sums[c] += gm, sums[C + c] += gm * (x - mean[c])   (accumulated in double).
template <typename T, typename Acc>
void backward_kernel(const T* grad, const T* x, const T* out, T* gx, T* gr, const NormGeometry& g,
                     const Acc* scale, const Acc* mean, double* sums) {
  const int64_t C = g.channels;
  auto row = [&](int64_t base, int64_t n, int64_t c0, int64_t step, double* acc) {
    for (int64_t k = 0; k < n; ++k) {
      const int64_t c = c0 + k * step;
      const Acc gm = (out && !(static_cast<Acc>(out[base + k]) > Acc(0))) ? Acc(0)
                                                                         : static_cast<Acc>(grad[base + k]);
      if (gx) gx[base + k] = static_cast<T>(gm * scale[c]);
      if (gr) gr[base + k] = static_cast<T>(gm);
      if (acc) {
        acc[c] += gm;
        acc[C + c] += static_cast<double>(gm) * (static_cast<double>(x[base + k]) - mean[c]);
      }
    }
  };
  if (g.inner > 1) {  // a thread owns whole channels: no partial sums to merge
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t o = 0; o < g.outer; ++o) row((o * C + c) * g.inner, g.inner, c, 0, sums);
      }
    });
    return;
  }
  // channels_last: each part sums its rows into its own vector; parts are merged in order,
  // so a given thread count always gives the same bits.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), g.outer));
  std::vector<double> partial(sums ? parts * 2 * C : 0, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      double* acc = sums ? partial.data() + p * 2 * C : nullptr;
      for (int64_t o = g.outer * p / parts; o < g.outer * (p + 1) / parts; ++o) row(o * C, C, 0, 1, acc);
    }
  });
  for (int64_t p = 0; sums && p < parts; ++p) {
    for (int64_t i = 0; i < 2 * C; ++i) sums[i] += partial[p * 2 * C + i];
  }
}

at::Tensor eman_norm_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                         const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, double eps,
                         const std::optional<at::Tensor>& residual, bool relu) {
  const NormGeometry g = check_eman_norm(x, mean, var, weight, bias, eps, residual);
  const at::Tensor xc = x.contiguous(g.format);
  const at::Tensor rc = residual ? residual->contiguous(g.format) : at::Tensor();
  at::Tensor y = at::empty_like(xc, at::TensorOptions(), g.format);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "eman_norm_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    std::vector<Acc> scale, shift, invstd;
    if (x.scalar_type() == at::kDouble) {
      channel_affine<Acc, double>(mean, var, weight, bias, eps, scale, shift, invstd);
    } else {
      channel_affine<Acc, float>(mean, var, weight, bias, eps, scale, shift, invstd);
    }
    forward_kernel<scalar_t, Acc>(xc.const_data_ptr<scalar_t>(),
                                  rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr,
                                  y.mutable_data_ptr<scalar_t>(), g, scale.data(), shift.data(), relu);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> eman_norm_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const std::optional<at::Tensor>& out,
    const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
    double eps, bool relu, std::array<bool, 4> output_mask) {
  const NormGeometry g = check_eman_norm(x, mean, var, weight, std::nullopt, eps, std::nullopt);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
                    "eman_norm_backward: grad must match x (", x.scalar_type(), x.sizes(),
                    "), got ", grad.scalar_type(), grad.sizes());
  TORCH_CHECK_VALUE(!relu || (out && out->sizes() == x.sizes()),
                    "eman_norm_backward: relu=True needs the forward output `out` of x's shape");
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
    if (x.scalar_type() == at::kDouble) {
      channel_affine<Acc, double>(mean, var, weight, std::nullopt, eps, scale, shift, invstd);
      for (int64_t c = 0; c < g.channels; ++c) mean_acc[c] = mean.const_data_ptr<double>()[c];
    } else {
      channel_affine<Acc, float>(mean, var, weight, std::nullopt, eps, scale, shift, invstd);
      for (int64_t c = 0; c < g.channels; ++c) mean_acc[c] = mean.const_data_ptr<float>()[c];
    }
    backward_kernel<scalar_t, Acc>(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
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
