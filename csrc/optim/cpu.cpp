// Fused optimizer steps on the CPU: SGD, AdamW and LARS update params and optimizer state, and the
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

#include "common/dtype.h"
#include "optim/plan.h"
#include "common/convert.h"
#include "common/isa.h"

namespace eman_fused {
namespace {

// Runs f(entry, chunk start, n) over the table's chunks, in parallel.
template <typename F>
void for_chunks(const OptimPlan& table, F&& f) {
  const OptimEntry* entries = table.entries();
  const TensorChunk* chunks = table.chunks();
  at::parallel_for(0, table.num_chunks, 2, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const OptimEntry& e = entries[chunks[k].tensor];
      const int64_t start = chunks[k].start;
      f(e, start, std::min(kOptimChunkElems, e.numel - start), k);
    }
  });
}

template <typename T>
T* at_elem(int64_t ptr, int64_t start) {
  return ptr == 0 ? nullptr : reinterpret_cast<T*>(ptr) + start;
}

#define EMAN_FUSED_LOOPS "optim/cpu_loops.inc"
#include "common/isa_loops.h"

// Calls f(TypeTag<PT>{}, TypeTag<TT>{}) for the params' element type PT and the teachers' TT
// (void: no teacher). One of each per call (the Python side groups by them); the loops are
// typed on both.
template <typename F>
void visit_types(at::TensorList params, at::TensorList teacher, F&& f) {
  auto with_teacher = [&](auto pt) {
    switch (teacher_tag(teacher)) {
      case kAbsent: return f(pt, TypeTag<void>{});
      case kF32: return f(pt, TypeTag<float>{});
      case kBF16: return f(pt, TypeTag<c10::BFloat16>{});
      default: return f(pt, TypeTag<c10::Half>{});
    }
  };
  switch (param_tag(params)) {
    case kF32: return with_teacher(TypeTag<float>{});
    case kBF16: return with_teacher(TypeTag<c10::BFloat16>{});
    default: return with_teacher(TypeTag<c10::Half>{});
  }
}

// A teacher pointer at element `start`, typed (void: no teacher).
template <typename TT>
void* teacher_elem(const OptimEntry& e, int64_t start) {
  if constexpr (std::is_void_v<TT>) {
    return nullptr;
  } else {
    return at_elem<TT>(e.teacher, start);
  }
}

void sgd_ema_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                      at::TensorList teacher, c10::ArrayRef<int64_t> first, double lr,
                      double momentum, double dampening, bool nesterov, double weight_decay,
                      bool maximize, double teacher_momentum) {
  const SgdArgs a{lr, momentum, dampening, nesterov, weight_decay, maximize, teacher_momentum};
  const OptimPlan table = prepare_sgd(params, grads, bufs, teacher, first, a, false);
  visit_types(params, teacher, [&](auto ptag, auto ttag) {
    using PT = typename decltype(ptag)::type;
    using TT = typename decltype(ttag)::type;
    for_chunks(table, [&](const OptimEntry& e, int64_t start, int64_t n, int64_t) {
      PT* p = at_elem<PT>(e.param, start);
      const PT* g = at_elem<const PT>(e.grad, start);
      PT* b = at_elem<PT>(e.state0, start);
      void* t = teacher_elem<TT>(e, start);
      const bool f = (e.flags & kOptimFirst) != 0;
      EMAN_FUSED_ISA_FN(sgd_span<PT, TT>)(p, g, b, t, n, a, f);
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
  const OptimPlan table = prepare_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                         teacher, step_sizes, bias_correction2_sqrts, a, false);
  visit_types(params, teacher, [&](auto ptag, auto ttag) {
    using PT = typename decltype(ptag)::type;
    using TT = typename decltype(ttag)::type;
    for_chunks(table, [&](const OptimEntry& e, int64_t start, int64_t n, int64_t) {
      PT* p = at_elem<PT>(e.param, start);
      const PT* g = at_elem<const PT>(e.grad, start);
      PT* m = at_elem<PT>(e.state0, start);
      PT* v = at_elem<PT>(e.state1, start);
      PT* vmax = at_elem<PT>(e.state2, start);
      void* t = teacher_elem<TT>(e, start);
      const auto ss = static_cast<float>(e.scalar0), bc = static_cast<float>(e.scalar1);
      EMAN_FUSED_ISA_FN(adamw_span<PT, TT>)(p, g, m, v, vmax, t, n, a, ss, bc);
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
  const OptimPlan table = prepare_lars(params, grads, bufs, teacher, adapt, first, a, false);
  const float wd = static_cast<float>(weight_decay), sign = maximize ? -1.0f : 1.0f;
  std::vector<double> sums(2 * table.num_chunks, 0.0);
  visit_types(params, {}, [&](auto ptag, auto) {
    using PT = typename decltype(ptag)::type;
    for_chunks(table, [&](const OptimEntry& e, int64_t start, int64_t n, int64_t k) {
      if ((e.flags & kOptimAdapt) == 0) return;
      const PT* p = at_elem<const PT>(e.param, start);
      const PT* g = at_elem<const PT>(e.grad, start);
      EMAN_FUSED_ISA_FN(lars_sumsq<PT>)(raw(p), raw(g), n, wd, sign, &sums[2 * k]);
    });
  });
  std::vector<float> trust(params.size(), 1.0f);
  const OptimEntry* entries = table.entries();
  for (int64_t i = 0; i < table.num_tensors; ++i) {
    double p2 = 0.0, d2 = 0.0;  // this tensor's chunks, in order
    for (int64_t k = entries[i].first_chunk; k < entries[i].first_chunk + entries[i].num_chunks; ++k) {
      p2 += sums[2 * k], d2 += sums[2 * k + 1];
    }
    const double pn = std::sqrt(p2), dn = std::sqrt(d2);
    if ((entries[i].flags & kOptimAdapt) != 0 && pn > 0.0 && dn > 0.0) {
      trust[i] = static_cast<float>(trust_coefficient * pn / dn);
    }
  }
  visit_types(params, teacher, [&](auto ptag, auto ttag) {
    using PT = typename decltype(ptag)::type;
    using TT = typename decltype(ttag)::type;
    for_chunks(table, [&](const OptimEntry& e, int64_t start, int64_t n, int64_t k) {
      const int64_t i = table.chunks()[k].tensor;
      PT* p = at_elem<PT>(e.param, start);
      const PT* g = at_elem<const PT>(e.grad, start);
      PT* b = at_elem<PT>(e.state0, start);
      void* t = teacher_elem<TT>(e, start);
      const bool ad = (e.flags & kOptimAdapt) != 0, fi = (e.flags & kOptimFirst) != 0;
      EMAN_FUSED_ISA_FN(lars_span<PT, TT>)(p, g, b, t, n, a, ad, fi, trust[i]);
    });
  });
}

// The capturable variants read lr, the teacher momentum and (AdamW) the step counts from
// tensors. On the CPU reading them costs no synchronization: these adapt to the kernels above.
void sgd_ema_step_capturable_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                                 at::TensorList teacher, c10::ArrayRef<int64_t> first,
                                 const at::Tensor& lr, double momentum, double dampening,
                                 bool nesterov, double weight_decay, bool maximize,
                                 const at::Tensor& teacher_momentum) {
  check_capturable_scalars("sgd_ema_step_", params, lr, teacher_momentum, {});
  if (params.empty()) return;
  sgd_ema_step_cpu(params, grads, bufs, teacher, first, lr.item<double>(), momentum, dampening,
                   nesterov, weight_decay, maximize, teacher_momentum.item<double>());
}

void adamw_ema_step_capturable_cpu(at::TensorList params, at::TensorList grads,
                                   at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                   at::TensorList max_exp_avg_sqs, at::TensorList teacher,
                                   at::TensorList steps, const at::Tensor& lr, double beta1,
                                   double beta2, double eps, double weight_decay, bool amsgrad,
                                   bool maximize, const at::Tensor& teacher_momentum) {
  check_capturable_scalars("adamw_ema_step_", params, lr, teacher_momentum, steps);
  if (params.empty()) return;
  const double lr_v = lr.item<double>();
  std::vector<double> step_sizes(params.size()), bc2(params.size());
  for (size_t i = 0; i < params.size(); ++i) {  // as the Python (host) path computes them
    const double k = steps[i].item<double>();
    step_sizes[i] = lr_v / (1.0 - std::pow(beta1, k));
    bc2[i] = std::sqrt(1.0 - std::pow(beta2, k));
  }
  adamw_ema_step_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, teacher, step_sizes,
                     bc2, lr_v, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                     teacher_momentum.item<double>());
}

void lars_ema_step_capturable_cpu(at::TensorList params, at::TensorList grads,
                                  at::TensorList bufs, at::TensorList teacher,
                                  c10::ArrayRef<int64_t> adapt, c10::ArrayRef<int64_t> first,
                                  const at::Tensor& lr, double momentum, double weight_decay,
                                  double trust_coefficient, bool maximize,
                                  const at::Tensor& teacher_momentum) {
  check_capturable_scalars("lars_ema_step_", params, lr, teacher_momentum, {});
  if (params.empty()) return;
  lars_ema_step_cpu(params, grads, bufs, teacher, adapt, first, lr.item<double>(), momentum,
                    weight_decay, trust_coefficient, maximize, teacher_momentum.item<double>());
}

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CPU, m) {
  m.impl("sgd_ema_step_", &sgd_ema_step_cpu);
  m.impl("adamw_ema_step_", &adamw_ema_step_cpu);
  m.impl("lars_ema_step_", &lars_ema_step_cpu);
  m.impl("sgd_ema_step_.capturable", &sgd_ema_step_capturable_cpu);
  m.impl("adamw_ema_step_.capturable", &adamw_ema_step_capturable_cpu);
  m.impl("lars_ema_step_.capturable", &lars_ema_step_capturable_cpu);
}

}  // namespace eman_fused
