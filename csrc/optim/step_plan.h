// A persistent plan of a fused optimizer's whole step (every kernel call: one per param group,
// or per device / dtype part of one), kept between steps by eman_fused.optim: the checked
// tables and what they were built from.
//
// A step re-checks every tensor against the plan (common/tensor_snapshot.h: a few loads per
// tensor) and takes new values only of what may change between steps without a new plan: each
// param's grad (a new tensor after zero_grad(set_to_none=True)), checked like the op checks it
// and against the memory the step writes; the hyper-parameters a scheduler moves (lr, weight
// decay, betas, eps, the trust coefficient, the teacher's momentum), range-checked; AdamW's host
// step counts. Anything else that changed makes the step report so having written nothing, and
// the caller takes the checked path, which raises what is wrong or plans again.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "common/tensor_snapshot.h"
#include "optim/plan.h"

namespace eman_fused {

// One kernel call of a step as the checked path makes it (flags without kOptimFirst: a plan is
// made once every param has its state).
struct StepCallLists {
  int64_t optimizer;
  OptimLists lists;
  std::vector<double> hyper;
};

class OptimStepPlan {
 public:
  // Checks every call as the step op does, and the step across calls (overlap); raises what
  // the op would. Each call's params must be on a device with a C++ launcher and carry their
  // own grads (grads[i] is params[i].grad), with host step counts and hyper values only.
  explicit OptimStepPlan(const std::vector<StepCallLists>& calls);

  // The tensors a step passes per call, in this order: params, first moments, second moments,
  // max second moments, teacher, steps (each list as the call was planned with).
  size_t num_calls() const { return calls_.size(); }
  size_t tensors_of_call(size_t c) const { return calls_[c].seen.size(); }
  size_t hyper_of_call(size_t c) const { return calls_[c].num_hyper; }
  size_t params_of_call(size_t c) const { return calls_[c].num_params; }

  // One step: `impls` holds the current TensorImpls of every call's tensors (as above, one call
  // after the other), `grads` every call's params' grads, one call after the other (read by the
  // caller under the GIL and held until this returns: another thread may set `p.grad = None`
  // meanwhile), `hyper` every call's values in the op's order. Returns false, having written
  // nothing, if anything changed beyond what a plan takes, a new grad or value fails its check,
  // or the call must go through the dispatcher now.
  bool step(const c10::TensorImpl* const* impls, const at::Tensor* grads, const double* hyper);

 private:
  struct SeenGrad {
    const c10::TensorImpl* impl;
    const void* data;
  };
  struct Call {
    OptimCall call;
    TensorSnapshots seen;
    size_t num_params = 0, num_hyper = 0;
    size_t steps_at = 0, num_steps = 0;  // AdamW's step counts: seen[steps_at, +num_steps)
    std::vector<SeenGrad> grads;
    const OptimLauncher* launcher = nullptr;
  };
  bool written_overlaps(uintptr_t begin, uintptr_t end) const;

  std::mutex mutex_;  // one step at a time (steps run without the GIL)
  std::vector<Call> calls_;
  std::vector<std::pair<uintptr_t, uintptr_t>> written_;  // the step's written ranges, sorted
};

}  // namespace eman_fused
