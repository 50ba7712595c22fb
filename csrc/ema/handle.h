// A persistent plan of one fixed pair of tensor lists (FusedEMA, EMATeacher): the validated plan
// and its table, owned for as long as the handle lives, and what the plan was built from, so a
// step re-checks each tensor in a few nanoseconds (same TensorImpl, data pointer, sizes,
// strides, dtype and device) instead of rebuilding and hashing the shared cache's key.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "common/tensor_snapshot.h"
#include "ema/plan.h"

namespace eman_fused {

// What a step did.
enum class EmaStep : int {
  kUpdated = 0,  // the update ran
  kUseOp = 1,    // nothing written: call the op (a dispatch mode, autocast, inference mode or a
                 // transform is active, a tensor is a subclass, or the tensors left the kind of
                 // device the handle was built for; the op's backend choice and errors apply)
  kChanged = 2,  // nothing written: a tensor changed (only for handles built with
                 // replan_on_change = false, whose owner re-matches its lists itself)
};

class EmaHandle {
 public:
  // Validates the lists and plans them: a bad pair raises here, before any write.
  // replan_on_change: a step that finds a tensor changed re-validates and re-plans (FusedEMA);
  // false: it reports kChanged instead (EMATeacher re-matches teacher and student then).
  // plan = false: nothing is checked here; the first step validates and plans.
  EmaHandle(at::TensorList teacher, at::TensorList student, bool replan_on_change = true,
            bool plan = true);

  // One update of the handle's lists as the caller's objects hold them now (the same objects,
  // in the same order: their tensors may have been re-allocated, re-laid out or cast since).
  // A changed tensor is re-validated and re-planned (or reported) before anything is written.
  EmaStep step(at::TensorList teacher, at::TensorList student, double momentum,
               const at::Tensor* momentum_tensor);

  // The steady-state step: `impls` are the current TensorImpls of teacher[i] (at 2i) and
  // student[i] (at 2i + 1). Returns false, having written nothing, if any of them changed
  // since the plan (or the update must go through the dispatcher): call step() then.
  bool step_if_unchanged(const c10::TensorImpl* const* impls, double momentum,
                         const at::Tensor* momentum_tensor);

  // The checks of a step of these lists, writing nothing (a changed or new handle is
  // re-validated and, on a device with a C++ kernel, planned): raises what step() would.
  void validate(at::TensorList teacher, at::TensorList student);

  // Whether the tensors `impls` (as for step_if_unchanged) are those of the plan, unchanged.
  // (A handle of subclass tensors, whose steps all go through the op, always matches.)
  bool matches(const c10::TensorImpl* const* impls) {
    std::lock_guard<std::mutex> lock(mutex_);
    return opaque_ || unchanged(impls);
  }

  size_t size() const { return size_; }
  // Plans built by this handle (1 at construction, +1 per re-plan).
  int64_t plans_built() const { return plans_built_; }
  // The plan's table (undefined before a plan exists).
  at::Tensor table() const { return plan_ ? plan_->table : at::Tensor(); }

 private:
  bool unchanged(const c10::TensorImpl* const* impls) const;
  bool a_teacher_requires_grad() const;
  void launch(double momentum, const at::Tensor* momentum_tensor);
  void replan(at::TensorList teacher, at::TensorList student, const char* build_refused);
  void remember(at::TensorList teacher, at::TensorList student);

  std::mutex mutex_;  // one step at a time (steps run without the GIL)
  // No owned references to the tensors: those would raise the TensorImpls' use counts, which
  // torch.utils.swap_tensors (and so nn.Module.to with swapping on) refuses.
  at::Device plan_device_{at::kCPU};
  c10::DeviceType built_for_ = c10::DeviceType::CPU;
  size_t size_ = 0;
  std::shared_ptr<const EmaPlan> plan_;
  bool kept_for_graphs_ = false;
  bool replan_on_change_ = true;
  bool opaque_ = false;  // a tensor is not plain: every step goes through the op
  const EmaLauncher* launcher_ = nullptr;  // null: these tensors need the dispatcher
  TensorSnapshots seen_;                   // teacher[i] at 2i, student[i] at 2i + 1
  bool parallel_ = false;                  // split the checks across threads
  int64_t plans_built_ = 0;
};

}  // namespace eman_fused
