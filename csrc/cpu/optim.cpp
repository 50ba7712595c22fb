// Fused optimizer steps on the CPU: SGD and AdamW update params and optimizer state, and the
// EMA teacher of each param in the same pass (the new param is still in registers when the
// teacher reads it: one read of the param saved per step, and one pass instead of two).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../dtype_dispatch.h"
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

namespace baseline {
#include "optim_loops.inc"
}  // namespace baseline
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#include "optim_loops.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

bool use_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return cpu_isa() == CpuIsa::kAvx2;
#else
  return false;
#endif
}

// Calls f(TypeTag<T>{}) for the teacher's element type (void: no teacher).
template <typename F>
void visit_teacher(at::TensorList teacher, F&& f) {
  if (teacher.empty()) return f(TypeTag<void>{});
  switch (teacher[0].scalar_type()) {
    case at::kFloat: return f(TypeTag<float>{});
    case at::kBFloat16: return f(TypeTag<c10::BFloat16>{});
    case at::kHalf: return f(TypeTag<c10::Half>{});
    default: TORCH_CHECK(false, "unreachable: teacher dtype checked before");
  }
}

// A teacher's data at element `start` (nullptr without a teacher).
void* teacher_at(at::TensorList teacher, int64_t i, int64_t start) {
  if (teacher.empty()) return nullptr;
  return static_cast<char*>(teacher[i].data_ptr()) + start * teacher[i].element_size();
}

void sgd_ema_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                      at::TensorList teacher, c10::ArrayRef<int64_t> first, double lr,
                      double momentum, double dampening, bool nesterov, double weight_decay,
                      bool maximize, double teacher_momentum) {
  const SgdArgs a{lr, momentum, dampening, nesterov, weight_decay, maximize, teacher_momentum};
  check_sgd_ema(params, grads, bufs, teacher, first, a);
  bump_versions({params, bufs, teacher});
  const auto spans = spans_of(params);
  // One teacher dtype per call (the Python side groups by it); the loops are typed on it.
  visit_teacher(teacher, [&](auto tag) {
    using TT = typename decltype(tag)::type;
    const bool avx = use_avx2();
    for_spans(spans, [&](const Span& s) {
      const int64_t i = s.tensor;
      float* p = params[i].data_ptr<float>() + s.start;
      const float* g = grads[i].const_data_ptr<float>() + s.start;
      float* b = bufs.empty() ? nullptr : bufs[i].data_ptr<float>() + s.start;
      void* t = teacher_at(teacher, i, s.start);
      const bool f = !first.empty() && first[i] != 0;
#if defined(__x86_64__) && defined(__GNUC__)
      if (avx) return avx2::sgd_span<TT>(p, g, b, t, s.n, a, f);
#endif
      baseline::sgd_span<TT>(p, g, b, t, s.n, a, f);
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
  visit_teacher(teacher, [&](auto tag) {
    using TT = typename decltype(tag)::type;
    const bool avx = use_avx2();
    for_spans(spans, [&](const Span& s) {
      const int64_t i = s.tensor;
      float* p = params[i].data_ptr<float>() + s.start;
      const float* g = grads[i].const_data_ptr<float>() + s.start;
      float* m = exp_avgs[i].data_ptr<float>() + s.start;
      float* v = exp_avg_sqs[i].data_ptr<float>() + s.start;
      float* vmax = amsgrad ? max_exp_avg_sqs[i].data_ptr<float>() + s.start : nullptr;
      void* t = teacher_at(teacher, i, s.start);
      const auto ss = static_cast<float>(step_sizes[i]);
      const auto bc = static_cast<float>(bias_correction2_sqrts[i]);
#if defined(__x86_64__) && defined(__GNUC__)
      if (avx) return avx2::adamw_span<TT>(p, g, m, v, vmax, t, s.n, a, ss, bc);
#endif
      baseline::adamw_span<TT>(p, g, m, v, vmax, t, s.n, a, ss, bc);
    });
  });
}

// Two passes (documented): per-tensor norms of p and of the decayed gradient, then the update
// with each tensor's trust ratio. Norms are summed per span, then per tensor in span order:
// the same bits for any thread count.
void lars_ema_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                       at::TensorList teacher, c10::ArrayRef<int64_t> adapt,
                       c10::ArrayRef<int64_t> first, double lr, double momentum,
                       double weight_decay, double trust_coefficient, bool maximize,
                       double teacher_momentum) {
  const LarsArgs a{lr, momentum, weight_decay, trust_coefficient, maximize, teacher_momentum};
  check_lars_ema(params, grads, bufs, teacher, adapt, first, a);
  bump_versions({params, bufs, teacher});
  const auto spans = spans_of(params);
  const float wd = static_cast<float>(weight_decay), sign = maximize ? -1.0f : 1.0f;
  std::vector<double> sums(2 * spans.size(), 0.0);
  const bool avx = use_avx2();
  at::parallel_for(0, static_cast<int64_t>(spans.size()), 4, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Span& s = spans[k];
      if (adapt[s.tensor] == 0) continue;
      const float* p = params[s.tensor].const_data_ptr<float>() + s.start;
      const float* g = grads[s.tensor].const_data_ptr<float>() + s.start;
#if defined(__x86_64__) && defined(__GNUC__)
      if (avx) { avx2::lars_sumsq(p, g, s.n, wd, sign, &sums[2 * k]); continue; }
#endif
      baseline::lars_sumsq(p, g, s.n, wd, sign, &sums[2 * k]);
    }
  });
  std::vector<double> p2(params.size(), 0.0), d2(params.size(), 0.0);
  for (size_t k = 0; k < spans.size(); ++k) {
    p2[spans[k].tensor] += sums[2 * k];
    d2[spans[k].tensor] += sums[2 * k + 1];
  }
  std::vector<float> trust(params.size(), 1.0f);
  for (size_t i = 0; i < params.size(); ++i) {
    const double pn = std::sqrt(p2[i]), dn = std::sqrt(d2[i]);
    if (adapt[i] != 0 && pn > 0.0 && dn > 0.0) {
      trust[i] = static_cast<float>(trust_coefficient * pn / dn);
    }
  }
  visit_teacher(teacher, [&](auto tag) {
    using TT = typename decltype(tag)::type;
    for_spans(spans, [&](const Span& s) {
      const int64_t i = s.tensor;
      float* p = params[i].data_ptr<float>() + s.start;
      const float* g = grads[i].const_data_ptr<float>() + s.start;
      float* b = bufs[i].data_ptr<float>() + s.start;
      void* t = teacher_at(teacher, i, s.start);
#if defined(__x86_64__) && defined(__GNUC__)
      if (avx) return avx2::lars_span<TT>(p, g, b, t, s.n, a, adapt[i] != 0, first[i] != 0, trust[i]);
#endif
      baseline::lars_span<TT>(p, g, b, t, s.n, a, adapt[i] != 0, first[i] != 0, trust[i]);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CPU, m) {
  m.impl("sgd_ema_step_", &sgd_ema_step_cpu);
  m.impl("adamw_ema_step_", &adamw_ema_step_cpu);
  m.impl("lars_ema_step_", &lars_ema_step_cpu);
}

}  // namespace eman_fused
