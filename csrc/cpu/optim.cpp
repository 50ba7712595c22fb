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

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CPU, m) {
  m.impl("sgd_ema_step_", &sgd_ema_step_cpu);
  m.impl("adamw_ema_step_", &adamw_ema_step_cpu);
}

}  // namespace eman_fused
