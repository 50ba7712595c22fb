#include "optim/plan.h"

#include "common/dtype_of.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace eman_fused {
namespace {

void check_same_length(const char* op, const char* name, at::TensorList list, size_t n,
                       bool may_be_empty) {
  TORCH_CHECK_VALUE(list.size() == n || (may_be_empty && list.empty()), op, ": ", name, " has ",
                    list.size(), " tensors but params has ", n);
}

bool is_fused_float(at::ScalarType st) {
  return st == at::kFloat || st == at::kBFloat16 || st == at::kHalf;
}

// list[i] must match params[i]: defined, the param's dtype (grads and state, as torch.optim
// keeps them) or a teacher float type, device, shape, strides.
void check_like_param(const char* op, const char* name, at::TensorList list,
                      at::TensorList params, bool teacher) {
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& x = list[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(x.defined(), op, ": ", name, "[", i, "] is undefined");
    const auto st = x.scalar_type();
    if (teacher) {
      TORCH_CHECK_TYPE(is_fused_float(st), op, ": ", name, "[", i, "] has dtype ", st,
                       "; teachers must be float32, bfloat16 or float16");
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
    // (Empty tensors may all have a null data pointer: no storage, nothing shared.)
    TORCH_CHECK_VALUE(!teacher || p.numel() == 0 || x.data_ptr() != p.data_ptr(), op, ": teacher[", i,
                      "] is params[", i, "] itself");
    TORCH_CHECK_TYPE(!teacher || st == list[0].scalar_type(), op, ": teacher[", i, "] is ", st,
                     " but teacher[0] is ", list[0].scalar_type(), "; one teacher dtype per call");
  }
}

// float32, bfloat16 or float16 params (math in float32), one dtype per call.
void check_params(const char* op, at::TensorList params) {
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

void check_number(const char* op, const char* name, double v, double lo, double hi) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= lo && v <= hi, op, ": ", name, " must be in [", lo,
                    ", ", hi, "], got ", v);
}

}  // namespace

void check_sgd_ema(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                   at::TensorList teacher, c10::ArrayRef<int64_t> first, const SgdArgs& a) {
  const char* op = "sgd_ema_step_";
  const size_t n = params.size();
  check_same_length(op, "grads", grads, n, false);
  check_same_length(op, "momentum_buffers", bufs, n, a.momentum == 0.0);
  check_same_length(op, "teacher", teacher, n, true);
  TORCH_CHECK_VALUE(first.size() == n || (first.empty() && bufs.empty()), op, ": first has ",
                    first.size(), " flags but params has ", n);
  TORCH_CHECK_VALUE(a.momentum == 0.0 || bufs.size() == n, op,
                    ": momentum != 0 needs one momentum buffer per param");
  check_number(op, "lr", a.lr, 0.0, INFINITY);
  check_number(op, "momentum", a.momentum, 0.0, INFINITY);
  check_number(op, "dampening", a.dampening, -INFINITY, INFINITY);
  check_number(op, "weight_decay", a.weight_decay, 0.0, INFINITY);
  check_number(op, "teacher_momentum", a.teacher_momentum, 0.0, 1.0);
  TORCH_CHECK_VALUE(!a.nesterov || (a.momentum > 0.0 && a.dampening == 0.0), op,
                    ": nesterov needs momentum > 0 and dampening 0");
  check_params(op, params);
  check_like_param(op, "grads", grads, params, false);
  check_like_param(op, "momentum_buffers", bufs, params, false);
  check_like_param(op, "teacher", teacher, params, true);
}

void check_adamw_ema(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList teacher, c10::ArrayRef<double> step_sizes,
                     c10::ArrayRef<double> bias_correction2_sqrts, const AdamWArgs& a) {
  const char* op = "adamw_ema_step_";
  const size_t n = params.size();
  check_same_length(op, "grads", grads, n, false);
  check_same_length(op, "exp_avgs", exp_avgs, n, false);
  check_same_length(op, "exp_avg_sqs", exp_avg_sqs, n, false);
  check_same_length(op, "max_exp_avg_sqs", max_exp_avg_sqs, n, !a.amsgrad);
  check_same_length(op, "teacher", teacher, n, true);
  TORCH_CHECK_VALUE(step_sizes.size() == n && bias_correction2_sqrts.size() == n, op,
                    ": step_sizes and bias_correction2_sqrts need one value per param");
  check_number(op, "lr", a.lr, 0.0, INFINITY);
  check_number(op, "beta1", a.beta1, 0.0, 1.0 - 1e-12);
  check_number(op, "beta2", a.beta2, 0.0, 1.0 - 1e-12);
  check_number(op, "eps", a.eps, 0.0, INFINITY);
  check_number(op, "weight_decay", a.weight_decay, 0.0, INFINITY);
  check_number(op, "teacher_momentum", a.teacher_momentum, 0.0, 1.0);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(step_sizes[i]) && bias_correction2_sqrts[i] > 0.0, op,
                      ": step_sizes[", i, "] / bias_correction2_sqrts[", i, "] out of range");
  }
  check_params(op, params);
  check_like_param(op, "grads", grads, params, false);
  check_like_param(op, "exp_avgs", exp_avgs, params, false);
  check_like_param(op, "exp_avg_sqs", exp_avg_sqs, params, false);
  check_like_param(op, "max_exp_avg_sqs", max_exp_avg_sqs, params, false);
  check_like_param(op, "teacher", teacher, params, true);
}

void check_lars_ema(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                    at::TensorList teacher, c10::ArrayRef<int64_t> adapt,
                    c10::ArrayRef<int64_t> first, const LarsArgs& a) {
  const char* op = "lars_ema_step_";
  const size_t n = params.size();
  check_same_length(op, "grads", grads, n, false);
  check_same_length(op, "momentum_buffers", bufs, n, false);
  check_same_length(op, "teacher", teacher, n, true);
  TORCH_CHECK_VALUE(adapt.size() == n && first.size() == n, op, ": adapt and first need one ",
                    "flag per param (got ", adapt.size(), " and ", first.size(), " for ", n, ")");
  check_number(op, "lr", a.lr, 0.0, INFINITY);
  check_number(op, "momentum", a.momentum, 0.0, INFINITY);
  check_number(op, "weight_decay", a.weight_decay, 0.0, INFINITY);
  check_number(op, "trust_coefficient", a.trust_coefficient, 0.0, INFINITY);
  check_number(op, "teacher_momentum", a.teacher_momentum, 0.0, 1.0);
  check_params(op, params);
  check_like_param(op, "grads", grads, params, false);
  check_like_param(op, "momentum_buffers", bufs, params, false);
  check_like_param(op, "teacher", teacher, params, true);
}

void bump_versions(std::initializer_list<at::TensorList> lists) {
  for (at::TensorList list : lists) {
    for (const at::Tensor& t : list) t.unsafeGetTensorImpl()->bump_version();
  }
}

OptimPlan build_optim_table(at::TensorList params, at::TensorList grads,
                             std::initializer_list<at::TensorList> states, at::TensorList teacher,
                             c10::ArrayRef<int64_t> flags, c10::ArrayRef<double> scalar0,
                             c10::ArrayRef<double> scalar1, bool pinned) {
  std::vector<at::TensorList> st(states.begin(), states.end());
  st.resize(3);
  const int64_t n = static_cast<int64_t>(params.size());
  auto ptr = [](at::TensorList list, int64_t i) -> int64_t {
    return list.empty() ? 0 : reinterpret_cast<int64_t>(list[i].const_data_ptr());
  };
  std::vector<OptimEntry> entries(n);
  std::vector<TensorChunk> chunks;
  for (int64_t i = 0; i < n; ++i) {
    OptimEntry& e = entries[i];
    e.param = ptr(params, i), e.grad = ptr(grads, i), e.teacher = ptr(teacher, i);
    e.state0 = ptr(st[0], i), e.state1 = ptr(st[1], i), e.state2 = ptr(st[2], i);
    e.numel = params[i].numel();
    e.first_chunk = static_cast<int64_t>(chunks.size());
    for (int64_t s = 0; s < e.numel; s += kOptimChunkElems) chunks.push_back({i, s});
    e.num_chunks = static_cast<int64_t>(chunks.size()) - e.first_chunk;
    e.flags = flags.empty() ? 0 : flags[i];
    e.scalar0 = scalar0.empty() ? 0.0 : scalar0[i];
    e.scalar1 = scalar1.empty() ? 0.0 : scalar1[i];
    e.step = 0;
  }
  OptimPlan table;
  table.num_tensors = n;
  table.num_chunks = static_cast<int64_t>(chunks.size());
  table.table = at::empty({n * kOptimEntryWords + table.num_chunks * kChunkWords},
                         at::TensorOptions().dtype(at::kLong).pinned_memory(pinned));
  auto* out = table.table.mutable_data_ptr<int64_t>();
  std::memcpy(out, entries.data(), entries.size() * sizeof(OptimEntry));
  std::memcpy(out + n * kOptimEntryWords, chunks.data(), chunks.size() * sizeof(TensorChunk));
  return table;
}

std::vector<int64_t> lars_flags(c10::ArrayRef<int64_t> adapt, c10::ArrayRef<int64_t> first) {
  std::vector<int64_t> flags(adapt.size());
  for (size_t i = 0; i < adapt.size(); ++i) {
    flags[i] = (first[i] != 0 ? kOptimFirst : 0) | (adapt[i] != 0 ? kOptimAdapt : 0);
  }
  return flags;
}

// Each op's checks and table (nothing written): the kernels' prologue below, and the table ops
// of the backends that launch from Python (Triton), whose custom ops bump versions themselves.
namespace {
OptimPlan checked_sgd_table(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                             at::TensorList teacher, c10::ArrayRef<int64_t> first,
                             const SgdArgs& a, bool pinned) {
  check_sgd_ema(params, grads, bufs, teacher, first, a);
  return build_optim_table(params, grads, {bufs}, teacher, first, {}, {}, pinned);
}

OptimPlan checked_adamw_table(at::TensorList params, at::TensorList grads,
                               at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                               at::TensorList max_exp_avg_sqs, at::TensorList teacher,
                               c10::ArrayRef<double> step_sizes,
                               c10::ArrayRef<double> bias_correction2_sqrts, const AdamWArgs& a,
                               bool pinned) {
  check_adamw_ema(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, teacher, step_sizes,
                  bias_correction2_sqrts, a);
  return build_optim_table(params, grads, {exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, teacher, {},
                           step_sizes, bias_correction2_sqrts, pinned);
}

OptimPlan checked_lars_table(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                              at::TensorList teacher, c10::ArrayRef<int64_t> adapt,
                              c10::ArrayRef<int64_t> first, const LarsArgs& a, bool pinned) {
  check_lars_ema(params, grads, bufs, teacher, adapt, first, a);
  return build_optim_table(params, grads, {bufs}, teacher, lars_flags(adapt, first), {}, {}, pinned);
}
}  // namespace

OptimPlan prepare_sgd(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                       at::TensorList teacher, c10::ArrayRef<int64_t> first, const SgdArgs& a,
                       bool pinned) {
  OptimPlan table = checked_sgd_table(params, grads, bufs, teacher, first, a, pinned);
  bump_versions({params, bufs, teacher});
  return table;
}

OptimPlan prepare_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::TensorList teacher, c10::ArrayRef<double> step_sizes,
                         c10::ArrayRef<double> bias_correction2_sqrts, const AdamWArgs& a,
                         bool pinned) {
  OptimPlan table = checked_adamw_table(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                         teacher, step_sizes, bias_correction2_sqrts, a, pinned);
  bump_versions({params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, teacher});
  return table;
}

OptimPlan prepare_lars(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                        at::TensorList teacher, c10::ArrayRef<int64_t> adapt,
                        c10::ArrayRef<int64_t> first, const LarsArgs& a, bool pinned) {
  OptimPlan table = checked_lars_table(params, grads, bufs, teacher, adapt, first, a, pinned);
  bump_versions({params, bufs, teacher});
  return table;
}

at::Tensor sgd_ema_table(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                         at::TensorList teacher, c10::ArrayRef<int64_t> first, double lr,
                         double momentum, double dampening, bool nesterov, double weight_decay,
                         bool maximize, double teacher_momentum) {
  const SgdArgs a{lr, momentum, dampening, nesterov, weight_decay, maximize, teacher_momentum};
  return checked_sgd_table(params, grads, bufs, teacher, first, a, false).table;
}

at::Tensor adamw_ema_table(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                           at::TensorList teacher, c10::ArrayRef<double> step_sizes,
                           c10::ArrayRef<double> bias_correction2_sqrts, double lr, double beta1,
                           double beta2, double eps, double weight_decay, bool amsgrad,
                           bool maximize, double teacher_momentum) {
  const AdamWArgs a{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, teacher_momentum};
  return checked_adamw_table(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, teacher,
                             step_sizes, bias_correction2_sqrts, a, false)
      .table;
}

at::Tensor lars_ema_table(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                          at::TensorList teacher, c10::ArrayRef<int64_t> adapt,
                          c10::ArrayRef<int64_t> first, double lr, double momentum,
                          double weight_decay, double trust_coefficient, bool maximize,
                          double teacher_momentum) {
  const LarsArgs a{lr, momentum, weight_decay, trust_coefficient, maximize, teacher_momentum};
  return checked_lars_table(params, grads, bufs, teacher, adapt, first, a, false).table;
}

void check_capturable_scalars(const char* op, at::TensorList params, const at::Tensor& lr,
                              const at::Tensor& teacher_momentum, at::TensorList steps) {
  if (params.empty()) return;
  const at::Device device = params[0].device();
  auto scalar = [&](const at::Tensor& t, const char* name, double lo, double hi) {
    TORCH_CHECK_VALUE(t.defined() && t.dim() == 0, op, ": ", name, " must be a 0-dim tensor");
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(),
                      " but the params are on ", device);
    if (t.device().is_cpu()) check_number(op, name, t.item<double>(), lo, hi);
  };
  scalar(lr, "lr", 0.0, INFINITY);
  scalar(teacher_momentum, "teacher_momentum", 0.0, 1.0);
  if (steps.empty()) return;
  TORCH_CHECK_VALUE(steps.size() == params.size(), op, ": steps has ", steps.size(),
                    " tensors but params has ", params.size());
  for (size_t i = 0; i < steps.size(); ++i) scalar(steps[i], "steps[i]", 1.0, INFINITY);
}

void set_step_pointers(OptimPlan& table, at::TensorList steps) {
  auto* entries = reinterpret_cast<OptimEntry*>(table.table.mutable_data_ptr<int64_t>());
  for (size_t i = 0; i < steps.size(); ++i) {
    entries[i].step = reinterpret_cast<int64_t>(steps[i].const_data_ptr());
  }
}

FloatTag teacher_tag(at::TensorList teacher) {
  return teacher.empty() ? kAbsent : *float_tag_of(teacher[0].scalar_type());
}

FloatTag param_tag(at::TensorList params) {
  return params.empty() ? kF32 : *float_tag_of(params[0].scalar_type());
}

}  // namespace eman_fused
