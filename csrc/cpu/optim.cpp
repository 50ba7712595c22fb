// Fused optimizer steps on the CPU: SGD and AdamW update params and optimizer state, and the
// EMA teacher of each param in the same pass (the new param is still in registers when the
// teacher reads it: one read of the param saved per step, and one pass instead of two).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../optim.h"
#include "isa.h"

namespace eman_fused {
namespace {

struct Span {
  int64_t tensor, start, n;
};

constexpr int64_t kOptimChunk = 16384;

// Work items of at most kOptimChunk elements, so threads get even shares of big tensors.
std::vector<Span> spans_of(at::TensorList params) {
  std::vector<Span> spans;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    for (int64_t s = 0; s < n; s += kOptimChunk) {
      spans.push_back({static_cast<int64_t>(i), s, std::min(kOptimChunk, n - s)});
    }
  }
  return spans;
}

template <typename F>
void for_spans(const std::vector<Span>& spans, F&& f) {
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 4, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) f(spans[k]);
  });
}

// Teacher element type from its dtype; math stays float32.
template <typename F>
void visit_teacher(const at::Tensor* t, F&& f) {
  if (t == nullptr) return f(static_cast<float*>(nullptr));
  switch (t->scalar_type()) {
    case at::kFloat: return f(t->data_ptr<float>());
    case at::kBFloat16: return f(t->data_ptr<c10::BFloat16>());
    case at::kHalf: return f(t->data_ptr<c10::Half>());
    default: TORCH_CHECK(false, "unreachable: teacher dtype checked before");
  }
}

template <typename TT>
inline void ema_into(TT* __restrict__ t, int64_t i, float p, float mt, float wt) {
  t[i] = static_cast<TT>(mt * static_cast<float>(t[i]) + wt * p);
}

template <typename TT>
void sgd_span(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf,
              TT* __restrict__ t, int64_t n, const SgdArgs& a, bool first) {
  const float lr = static_cast<float>(a.lr), mom = static_cast<float>(a.momentum);
  const float damp = 1.0f - static_cast<float>(a.dampening), wd = static_cast<float>(a.weight_decay);
  const float mt = static_cast<float>(a.teacher_momentum), wt = 1.0f - mt;
  for (int64_t i = 0; i < n; ++i) {
    float d = a.maximize ? -g[i] : g[i];
    if (wd != 0.0f) d = d + wd * p[i];
    if (buf != nullptr) {
      const float b = first ? d : mom * buf[i] + damp * d;
      buf[i] = b;
      d = a.nesterov ? d + mom * b : b;
    }
    const float np = p[i] - lr * d;
    p[i] = np;
    if (t != nullptr) ema_into(t, i, np, mt, wt);
  }
}

template <typename TT>
void adamw_span(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                float* __restrict__ v, float* __restrict__ vmax, TT* __restrict__ t, int64_t n,
                const AdamWArgs& a, float step_size, float bc2_sqrt) {
  const float decay = 1.0f - static_cast<float>(a.lr * a.weight_decay);
  const float w1 = 1.0f - static_cast<float>(a.beta1);
  const bool lerp_small = std::abs(w1) < 0.5f;
  const float b2 = static_cast<float>(a.beta2), w2 = 1.0f - b2, eps = static_cast<float>(a.eps);
  const float mt = static_cast<float>(a.teacher_momentum), wt = 1.0f - mt;
  for (int64_t i = 0; i < n; ++i) {
    const float gi = a.maximize ? -g[i] : g[i];
    const float pi = p[i] * decay;
    // torch's lerp: the form depends on the weight (bit-compatible with exp_avg.lerp_)
    const float mi = lerp_small ? m[i] + w1 * (gi - m[i]) : gi - (gi - m[i]) * (1.0f - w1);
    const float vi = v[i] * b2 + w2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    float s = vi;
    if (vmax != nullptr) {
      s = std::max(vmax[i], vi);
      vmax[i] = s;
    }
    const float denom = std::sqrt(s) / bc2_sqrt + eps;
    const float np = pi - step_size * (mi / denom);
    p[i] = np;
    if (t != nullptr) ema_into(t, i, np, mt, wt);
  }
}

void sgd_ema_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                      at::TensorList teacher, c10::ArrayRef<int64_t> first, double lr,
                      double momentum, double dampening, bool nesterov, double weight_decay,
                      bool maximize, double teacher_momentum) {
  const SgdArgs a{lr, momentum, dampening, nesterov, weight_decay, maximize, teacher_momentum};
  check_sgd_ema(params, grads, bufs, teacher, first, a);
  bump_versions({params, bufs, teacher});
  const auto spans = spans_of(params);
  for_spans(spans, [&](const Span& s) {
    const at::Tensor* t = teacher.empty() ? nullptr : &teacher[s.tensor];
    visit_teacher(t, [&](auto* tp) {
      sgd_span(params[s.tensor].data_ptr<float>() + s.start,
               grads[s.tensor].const_data_ptr<float>() + s.start,
               bufs.empty() ? nullptr : bufs[s.tensor].data_ptr<float>() + s.start,
               tp == nullptr ? tp : tp + s.start, s.n, a, !first.empty() && first[s.tensor] != 0);
    });
  });
}

void adamw_ema_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                        at::TensorList teacher, c10::ArrayRef<double> step_sizes,
                        c10::ArrayRef<double> bias_correction2_sqrts, double lr, double beta1,
                        double beta2, double eps, double weight_decay, bool amsgrad,
                        bool maximize, double teacher_momentum) {
  const AdamWArgs a{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, teacher_momentum};
  check_adamw_ema(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, teacher, step_sizes,
                  bias_correction2_sqrts, a);
  bump_versions({params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, teacher});
  const auto spans = spans_of(params);
  for_spans(spans, [&](const Span& s) {
    const int64_t i = s.tensor;
    const at::Tensor* t = teacher.empty() ? nullptr : &teacher[i];
    visit_teacher(t, [&](auto* tp) {
      adamw_span(params[i].data_ptr<float>() + s.start, grads[i].const_data_ptr<float>() + s.start,
                 exp_avgs[i].data_ptr<float>() + s.start, exp_avg_sqs[i].data_ptr<float>() + s.start,
                 amsgrad ? max_exp_avg_sqs[i].data_ptr<float>() + s.start : nullptr,
                 tp == nullptr ? tp : tp + s.start, s.n, a, static_cast<float>(step_sizes[i]),
                 static_cast<float>(bias_correction2_sqrts[i]));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CPU, m) {
  m.impl("sgd_ema_step_", &sgd_ema_step_cpu);
  m.impl("adamw_ema_step_", &adamw_ema_step_cpu);
}

}  // namespace eman_fused
