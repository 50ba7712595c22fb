// ema_update_'s schemas, its Autograd and "no kernel for this device" kernels, the plan op and
// the per-call checks for the Triton backend. CPU and CUDA kernels: ema/cpu.cpp,
// ema/cuda_host.cpp; fake kernels: eman_fused/ops/ema.py.
#include <torch/library.h>

#include "common/below_autograd.h"
#include "ema/plan.h"

namespace eman_fused {
namespace {

at::Tensor ema_plan(at::TensorList teacher, at::TensorList student) {
  return get_ema_plan(teacher, student)->table;
}

// Backends without an eman_fused kernel (sparse layouts, MPS, XPU, ...) land here: the same
// validation names what is wrong with the input, else we say that the device has no kernel.
[[noreturn]] void no_kernel_for(at::TensorList teacher, at::TensorList student) {
  validate_ema_lists(teacher, student);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "ema_update_: eman_fused has no kernel for tensors on ",
                              teacher.empty() ? std::string("this device")
                                              : teacher[0].device().str(),
                              "; see eman_fused.backends()");
}

void ema_update_no_kernel(at::TensorList teacher, at::TensorList student, double) {
  no_kernel_for(teacher, student);
}

void ema_update_tensor_no_kernel(at::TensorList teacher, at::TensorList student,
                                 const at::Tensor&) {
  no_kernel_for(teacher, student);
}

constexpr char kEmaName[] = "eman_fused::ema_update_";
using EmaSig = void(at::TensorList, at::TensorList, double);
using EmaTensorSig = void(at::TensorList, at::TensorList, const at::Tensor&);

// The per-call checks of every backend's update, for backends written outside C++ (Triton).
void ema_check_call(at::TensorList teacher, double momentum) {
  check_momentum_value(momentum);
  check_teacher_grad_mode(teacher);
}

void ema_check_call_tensor(at::TensorList teacher, const at::Tensor& momentum) {
  if (!teacher.empty()) check_momentum_tensor(momentum, teacher[0].device());
  check_teacher_grad_mode(teacher);
}

int64_t ema_plan_builds_op() { return ema_plan_builds(); }

void clear_ema_plan_cache_op() { clear_ema_plan_cache(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(eman_fused, m) {
  // teacher <- m * teacher + (1 - m) * student for floating pairs, teacher <- student for
  // integer pairs, in one pass over the whole list.
  m.def("ema_update_(Tensor(a!)[] teacher, Tensor[] student, float momentum) -> ()");
  // The same with a 0-dim momentum tensor on the teachers' device (CUDA-graph friendly).
  m.def("ema_update_.tensor(Tensor(a!)[] teacher, Tensor[] student, Tensor momentum) -> ()");
  // Validates the lists and returns their cached plan table (int64, teachers' device).
  m.def("ema_plan(Tensor[] teacher, Tensor[] student) -> Tensor");
  m.impl("ema_plan", c10::DispatchKey::CompositeExplicitAutograd, &ema_plan);
  m.impl("ema_update_", c10::DispatchKey::CompositeExplicitAutograd, &ema_update_no_kernel);
  m.impl("ema_update_.tensor", c10::DispatchKey::CompositeExplicitAutograd,
         &ema_update_tensor_no_kernel);
  m.impl("ema_update_", c10::DispatchKey::Autograd, &BelowAutograd<kEmaName, kDefaultOverload, EmaSig>::call);
  m.impl("ema_update_.tensor", c10::DispatchKey::Autograd, &BelowAutograd<kEmaName, kTensorOverload, EmaTensorSig>::call);
  // The checks the update runs on every call (momentum, grad mode), for Python backends.
  m.def("_ema_check_call(Tensor[] teacher, float momentum) -> ()");
  m.def("_ema_check_call.tensor(Tensor[] teacher, Tensor momentum) -> ()");
  m.impl("_ema_check_call", c10::DispatchKey::CompositeExplicitAutograd, &ema_check_call);
  m.impl("_ema_check_call.tensor", c10::DispatchKey::CompositeExplicitAutograd,
         &ema_check_call_tensor);
  // Test hooks for the plan cache.
  m.def("_ema_plan_builds() -> int", &ema_plan_builds_op);
  m.def("_clear_ema_plan_cache() -> ()", &clear_ema_plan_cache_op);
}

}  // namespace eman_fused
