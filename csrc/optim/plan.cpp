#include "optim/plan.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstddef>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "common/dtype_of.h"
#include "common/overlap.h"
#include "optim/math.h"

namespace eman_fused {
namespace {

bool is_fused_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf;
}

void check_length(const std::string& op, const char* name, at::TensorList list, size_t n,
                  bool may_be_empty) {
  TORCH_CHECK_VALUE(list.size() == n || (may_be_empty && list.empty()), op, ": ", name, " has ",
                    list.size(), " tensors but params has ", n);
}

// float32, bfloat16 or float16 params (math in float32), one dtype and device per call, dense.
void check_params(const std::string& op, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_VALUE(params[i].defined(), op, ": params[", i, "] is undefined");
    const auto st = params[i].scalar_type();
    TORCH_CHECK_TYPE(is_fused_float(st), op, ": params[", i, "] has dtype ", st,
                     "; the fused optimizers take float32, bfloat16 or float16 params (other ",
                     "dtypes: use the torch optimizer and EMATeacher.update())");
    TORCH_CHECK_TYPE(st == params[0].scalar_type(), op, ": params[", i, "] is ", st,
                     " but params[0] is ", params[0].scalar_type(), "; one param dtype per call");
    TORCH_CHECK_VALUE(params[i].device() == params[0].device(), op, ": params[", i, "] is on ",
                      params[i].device(), " but params[0] is on ", params[0].device());
    TORCH_CHECK_VALUE(params[i].is_non_overlapping_and_dense(), op, ": params[", i,
                      "] is not dense (strides ", params[i].strides(), ")");
  }
}

// list[i] must match params[i]: defined, the param's dtype (grads and state, as torch.optim
// keeps them) or a teacher float type, device, shape, strides. (eman_fused.optim gives a grad
// of other strides than its param a copy in the param's layout first.)
void check_like_param(const std::string& op, const char* name, at::TensorList list,
                      at::TensorList params, bool teacher) {
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& x = list[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(x.defined(), op, ": ", name, "[", i, "] is undefined");
    const auto st = x.scalar_type();
    if (teacher) {
      TORCH_CHECK_TYPE(is_fused_float(st), op, ": ", name, "[", i, "] has dtype ", st,
                       "; teachers must be float32, bfloat16 or float16");
      TORCH_CHECK_TYPE(st == list[0].scalar_type(), op, ": teacher[", i, "] is ", st,
                       " but teacher[0] is ", list[0].scalar_type(), "; one teacher dtype per call");
    } else {
      TORCH_CHECK_TYPE(st == p.scalar_type(), op, ": ", name, "[", i, "] has dtype ", st,
                       " but params[", i, "] is ", p.scalar_type(), " (grads and optimizer state ",
                       "have the param's dtype, as in torch.optim)");
    }
    TORCH_CHECK_VALUE(x.device() == p.device(), op, ": ", name, "[", i, "] is on ", x.device(),
                      " but params[", i, "] is on ", p.device());
    TORCH_CHECK_VALUE(x.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", x.sizes(),
                      " but params[", i, "] has ", p.sizes());
    TORCH_CHECK_VALUE(x.is_non_overlapping_and_dense() && x.strides() == p.strides(), op, ": ",
                      name, "[", i, "] has strides ", x.strides(), " but params[", i, "] has ",
                      p.strides(), " (both must be dense, in the same memory order)");
  }
}

}  // namespace

void check_hyper_value(const std::string& op, const HyperInfo& info, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v), op, ": ", info.name, " must be finite, got ", v);
  switch (info.check) {
    case HyperCheck::kFinite: return;
    case HyperCheck::kNonNegative:
      TORCH_CHECK_VALUE(v >= 0.0, op, ": ", info.name, " must be >= 0, got ", v);
      return;
    case HyperCheck::kUnit:
      TORCH_CHECK_VALUE(v >= 0.0 && v <= 1.0, op, ": ", info.name, " must be in [0, 1], got ", v);
      return;
    case HyperCheck::kBelowOne:
      TORCH_CHECK_VALUE(v >= 0.0 && v < 1.0, op, ": ", info.name, " must be in [0, 1), got ", v);
      return;
    case HyperCheck::kFlag:
      TORCH_CHECK_VALUE(v == 0.0 || v == 1.0, op, ": ", info.name, " is a flag (0 or 1), got ", v);
      return;
  }
}

namespace {

// A 0-dim float32 tensor on `device` (a device hyper-parameter or step count).
void check_device_scalar(const std::string& op, const std::string& what, const at::Tensor& t,
                         const at::Device& device, bool cpu_allowed) {
  TORCH_CHECK_VALUE(t.defined() && t.dim() == 0, op, ": ", what, " must be a 0-dim tensor, got shape ",
                    t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", what, " must be float32, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == device || (cpu_allowed && t.device().is_cpu()), op, ": ", what,
                    " is on ", t.device(), " but the params are on ", device);
}

int64_t ptr_of(at::TensorList list, size_t i) {
  return list.empty() ? 0 : reinterpret_cast<int64_t>(list[i].const_data_ptr());
}

// The address of a tensor the step writes: a copy-on-write storage (torch._lazy_clone) is
// materialized first, so the kernels never write into memory another tensor shares.
int64_t written_ptr_of(at::TensorList list, size_t i) {
  return list.empty() ? 0 : reinterpret_cast<int64_t>(list[i].mutable_data_ptr());
}

// The call's scalar block, from the host values of its hyper-parameters.
template <typename Tag>
void form_scalars(const typename Tag::Traits::Hyper& h, double* scalars) {
  constexpr Optimizer kOpt = Tag::value;
  if constexpr (kOpt == Optimizer::kSgd) {
    const SgdScalars s = sgd_scalars(h);
    std::memcpy(scalars, &s, sizeof s);
  } else if constexpr (kOpt == Optimizer::kAdamW) {
    const AdamWScalars s = adamw_scalars(h);
    std::memcpy(scalars, &s, sizeof s);
  } else {
    const LarsScalars s = lars_scalars(h, kOpt == Optimizer::kLarsYou2017);
    std::memcpy(scalars, &s, sizeof s);
  }
}

std::mutex launcher_mutex;
OptimLauncher launchers[static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)];

template <typename Tag>
void check_and_build(OptimCall& call, const OptimLists& l, c10::ArrayRef<double> hyper,
                     const c10::List<std::optional<at::Tensor>>& hyper_tensors, bool pinned) {
  using Traits = typename Tag::Traits;
  using Hyper = typename Traits::Hyper;
  constexpr Optimizer kOpt = Tag::value;
  constexpr int64_t kCount = Traits::count;
  static_assert(sizeof(Hyper) == kCount * sizeof(double) && kCount <= kMaxHyper, "hyper layout");
  const std::string op = std::string("fused ") + Traits::name + " step";
  const size_t n = l.params.size();
  call.optimizer = kOpt;

  // Hyper-parameters: host values, and tensors where given (CPU ones read here).
  std::string names;
  for (int64_t k = 0; k < kCount; ++k) names += (k ? ", " : "") + std::string(Traits::info[k].name);
  TORCH_CHECK_VALUE(static_cast<int64_t>(hyper.size()) == kCount, op, ": hyper has ", hyper.size(),
                    " values but ", Traits::name, " takes ", kCount, " (", names, ")");
  TORCH_CHECK_VALUE(hyper_tensors.empty() || static_cast<int64_t>(hyper_tensors.size()) == kCount,
                    op, ": hyper_tensors has ", hyper_tensors.size(), " entries; give none or ",
                    kCount, " (", names, "), None where the float holds");
  check_params(op, l.params);
  const at::Device device = n ? l.params[0].device() : at::Device(at::kCPU);
  std::copy(hyper.begin(), hyper.end(), call.hyper.begin());
  std::array<bool, kMaxHyper> on_device{};
  for (int64_t k = 0; k < static_cast<int64_t>(hyper_tensors.size()); ++k) {
    const std::optional<at::Tensor> t = hyper_tensors.get(k);
    if (!t.has_value() || !t->defined()) continue;
    const HyperInfo& info = Traits::info[k];
    TORCH_CHECK_TYPE(info.check != HyperCheck::kFlag, op, ": ", info.name,
                     " is a flag and must be given as a float (it selects the kernel)");
    check_device_scalar(op, info.name, *t, device, false);
    if (t->device().is_cpu()) {  // reading it costs no synchronization
      call.hyper[k] = t->item<double>();
    } else {
      call.hyper_ptrs[k] = t->const_data_ptr<float>();
      on_device[k] = true;
      call.device_inputs = true;
    }
  }
  for (int64_t k = 0; k < kCount; ++k) {
    if (!on_device[k]) check_hyper_value(op, Traits::info[k], call.hyper[k]);
  }
  Hyper h;
  std::memcpy(&h, call.hyper.data(), sizeof(Hyper));

  // Which lists this optimizer takes, and their lengths.
  check_length(op, "grads", l.grads, n, false);
  check_length(op, "teacher", l.teacher, n, true);
  TORCH_CHECK_VALUE(l.flags.size() == n || l.flags.empty(), op, ": flags has ", l.flags.size(),
                    " values but params has ", n);
  if constexpr (kOpt == Optimizer::kAdamW) {
    TORCH_CHECK_VALUE((h.amsgrad != 0.0) == !l.max_second_moments.empty() || n == 0,
                      op, ": amsgrad is ", h.amsgrad != 0.0 ? "on" : "off", " but max_exp_avg_sqs has ",
                      l.max_second_moments.size(), " tensors");
    check_length(op, "exp_avgs", l.first_moments, n, false);
    check_length(op, "exp_avg_sqs", l.second_moments, n, false);
    check_length(op, "max_exp_avg_sqs", l.max_second_moments, n, h.amsgrad == 0.0);
    check_length(op, "steps", l.steps, n, false);
  } else {
    // A momentum buffer per param, except for SGD and you2017 LARS without momentum, which keep
    // none (as torch's SGD): a buffer would apply the dampening. A momentum given as a device
    // value cannot be compared with 0 here, so it takes buffers.
    constexpr size_t kMomentum = offsetof(Hyper, momentum) / sizeof(double);
    constexpr size_t kDampening = offsetof(Hyper, dampening) / sizeof(double);
    const bool no_momentum = !on_device[kMomentum] && h.momentum == 0.0;
    if (kOpt != Optimizer::kLarsSimclr && no_momentum) {
      TORCH_CHECK_VALUE(l.first_moments.empty(), op, ": momentum is 0, so there are no momentum ",
                        "buffers; got ", l.first_moments.size());
    } else {
      check_length(op, "momentum_buffers", l.first_moments, n, false);
    }
    TORCH_CHECK_VALUE(l.second_moments.empty() && l.max_second_moments.empty() && l.steps.empty(),
                      op, " has one state list (momentum_buffers); got second moments or steps");
    TORCH_CHECK_VALUE(h.nesterov == 0.0 || on_device[kMomentum] || on_device[kDampening] ||
                          (h.momentum > 0.0 && h.dampening == 0.0),
                      op, ": nesterov needs momentum > 0 and dampening 0");
    if constexpr (kOpt == Optimizer::kLarsSimclr) {
      TORCH_CHECK_VALUE(h.nesterov == 0.0 && (on_device[kDampening] || h.dampening == 0.0), op,
                        ": the simclr formula has no dampening or nesterov (formula='you2017' has)");
    }
  }

  // Every tensor like its param; AdamW's step counts.
  const char* first_name = kOpt == Optimizer::kAdamW ? "exp_avgs" : "momentum_buffers";
  check_like_param(op, "grads", l.grads, l.params, false);
  check_like_param(op, first_name, l.first_moments, l.params, false);
  check_like_param(op, "exp_avg_sqs", l.second_moments, l.params, false);
  check_like_param(op, "max_exp_avg_sqs", l.max_second_moments, l.params, false);
  check_like_param(op, "teacher", l.teacher, l.params, true);
  std::vector<double> host_steps(l.steps.size(), -1.0);
  for (size_t i = 0; i < l.steps.size(); ++i) {
    check_device_scalar(op, "steps[" + std::to_string(i) + "]", l.steps[i], device, true);
    if (l.steps[i].device().is_cpu()) {
      host_steps[i] = static_cast<double>(*l.steps[i].const_data_ptr<float>());
      TORCH_CHECK_VALUE(std::isfinite(host_steps[i]) && host_steps[i] >= 0.0, op, ": steps[", i,
                        "] (the steps taken so far) must be >= 0, got ", host_steps[i]);
    } else {
      call.device_inputs = true;
    }
  }

  // Nothing written may share memory with anything else of the call: the kernels read and
  // write the lists concurrently.
  std::vector<MemoryRange> ranges;
  ranges.reserve(6 * n);
  add_memory_ranges(ranges, l.params, "params", true);
  add_memory_ranges(ranges, l.grads, "grads", false);
  add_memory_ranges(ranges, l.first_moments, first_name, true);
  add_memory_ranges(ranges, l.second_moments, "exp_avg_sqs", true);
  add_memory_ranges(ranges, l.max_second_moments, "max_exp_avg_sqs", true);
  add_memory_ranges(ranges, l.teacher, "teacher", true);
  add_memory_ranges(ranges, l.steps, "steps", true);
  std::vector<at::Tensor> defined_hyper;
  for (size_t k = 0; k < hyper_tensors.size(); ++k) {
    const std::optional<at::Tensor> t = hyper_tensors.get(k);
    if (t.has_value() && t->defined()) defined_hyper.push_back(*t);
  }
  add_memory_ranges(ranges, defined_hyper, "hyper_tensors", false);
  check_no_overlap(op.c_str(), ranges,
                   "a tensor the step writes (params, state, teacher, step counts) must not share "
                   "memory with any other tensor of the call");

  // The table: entries, chunks, and the call's scalars (from the host values; a kernel that
  // reads device values forms its own).
  std::vector<OptimEntry> entries(n);
  std::vector<TensorChunk> chunks;
  for (size_t i = 0; i < n; ++i) {
    OptimEntry& e = entries[i];
    e.param = written_ptr_of(l.params, i), e.grad = ptr_of(l.grads, i);
    e.teacher = written_ptr_of(l.teacher, i);
    e.first_moment = written_ptr_of(l.first_moments, i);
    e.second_moment = written_ptr_of(l.second_moments, i);
    e.max_second_moment = written_ptr_of(l.max_second_moments, i);
    e.numel = l.params[i].numel();
    e.first_chunk = static_cast<int64_t>(chunks.size());
    for (int64_t s = 0; s < e.numel; s += kOptimChunkElems) chunks.push_back({static_cast<int64_t>(i), s});
    e.num_chunks = static_cast<int64_t>(chunks.size()) - e.first_chunk;
    e.flags = l.flags.empty() ? 0 : l.flags[i];
    e.bias_correction1 = e.bias_correction2_sqrt = 1.0;
    e.step = 0;
    if constexpr (kOpt == Optimizer::kAdamW) {
      if (host_steps[i] >= 0.0) {
        adamw_bias_corrections(h.beta1, h.beta2, host_steps[i] + 1.0, &e.bias_correction1,
                               &e.bias_correction2_sqrt);
      } else {
        e.step = written_ptr_of(l.steps, i);
      }
    }
  }
  double scalars[kOptimScalarWords] = {};
  form_scalars<Tag>(h, scalars);
  OptimPlan& table = call.table;
  table.num_tensors = static_cast<int64_t>(n);
  table.num_chunks = static_cast<int64_t>(chunks.size());
  const int64_t entry_words = table.num_tensors * kOptimEntryWords;
  const int64_t chunk_words = table.num_chunks * kChunkWords;
  table.table = at::empty({entry_words + chunk_words + kOptimScalarWords},
                          at::TensorOptions().dtype(at::kLong).pinned_memory(pinned));
  auto* out = table.table.mutable_data_ptr<int64_t>();
  std::memcpy(out, entries.data(), entries.size() * sizeof(OptimEntry));
  std::memcpy(out + entry_words, chunks.data(), chunks.size() * sizeof(TensorChunk));
  std::memcpy(out + entry_words + chunk_words, scalars, sizeof scalars);
  call.param_tag = n ? *float_tag_of(l.params[0].scalar_type()) : kF32;
  call.teacher_tag = l.teacher.empty() ? kAbsent : *float_tag_of(l.teacher[0].scalar_type());
}

}  // namespace

OptimCall check_optim_call(int64_t optimizer, const OptimLists& lists, c10::ArrayRef<double> hyper,
                           const c10::List<std::optional<at::Tensor>>& hyper_tensors, bool pinned) {
  OptimCall call;
  const bool known = visit_optimizer(optimizer, [&](auto tag) {
    check_and_build<decltype(tag)>(call, lists, hyper, hyper_tensors, pinned);
  });
  TORCH_CHECK_VALUE(known, "fused optimizer step: unknown optimizer ", optimizer, " (0 SGD, 1 AdamW, ",
                    "2 LARS simclr, 3 LARS you2017)");
  return call;
}

void refresh_optim_scalars(OptimCall& call) {
  visit_optimizer(static_cast<int64_t>(call.optimizer), [&](auto tag) {
    using Hyper = typename decltype(tag)::Traits::Hyper;
    Hyper h;
    std::memcpy(&h, call.hyper.data(), sizeof(Hyper));
    double scalars[kOptimScalarWords] = {};
    form_scalars<decltype(tag)>(h, scalars);
    std::memcpy(call.table.table.mutable_data_ptr<int64_t>() +
                    call.table.num_tensors * kOptimEntryWords + call.table.num_chunks * kChunkWords,
                scalars, sizeof scalars);
  });
}

c10::ArrayRef<HyperInfo> optim_hyper_info(int64_t optimizer) {
  c10::ArrayRef<HyperInfo> out;
  visit_optimizer(optimizer, [&](auto tag) {
    using Traits = typename decltype(tag)::Traits;
    out = c10::ArrayRef<HyperInfo>(Traits::info, Traits::count);
  });
  return out;
}

bool hyper_may_change(int64_t optimizer, int64_t k) {
  const c10::ArrayRef<HyperInfo> info = optim_hyper_info(optimizer);
  if (k < 0 || k >= static_cast<int64_t>(info.size())) return false;
  const std::string name = info[k].name;
  return info[k].check != HyperCheck::kFlag && name != "momentum" && name != "dampening";
}

void register_optim_launcher(c10::DeviceType device, OptimLauncher launcher) {
  std::lock_guard<std::mutex> lock(launcher_mutex);
  launchers[static_cast<size_t>(device)] = launcher;
}

// Registration happens in static initializers, before any caller can ask: no lock on reads.
const OptimLauncher* optim_launcher(c10::DeviceType device) {
  const OptimLauncher& l = launchers[static_cast<size_t>(device)];
  return l.run != nullptr ? &l : nullptr;
}

void check_step_overlap(at::TensorList params, at::TensorList grads, at::TensorList state,
                        at::TensorList teacher, at::TensorList steps) {
  std::vector<MemoryRange> ranges;
  ranges.reserve(params.size() + grads.size() + state.size() + teacher.size() + steps.size());
  add_memory_ranges(ranges, params, "params", true);
  add_memory_ranges(ranges, grads, "grads", false);
  add_memory_ranges(ranges, state, "state", true);
  add_memory_ranges(ranges, teacher, "teacher", true);
  add_memory_ranges(ranges, steps, "steps", true);
  check_no_overlap("fused optimizer step", ranges,
                   "a tensor the step writes (params, state, teacher, step counts) must not share "
                   "memory with any other tensor of the step, in any param group");
}

void bump_step_versions(const OptimLists& l) {
  for (at::TensorList list : {l.params, l.first_moments, l.second_moments, l.max_second_moments,
                              l.teacher, l.steps}) {
    for (const at::Tensor& t : list) t.unsafeGetTensorImpl()->bump_version();
  }
}

void advance_host_steps(at::TensorList steps) {
  for (const at::Tensor& s : steps) {
    if (s.device().is_cpu()) *s.mutable_data_ptr<float>() += 1.0f;
  }
}

}  // namespace eman_fused
