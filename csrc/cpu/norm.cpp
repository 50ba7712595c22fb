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

#include "../norm.h"

namespace eman_fused {
namespace {

constexpr int64_t kGrainElems = 32768;

// Element <-> math type. bfloat16 by its bits (round to nearest even, NaN kept quiet) with no
// branch, so the loops vectorize; c10's own conversion branches on NaN.
template <typename Acc, typename T>
inline Acc load(T v) { return static_cast<Acc>(v); }
template <>
inline float load<float, c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename T, typename Acc>
inline T store(Acc v) { return static_cast<T>(v); }
template <>
inline c10::BFloat16 store<c10::BFloat16, float>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

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

template <typename T, typename Acc>
void forward_kernel(const T* x, const T* r, T* y, const NormGeometry& g, const Acc* scale,
                    const Acc* shift, bool relu) {
  // One row: n elements with per-element (inner == 1) or constant (inner > 1) channel params.
  auto row = [&](int64_t base, int64_t n, const Acc* sc, const Acc* sh, int64_t step) {
    const T* __restrict__ xs = x + base;
    const T* __restrict__ rs = r ? r + base : nullptr;
    T* __restrict__ ys = y + base;
    for (int64_t k = 0; k < n; ++k) {
      Acc v = load<Acc>(xs[k]) * sc[k * step] + sh[k * step];
      if (rs) v += load<Acc>(rs[k]);
      if (relu) v = v > Acc(0) ? v : (v == v ? Acc(0) : v);  // ReLU, NaN kept as torch does
      ys[k] = store<T>(v);
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
// sums[c] += gm, sums[C + c] += gm * (x - mean[c]). Specialized per flag and with restrict
// pointers so the loops vectorize; partial sums stay in registers (a row of one channel) or
// in a float block buffer (channels_last), and are added to the double totals per row/block.
template <typename T, typename Acc, bool Relu, bool NeedGx, bool NeedGr, bool NeedSums>
void backward_kernel(const T* grad, const T* x, const T* out, T* gx, T* gr, const NormGeometry& g,
                     const Acc* scale, const Acc* mean, double* sums) {
  const int64_t C = g.channels;
  if (g.inner > 1) {  // a thread owns whole channels: no partial sums to merge
    at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const Acc sc = scale[c], mu = mean[c];
        double s0 = 0, s1 = 0;
        for (int64_t o = 0; o < g.outer; ++o) {
          const int64_t base = (o * C + c) * g.inner;
          const T* __restrict__ gs = grad + base;
          const T* __restrict__ xs = x + base;
          const T* __restrict__ os = Relu ? out + base : nullptr;
          T* __restrict__ gxs = NeedGx ? gx + base : nullptr;
          T* __restrict__ grs = NeedGr ? gr + base : nullptr;
          Acc r0 = 0, r1 = 0;
          for (int64_t k = 0; k < g.inner; ++k) {
            Acc gm = load<Acc>(gs[k]);
            if constexpr (Relu) gm = load<Acc>(os[k]) > Acc(0) ? gm : Acc(0);
            if constexpr (NeedGx) gxs[k] = store<T>(gm * sc);
            if constexpr (NeedGr) grs[k] = store<T>(gm);
            if constexpr (NeedSums) {
              r0 += gm;
              r1 += gm * (load<Acc>(xs[k]) - mu);
            }
          }
          s0 += r0, s1 += r1;
        }
        if constexpr (NeedSums) sums[c] += s0, sums[C + c] += s1;
      }
    });
    return;
  }
  // channels_last: each part sums its rows into its own vector; parts are merged in order,
  // so a given thread count always gives the same bits.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), g.outer));
  std::vector<double> partial(NeedSums ? parts * 2 * C : 0, 0.0);
  constexpr int64_t kBlockRows = 64;  // float partials over at most this many rows
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> block(NeedSums ? 2 * C : 0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t first = g.outer * p / parts, last = g.outer * (p + 1) / parts;
      for (int64_t o0 = first; o0 < last; o0 += kBlockRows) {
        Acc* __restrict__ b0 = block.data();
        Acc* __restrict__ b1 = block.data() + C;
        std::fill(block.begin(), block.end(), Acc(0));
        for (int64_t o = o0; o < std::min(last, o0 + kBlockRows); ++o) {
          const int64_t base = o * C;
          const T* __restrict__ gs = grad + base;
          const T* __restrict__ xs = x + base;
          const T* __restrict__ os = Relu ? out + base : nullptr;
          T* __restrict__ gxs = NeedGx ? gx + base : nullptr;
          T* __restrict__ grs = NeedGr ? gr + base : nullptr;
          for (int64_t c = 0; c < C; ++c) {
            Acc gm = load<Acc>(gs[c]);
            if constexpr (Relu) gm = load<Acc>(os[c]) > Acc(0) ? gm : Acc(0);
            if constexpr (NeedGx) gxs[c] = store<T>(gm * scale[c]);
            if constexpr (NeedGr) grs[c] = store<T>(gm);
            if constexpr (NeedSums) {
              b0[c] += gm;
              b1[c] += gm * (load<Acc>(xs[c]) - mean[c]);
            }
          }
        }
        if constexpr (NeedSums) {
          double* acc = partial.data() + p * 2 * C;
          for (int64_t i = 0; i < 2 * C; ++i) acc[i] += block[i];
        }
      }
    }
  });
  for (int64_t p = 0; NeedSums && p < parts; ++p) {
    for (int64_t i = 0; i < 2 * C; ++i) sums[i] += partial[p * 2 * C + i];
  }
}

// Picks the specialization of backward_kernel for the run-time flags.
template <typename T, typename Acc>
void backward_dispatch(bool relu, bool need_gx, bool need_gr, bool need_sums, const T* grad,
                       const T* x, const T* out, T* gx, T* gr, const NormGeometry& g,
                       const Acc* scale, const Acc* mean, double* sums) {
  auto pick = [&](auto relu_c, auto gx_c, auto gr_c, auto sums_c) {
    backward_kernel<T, Acc, decltype(relu_c)::value, decltype(gx_c)::value, decltype(gr_c)::value,
                    decltype(sums_c)::value>(grad, x, out, gx, gr, g, scale, mean, sums);
  };
  auto b = [](bool v, auto&& next) {
    if (v) next(std::true_type{}); else next(std::false_type{});
  };
  b(relu, [&](auto r) { b(need_gx, [&](auto a) { b(need_gr, [&](auto c) { b(need_sums, [&](auto d) {
    pick(r, a, c, d); }); }); }); });
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
    if (x.scalar_type() == at::kDouble) {
      channel_affine<Acc, double>(mean, var, weight, std::nullopt, eps, scale, shift, invstd);
      for (int64_t c = 0; c < g.channels; ++c) mean_acc[c] = mean.contiguous().const_data_ptr<double>()[c];
    } else {
      channel_affine<Acc, float>(mean, var, weight, std::nullopt, eps, scale, shift, invstd);
      for (int64_t c = 0; c < g.channels; ++c) mean_acc[c] = mean.contiguous().const_data_ptr<float>()[c];
    }
    backward_dispatch<scalar_t, Acc>(relu, gx.defined(), gr.defined(), need_sums,
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
