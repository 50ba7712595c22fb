#include "ema/handle.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <atomic>

#include "common/parallel_chunks.h"

namespace eman_fused {
namespace {

// Plain dense tensors only: a subclass (Python key) or a functional/fake wrapper needs the op.
bool plain(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (!t.defined() || t.layout() != at::kStrided) return false;
    if (needs_dispatcher(t.key_set())) return false;
  }
  return true;
}

// The current TensorImpls of teacher[i] (at 2i) and student[i] (at 2i + 1).
std::vector<const c10::TensorImpl*> impls_of(at::TensorList teacher, at::TensorList student) {
  std::vector<const c10::TensorImpl*> impls;
  impls.reserve(2 * teacher.size());
  for (size_t i = 0; i < teacher.size(); ++i) {
    impls.push_back(teacher[i].unsafeGetTensorImpl());
    impls.push_back(student[i].unsafeGetTensorImpl());
  }
  return impls;
}

// The op's momentum checks (a 0-dim tensor on `device`, or a float in [0, 1]).
void check_momentum(double momentum, const at::Tensor* momentum_tensor, const at::Device& device) {
  if (momentum_tensor != nullptr) {
    check_momentum_tensor(*momentum_tensor, device);
  } else {
    check_momentum_value(momentum);
  }
}

}  // namespace

EmaHandle::EmaHandle(at::TensorList teacher, at::TensorList student, bool replan_on_change,
                     bool plan)
    : replan_on_change_(replan_on_change) {
  check_lengths(teacher, student);
  size_ = teacher.size();
  if (size_ > 0) built_for_ = teacher[0].device().type();
  // What the tensors are now, so that a change before the first step is seen too.
  remember(teacher, student);
  // Subclass tensors, or tensors on a device without a C++ kernel (e.g. unpickled onto the meta
  // device): nothing to plan; every step then goes through the op.
  if (!plan || opaque_ || (size_ > 0 && ema_launcher(built_for_) == nullptr)) return;
  replan(teacher, student, nullptr);
}

void EmaHandle::remember(at::TensorList teacher, at::TensorList student) {
  seen_.clear();
  seen_.reserve(2 * size_);
  // Only plain tensors can be asked for their data and geometry without the dispatcher; a
  // handle of others (subclasses) leaves every step to the op.
  opaque_ = !(plain(teacher) && plain(student));
  if (opaque_) return;
  for (size_t i = 0; i < size_; ++i) {
    for (const at::Tensor* x : {&teacher[i], &student[i]}) {
      const c10::TensorImpl* impl = x->unsafeGetTensorImpl();
      // A copy-on-write teacher gets its own memory now (the handle is built to write it), so
      // the address remembered is the one its steps will write.
      if (x == &teacher[i] && copy_on_write(impl)) x->unsafeGetTensorImpl()->mutable_data();
      seen_.add(impl, /*written=*/x == &teacher[i]);
    }
  }
}

void EmaHandle::replan(at::TensorList teacher, at::TensorList student, const char* build_refused) {
  // Validation and the plan come from the shared cache (a hit when these exact tensors were
  // planned before, e.g. by ema_update_), so both paths refuse and accept the same lists.
  // The launcher is set last: if anything below throws, the handle is left unplanned (every
  // step then takes the checked path again), never half-planned.
  launcher_ = nullptr;
  plan_ = get_ema_plan(teacher, student, build_refused);
  kept_for_graphs_ = false;
  ++plans_built_;
  plan_device_ = size_ > 0 ? teacher[0].device() : at::Device(at::kCPU);
  // Checks split across threads only where the CPU kernel itself goes parallel and there are
  // enough tensors for the split to pay (common/parallel_chunks.h).
  int64_t elements = 0;
  for (size_t i = 0; i < size_; ++i) elements += teacher[i].numel();
  parallel_ = plan_device_.is_cpu() && size_ >= 1024 && elements >= kSerialElements;
  remember(teacher, student);  // (sets opaque_: subclass tensors get no launcher)
  launcher_ = size_ > 0 && !opaque_ ? ema_launcher(plan_device_.type()) : nullptr;
}

bool EmaHandle::unchanged(const c10::TensorImpl* const* impls) const {
  if (opaque_) return false;
  const size_t n = 2 * size_;
  // Each check waits on two cache (and TLB) misses (a model's TensorImpls and StorageImpls
  // are scattered, and the update's own data stream evicts them between steps): in a plan that
  // runs on several threads anyway, the checks are split between them too.
  if (!parallel_ || at::get_num_threads() == 1 || at::in_parallel_region()) {
    return seen_.unchanged_range(impls, 0, n);
  }
  std::atomic<bool> same{true};
  at::parallel_for(0, static_cast<int64_t>(n), static_cast<int64_t>(n) / at::get_num_threads() + 1,
                   [&](int64_t begin, int64_t end) {
                     if (!seen_.unchanged_range(impls, static_cast<size_t>(begin), static_cast<size_t>(end))) {
                       same.store(false, std::memory_order_relaxed);
                     }
                   });
  return same.load(std::memory_order_relaxed);
}

bool EmaHandle::a_teacher_requires_grad() const {
  for (size_t i = 0; i < size_; ++i) {
    if (seen_.impl(2 * i)->requires_grad()) return true;
  }
  return false;
}

void EmaHandle::launch(double momentum, const at::Tensor* momentum_tensor) {
  if (!kept_for_graphs_ && launcher_->capturing != nullptr && launcher_->capturing()) {
    keep_ema_plan_for_graphs(plan_);
    kept_for_graphs_ = true;
  }
  for (size_t i = 0; i < size_; ++i) const_cast<c10::TensorImpl*>(seen_.impl(2 * i))->bump_version();
  launcher_->launch(*plan_, plan_device_, momentum, momentum_tensor);
}

bool EmaHandle::step_if_unchanged(const c10::TensorImpl* const* impls, double momentum,
                                  const at::Tensor* momentum_tensor) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (size_ == 0) return true;
  if (launcher_ == nullptr || !dispatcher_would_go_straight_to_kernel() || !unchanged(impls)) {
    return false;
  }
  // A teacher autograd tracks is refused (with its index named) by step()'s checks.
  if (at::GradMode::is_enabled() && a_teacher_requires_grad()) return false;
  check_momentum(momentum, momentum_tensor, plan_device_);
  launch(momentum, momentum_tensor);
  return true;
}

void EmaHandle::validate(at::TensorList teacher, at::TensorList student) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_lengths(teacher, student);
  TORCH_CHECK(teacher.size() == size_, "ema handle: built for ", size_, " pairs, given ",
              teacher.size());
  if (size_ == 0) return;
  const std::vector<const c10::TensorImpl*> impls = impls_of(teacher, student);
  if (launcher_ != nullptr && unchanged(impls.data())) return;  // planned: validated
  const EmaLauncher* now = ema_launcher(teacher[0].device().type());
  if (opaque_ || now == nullptr || teacher[0].device().type() != built_for_) {
    validate_ema_lists(teacher, student);
    return;
  }
  replan(teacher, student, now->build_refused ? now->build_refused() : nullptr);
}

EmaStep EmaHandle::step(at::TensorList teacher, at::TensorList student, double momentum,
                        const at::Tensor* momentum_tensor) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_lengths(teacher, student);
  TORCH_CHECK(teacher.size() == size_, "ema handle: built for ", size_, " pairs, given ",
              teacher.size());
  if (size_ == 0) return EmaStep::kUpdated;
  const std::vector<const c10::TensorImpl*> impls = impls_of(teacher, student);
  if (opaque_) return EmaStep::kUseOp;  // subclass tensors: the dispatcher routes them
  const bool same = unchanged(impls.data());
  // An owner that re-matches its lists hears of every change, even one the op would run.
  if (!same && !replan_on_change_) return EmaStep::kChanged;
  if (!dispatcher_would_go_straight_to_kernel()) return EmaStep::kUseOp;
  if (teacher[0].device().type() != built_for_) return EmaStep::kUseOp;
  const EmaLauncher* now = ema_launcher(built_for_);
  if (now == nullptr) return EmaStep::kUseOp;  // a device without a C++ kernel: the op says so
  // The momentum and grad-mode checks of the op come before the lists' (as in the op).
  check_momentum(momentum, momentum_tensor, teacher[0].device());
  check_teacher_grad_mode(teacher);
  if (launcher_ == nullptr || !same) {
    // What changed is validated again before anything is written.
    replan(teacher, student, now->build_refused ? now->build_refused() : nullptr);
    if (launcher_ == nullptr) return EmaStep::kUseOp;  // a subclass: the dispatcher routes it
  }
  launch(momentum, momentum_tensor);
  return EmaStep::kUpdated;
}

}  // namespace eman_fused
