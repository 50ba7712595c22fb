#include "optim/step_plan.h"

#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "optim/math.h"

namespace eman_fused {
namespace {

const char* const kOp = "fused optimizer step plan";

// A plan's tensors are read and written below the dispatcher: plain strided ones only.
void check_plain(const at::Tensor& t, const char* list, size_t i) {
  TORCH_CHECK(t.defined() && t.layout() == at::kStrided && !needs_dispatcher(t.key_set()), kOp,
              ": ", list, "[", i, "] is not a plain strided tensor");
}

std::pair<uintptr_t, uintptr_t> byte_range(const c10::TensorImpl* impl) {
  const auto b = reinterpret_cast<uintptr_t>(impl->data());
  return {b, b + static_cast<uintptr_t>(impl->numel()) * impl->itemsize()};
}

bool value_ok(int64_t optimizer, int64_t k, double v) {
  try {
    check_hyper_value(kOp, optim_hyper_info(optimizer)[k], v);
    return true;
  } catch (const c10::Error&) {
    return false;  // the checked path raises it, with its message
  }
}

}  // namespace

OptimStepPlan::OptimStepPlan(const std::vector<StepCallLists>& calls) {
  std::vector<at::Tensor> params, grads, state, teacher, steps;  // the whole step, for overlap
  for (const StepCallLists& in : calls) {
    const OptimLists& l = in.lists;
    TORCH_CHECK(!l.params.empty(), kOp, ": a call without params");
    Call c;
    c.call = check_optim_call(in.optimizer, l, in.hyper, c10::List<std::optional<at::Tensor>>(),
                              /*pinned=*/false);
    TORCH_CHECK(!c.call.device_inputs, kOp, ": takes host hyper-parameters and step counts only");
    c.launcher = optim_launcher(l.params[0].device().type());
    TORCH_CHECK(c.launcher != nullptr, kOp, ": no launcher for ", l.params[0].device().type());
    c.num_params = l.params.size();
    c.num_hyper = in.hyper.size();
    for (const int64_t f : l.flags) {
      TORCH_CHECK((f & kOptimFirst) == 0, kOp, ": planned with a new momentum buffer");
    }
    const std::pair<const char*, at::TensorList> lists[] = {
        {"params", l.params},   {"first_moments", l.first_moments},
        {"second_moments", l.second_moments}, {"max_second_moments", l.max_second_moments},
        {"teacher", l.teacher}, {"steps", l.steps}};
    size_t count = 0;
    for (const auto& [name, list] : lists) count += list.size();
    c.seen.reserve(count);
    for (const auto& [name, list] : lists) {
      if (list.data() == l.steps.data()) c.steps_at = c.seen.size();
      for (size_t i = 0; i < list.size(); ++i) {
        check_plain(list[i], name, i);
        c.seen.add(list[i].unsafeGetTensorImpl(), /*written=*/true);
        const auto r = byte_range(list[i].unsafeGetTensorImpl());
        if (r.second > r.first) written_.push_back(r);
      }
    }
    c.num_steps = l.steps.size();
    for (size_t i = 0; i < c.num_params; ++i) {
      const c10::TensorImpl* g = l.grads[i].unsafeGetTensorImpl();
      TORCH_CHECK(g == l.params[i].unsafeGetTensorImpl()->grad().unsafeGetTensorImpl(), kOp,
                  ": grads[", i, "] is not params[", i, "].grad");
      check_plain(l.grads[i], "grads", i);
      c.grads.push_back({g, g->data()});
    }
    params.insert(params.end(), l.params.begin(), l.params.end());
    grads.insert(grads.end(), l.grads.begin(), l.grads.end());
    for (at::TensorList s : {l.first_moments, l.second_moments, l.max_second_moments}) {
      state.insert(state.end(), s.begin(), s.end());
    }
    teacher.insert(teacher.end(), l.teacher.begin(), l.teacher.end());
    steps.insert(steps.end(), l.steps.begin(), l.steps.end());
    calls_.push_back(std::move(c));
  }
  if (calls.size() > 1) check_step_overlap(params, grads, state, teacher, steps);
  std::sort(written_.begin(), written_.end());
}

bool OptimStepPlan::written_overlaps(uintptr_t begin, uintptr_t end) const {
  // The written ranges are disjoint (the plan was checked), so sorted by start they are sorted
  // by end too: the first one ending after `begin` is the only candidate.
  const auto it = std::upper_bound(
      written_.begin(), written_.end(), begin,
      [](uintptr_t v, const std::pair<uintptr_t, uintptr_t>& r) { return v < r.second; });
  return it != written_.end() && it->first < end;
}

bool OptimStepPlan::step(const c10::TensorImpl* const* impls, const at::Tensor* grads,
                         const double* hyper) {
  std::lock_guard<std::mutex> lock(mutex_);
  // Under grad mode (or a mode, transform or autocast) the op's own dispatch decides.
  if (at::GradMode::is_enabled() || !dispatcher_would_go_straight_to_kernel()) return false;
  struct NewGrad {
    Call* call;
    size_t index;
    const c10::TensorImpl* impl;
  };
  thread_local std::vector<NewGrad> new_grads;
  thread_local std::vector<bool> hyper_changed;
  new_grads.clear();
  hyper_changed.assign(calls_.size(), false);

  // Every check of every call before anything is written.
  const c10::TensorImpl* const* at = impls;
  const at::Tensor* gv = grads;
  const double* hv = hyper;
  for (size_t ci = 0; ci < calls_.size(); ++ci) {
    Call& c = calls_[ci];
    if (!c.seen.unchanged_range(at, 0, c.seen.size())) return false;
    for (size_t i = 0; i < c.num_params; ++i) {
      const c10::TensorImpl* p = at[i];
      const at::Tensor& grad = gv[i];
      if (!grad.defined()) return false;  // which params step changed: the checked path plans
      const c10::TensorImpl* g = grad.unsafeGetTensorImpl();
      const SeenGrad& seen = c.grads[i];
      // Its param's dispatch keys (so a plain dense tensor), dtype, device, sizes and strides,
      // as the op checks a grad.
      if (g->key_set().raw_repr() != p->key_set().raw_repr() ||
          dtype_device_of(g) != dtype_device_of(p) || !c.seen.same_geometry_as(i, g)) {
        return false;
      }
      if (g == seen.impl && g->data() == seen.data) continue;
      // A new grad (or new memory under the old one): it must not share memory with anything
      // the step writes.
      const auto r = byte_range(g);
      if (r.second > r.first && written_overlaps(r.first, r.second)) return false;
      new_grads.push_back({&c, i, g});
    }
    for (size_t k = 0; k < c.num_hyper; ++k) {
      const double v = hv[k];
      // The same bits (not ==: 0.0 and -0.0 are equal but form other scalars).
      if (std::memcmp(&v, &c.call.hyper[k], sizeof v) == 0) continue;
      const auto opt = static_cast<int64_t>(c.call.optimizer);
      if (!hyper_may_change(opt, static_cast<int64_t>(k)) || !value_ok(opt, static_cast<int64_t>(k), v)) {
        return false;
      }
      hyper_changed[ci] = true;
    }
    for (size_t i = 0; i < c.num_steps; ++i) {
      const double s = *static_cast<const float*>(at[c.steps_at + i]->data());
      if (!(std::isfinite(s) && s >= 0.0)) return false;
    }
    at += c.seen.size();
    gv += c.num_params;
    hv += c.num_hyper;
  }

  // Nothing below can fail: take the new grads and values, then write.
  for (const NewGrad& n : new_grads) {
    auto* entries = reinterpret_cast<OptimEntry*>(n.call->call.table.table.mutable_data_ptr<int64_t>());
    entries[n.index].grad = reinterpret_cast<int64_t>(n.impl->data());
    n.call->grads[n.index] = {n.impl, n.impl->data()};
  }
  at = impls;
  hv = hyper;
  for (size_t ci = 0; ci < calls_.size(); ++ci) {
    Call& c = calls_[ci];
    if (hyper_changed[ci]) {
      std::copy(hv, hv + c.num_hyper, c.call.hyper.begin());
      refresh_optim_scalars(c.call);
    }
    if (c.num_steps > 0) {
      // AdamW: this step's bias corrections from each host step count + 1 (one pair of pow
      // calls per distinct count: a model's params usually share theirs).
      auto* entries = reinterpret_cast<OptimEntry*>(c.call.table.table.mutable_data_ptr<int64_t>());
      AdamWHyper h;
      std::memcpy(&h, c.call.hyper.data(), sizeof h);
      double last = -1.0, bc1 = 1.0, bc2 = 1.0;
      for (size_t i = 0; i < c.num_steps; ++i) {
        const double s = *static_cast<const float*>(at[c.steps_at + i]->data());
        if (s != last) {
          adamw_bias_corrections(h.beta1, h.beta2, s + 1.0, &bc1, &bc2);
          last = s;
        }
        entries[i].bias_correction1 = bc1;
        entries[i].bias_correction2_sqrt = bc2;
      }
    }
    // As the op: versions of everything written, then the host step counts, then the kernels.
    for (size_t k = 0; k < c.seen.size(); ++k) const_cast<c10::TensorImpl*>(at[k])->bump_version();
    for (size_t i = 0; i < c.num_steps; ++i) {
      *static_cast<float*>(const_cast<c10::TensorImpl*>(at[c.steps_at + i])->mutable_data()) += 1.0f;
    }
    c.launcher->run(c.call);
    at += c.seen.size();
    hv += c.num_hyper;
  }
  return true;
}

}  // namespace eman_fused
