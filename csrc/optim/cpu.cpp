// Fused optimizer steps on the CPU: SGD, AdamW and LARS update params and optimizer state, and the
// EMA teacher of each param in the same pass (the new param is still in registers when the
// teacher reads it: one read of the param saved per step, and one pass instead of two).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/convert.h"
#include "common/dtype.h"
#include "common/ema_lerp.h"
#include "common/isa.h"
#include "optim/math.h"
#include "optim/plan.h"

namespace eman_fused {
namespace {

// What the loops read, in float32 (from the call's scalars, optim/math.h).
struct MomentumArgs {
  MomentumFloats floats;
  float factor;
  EmaWeights<float> teacher;
  bool teacher_copy;
};
struct AdamWArgs {
  AdamWFloats floats;
  float step_size, bc2_sqrt;
  EmaWeights<float> teacher;
  bool teacher_copy;
};

#define EMAN_FUSED_LOOPS "optim/cpu_loops.inc"
#include "common/isa_loops.h"

// Runs f(entry, chunk start, n, chunk index) over the table's chunks, in parallel.
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

// Calls f(TypeTag<PT>{}, TypeTag<TT>{}) for the params' element type PT and the teachers' TT
// (void: no teacher, or a teacher left untouched at momentum 1). One of each per call (the
// Python side groups by them); the loops are typed on both.
template <typename F>
void visit_types(FloatTag param_tag, FloatTag teacher_tag, F&& f) {
  auto with_teacher = [&](auto pt) {
    switch (teacher_tag) {
      case kAbsent: return f(pt, TypeTag<void>{});
      case kF32: return f(pt, TypeTag<float>{});
      case kBF16: return f(pt, TypeTag<c10::BFloat16>{});
      default: return f(pt, TypeTag<c10::Half>{});
    }
  };
  switch (param_tag) {
    case kF32: return with_teacher(TypeTag<float>{});
    case kBF16: return with_teacher(TypeTag<c10::BFloat16>{});
    default: return with_teacher(TypeTag<c10::Half>{});
  }
}

template <typename Hyper>
Hyper typed_hyper(const OptimCall& call) {
  Hyper h;
  std::memcpy(&h, call.hyper.data(), sizeof h);
  return h;
}

template <typename Scalars>
Scalars typed_scalars(const OptimCall& call) {
  Scalars s;
  std::memcpy(&s, optim_scalars(call.table), sizeof s);
  return s;
}

// The teacher's dtype for the loops: none at momentum 1 (nothing touched, as ema_update_).
FloatTag loop_teacher_tag(const OptimCall& call, double teacher_momentum) {
  return ema_mode(teacher_momentum) == EmaMode::kSkip ? kAbsent : call.teacher_tag;
}

// SGD and both LARS formulas: one loop (optim/math.h: momentum_update). SGD: no factor (1) and
// weight decay when it is non-zero. LARS: two passes (documented): per-tensor sums of squares,
// then the update with each tensor's factor; sums per span, then per tensor in span order, so
// the same bits for any thread count.
void run_momentum(const OptimCall& call) {
  const OptimPlan& table = call.table;
  const bool sgd = call.optimizer == Optimizer::kSgd;
  const bool you2017 = call.optimizer == Optimizer::kLarsYou2017;
  MomentumArgs a{};
  double teacher_momentum;
  bool nesterov, sgd_decay = false;
  std::vector<float> factor(table.num_tensors, 1.0f);
  if (sgd) {
    const SgdHyper h = typed_hyper<SgdHyper>(call);
    const SgdScalars s = typed_scalars<SgdScalars>(call);
    a = {momentum_floats(s), 1.0f, teacher_weights(s), false};
    teacher_momentum = h.teacher_momentum;
    nesterov = h.nesterov != 0.0;
    sgd_decay = h.weight_decay != 0.0;
  } else {
    const LarsHyper h = typed_hyper<LarsHyper>(call);
    const LarsScalars s = typed_scalars<LarsScalars>(call);
    a = {momentum_floats(s), 1.0f, teacher_weights(s), false};
    teacher_momentum = h.teacher_momentum;
    nesterov = h.nesterov != 0.0;
    std::vector<double> sums(2 * table.num_chunks, 0.0);
    const float sign = float(s.sign), nwd = float(s.norm_weight_decay);
    visit_types(call.param_tag, kAbsent, [&](auto ptag, auto) {
      using PT = typename decltype(ptag)::type;
      for_chunks(table, [&](const OptimEntry& e, int64_t start, int64_t n, int64_t k) {
        if ((e.flags & kOptimAdapt) == 0) return;
        const PT* p = at_elem<const PT>(e.param, start);
        const PT* g = at_elem<const PT>(e.grad, start);
        EMAN_FUSED_ISA_FN(lars_sumsq<PT>)(raw(p), raw(g), n, sign, nwd, &sums[2 * k]);
      });
    });
    const OptimEntry* entries = table.entries();
    for (int64_t i = 0; i < table.num_tensors; ++i) {
      double p2 = 0.0, n2 = 0.0;  // this tensor's chunks, in order
      for (int64_t k = entries[i].first_chunk; k < entries[i].first_chunk + entries[i].num_chunks; ++k) {
        p2 += sums[2 * k], n2 += sums[2 * k + 1];
      }
      factor[i] = lars_factor(s, you2017, (entries[i].flags & kOptimAdapt) != 0, p2, n2);
    }
  }
  a.teacher_copy = ema_mode(teacher_momentum) == EmaMode::kCopy;
  visit_types(call.param_tag, loop_teacher_tag(call, teacher_momentum), [&](auto ptag, auto ttag) {
    using PT = typename decltype(ptag)::type;
    using TT = typename decltype(ttag)::type;
    const auto run = EMAN_FUSED_ISA_FN(momentum_chunks<PT, TT>);
    at::parallel_for(0, table.num_chunks, 2, [&](int64_t begin, int64_t end) {
      run(table.entries(), table.chunks(), begin, end, a, factor.data(), sgd, sgd_decay, you2017,
          nesterov);
    });
  });
}

void run_adamw(const OptimCall& call) {
  const AdamWHyper h = typed_hyper<AdamWHyper>(call);
  const AdamWScalars s = typed_scalars<AdamWScalars>(call);
  const bool copy = ema_mode(h.teacher_momentum) == EmaMode::kCopy;
  visit_types(call.param_tag, loop_teacher_tag(call, h.teacher_momentum), [&](auto ptag, auto ttag) {
    using PT = typename decltype(ptag)::type;
    using TT = typename decltype(ttag)::type;
    const AdamWArgs a{adamw_floats(s), 0.0f, 0.0f, teacher_weights(s), copy};
    const auto run = EMAN_FUSED_ISA_FN(adamw_chunks<PT, TT>);
    const OptimPlan& table = call.table;
    at::parallel_for(0, table.num_chunks, 2, [&](int64_t begin, int64_t end) {
      run(table.entries(), table.chunks(), begin, end, a, s.lr);
    });
  });
}

void run_call(const OptimCall& call) {
  if (call.optimizer == Optimizer::kAdamW) {
    run_adamw(call);
  } else {
    run_momentum(call);
  }
}

void optim_ema_step_cpu(int64_t optimizer, at::TensorList params, at::TensorList grads,
                        at::TensorList first_moments, at::TensorList second_moments,
                        at::TensorList max_second_moments, at::TensorList teacher,
                        c10::ArrayRef<int64_t> flags, at::TensorList steps,
                        c10::ArrayRef<double> hyper,
                        const c10::List<std::optional<at::Tensor>>& hyper_tensors) {
  const OptimLists lists{params, grads, first_moments, second_moments, max_second_moments,
                         teacher, steps, flags};
  const OptimCall call = check_optim_call(optimizer, lists, hyper, hyper_tensors, false);
  bump_step_versions(lists);
  advance_host_steps(steps);
  run_call(call);
}

const bool registered = [] {
  OptimLauncher launcher;
  launcher.run = &run_call;
  register_optim_launcher(c10::DeviceType::CPU, launcher);
  return true;
}();

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CPU, m) {
  m.impl("optim_ema_step_", &optim_ema_step_cpu);
}

}  // namespace eman_fused
