// Validation and the per-call table of the fused optimizer steps, shared by every backend (CPU,
// CUDA, and Triton through the table op): every list and value is checked before anything is
// written.
#pragma once
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string>

#include "common/dtype.h"
#include "common/multi_tensor_plan.h"
#include "optim/hyper.h"
#include "optim/layout.h"

namespace eman_fused {

// The tensor lists of one step call; a list the call does not have is empty. steps: AdamW's
// per-param 0-dim float32 step counts (on the CPU, or on the params' device: capturable).
struct OptimLists {
  at::TensorList params, grads, first_moments, second_moments, max_second_moments, teacher, steps;
  c10::ArrayRef<int64_t> flags;  // per param kOptimFirst | kOptimAdapt, or empty (all 0)
};

// A built table: [OptimEntry x num_tensors][TensorChunk x num_chunks][kOptimScalarWords].
using OptimPlan = MultiTensorPlan<OptimEntry>;
inline const double* optim_scalars(const OptimPlan& table) {
  return reinterpret_cast<const double*>(table.table.const_data_ptr<int64_t>() +
                                         table.num_tensors * kOptimEntryWords +
                                         table.num_chunks * kChunkWords);
}

// One checked step call: its host table and what a launch needs besides it.
struct OptimCall {
  Optimizer optimizer = Optimizer::kSgd;
  OptimPlan table;
  // The hyper-parameters (a device tensor's slot holds a placeholder) and the float32 device
  // addresses of those given as tensors on a GPU (null: the host value holds).
  std::array<double, kMaxHyper> hyper{};
  std::array<const float*, kMaxHyper> hyper_ptrs{};
  bool device_inputs = false;  // device hyper-parameters or step counts: a capturable call
  FloatTag param_tag = kF32, teacher_tag = kAbsent;
};

// Checks every list and value of a step call, in a fixed order so that the first offending
// index is the one named, and builds the call's host table (pinned: in page-locked memory, for
// an asynchronous copy to a GPU). Nothing is written. hyper_tensors: empty, or one optional
// 0-dim float32 tensor per hyper-parameter, on the params' device, whose value replaces the
// float's (CPU ones are read here and range-checked; GPU ones are read by the kernel). AdamW's
// host step counts are read here: the table holds the bias corrections of step count + 1.
OptimCall check_optim_call(int64_t optimizer, const OptimLists& lists,
                           c10::ArrayRef<double> hyper,
                           const c10::List<std::optional<at::Tensor>>& hyper_tensors, bool pinned);

// The overlap check across all calls of one step (several param groups): the lists of every
// call concatenated, in group order (indices in messages count over the whole step).
void check_step_overlap(at::TensorList params, at::TensorList grads, at::TensorList state,
                        at::TensorList teacher, at::TensorList steps);

// After the checks, before the first write: the autograd versions of every list the step
// writes (params, state, teacher, step counts).
void bump_step_versions(const OptimLists& lists);
// The call's scalar block formed again from call.hyper (after a persistent plan took new values
// of hyper-parameters that may change between steps, e.g. a scheduled lr).
void refresh_optim_scalars(OptimCall& call);

// The range check of one hyper-parameter value (every value must also be finite).
void check_hyper_value(const std::string& op, const HyperInfo& info, double value);

// Whether a new value of hyper-parameter k of `optimizer` leaves a checked call's structure
// as it was: not a flag (flags select code paths and lists) and not momentum or dampening
// (whether there are momentum buffers, and the nesterov and simclr checks, depend on them).
bool hyper_may_change(int64_t optimizer, int64_t k);
// The hyper-parameters of `optimizer`: their number and descriptions.
c10::ArrayRef<HyperInfo> optim_hyper_info(int64_t optimizer);

// The kernels of a checked call on one kind of device, for callers that checked the call and
// bumped the versions themselves (a persistent step plan, optim/step_plan.h): the step op of
// that device is the same checks, then this.
struct OptimLauncher {
  void (*run)(const OptimCall& call) = nullptr;
};
void register_optim_launcher(c10::DeviceType device, OptimLauncher launcher);
// The launcher of a device, or null where none is registered (no C++ kernel built for it).
const OptimLauncher* optim_launcher(c10::DeviceType device);

// Each host (CPU) step count + 1; device ones are advanced by the CUDA host side after its
// launch, on the launch's stream.
void advance_host_steps(at::TensorList steps);

}  // namespace eman_fused
