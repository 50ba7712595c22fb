// The one place where eman_fused's operator schemas are declared. Kernels register per
// dispatch key in cpu/ and cuda/; fake (meta) kernels are registered from Python (ops.py).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cpu/isa.h"
#include "norm.h"
#include "optim.h"
#include "plan.h"

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

// The update has no differentiable output; this kernel only steps below autograd. Registered
// explicitly so an unboxed call stays unboxed (the autograd fallback would box both lists).
void ema_update_autograd(at::TensorList teacher, at::TensorList student, double momentum) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("eman_fused::ema_update_", "")
                             .typed<void(at::TensorList, at::TensorList, double)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  op.call(teacher, student, momentum);
}

void ema_update_tensor_autograd(at::TensorList teacher, at::TensorList student,
                                const at::Tensor& momentum) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("eman_fused::ema_update_", "tensor")
                             .typed<void(at::TensorList, at::TensorList, const at::Tensor&)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  op.call(teacher, student, momentum);
}

// The per-call checks of every backend's update, for backends written outside C++ (Triton).
void ema_check_call(at::TensorList teacher, double momentum) {
  check_momentum_value(momentum);
  check_teacher_grad_mode(teacher);
}

void ema_check_call_tensor(at::TensorList teacher, const at::Tensor& momentum) {
  if (!teacher.empty()) check_momentum_tensor(momentum, teacher[0].device());
  check_teacher_grad_mode(teacher);
}

void eman_norm_check(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                     double eps, const std::optional<at::Tensor>& residual) {
  check_eman_norm(x, mean, var, weight, bias, eps, residual);
}

// The fused optimizer steps write params, state and teachers in place and have no
// differentiable output: this kernel only steps below autograd (callers run under no_grad).
template <const char* Name, const char* Overload, typename Sig>
struct BelowAutograd;
template <const char* Name, const char* Overload, typename... Args>
struct BelowAutograd<Name, Overload, void(Args...)> {
  static void call(Args... args) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow(Name, Overload)
                               .typed<void(Args...)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    op.call(args...);
  }
};
constexpr char kDefault[] = "";
constexpr char kCapturable[] = "capturable";
constexpr char kSgdName[] = "eman_fused::sgd_ema_step_";
constexpr char kAdamWName[] = "eman_fused::adamw_ema_step_";
constexpr char kLarsName[] = "eman_fused::lars_ema_step_";
using LarsSig = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                     c10::ArrayRef<int64_t>, c10::ArrayRef<int64_t>, double, double, double,
                     double, bool, double);
using SgdSig = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                    c10::ArrayRef<int64_t>, double, double, double, bool, double, bool, double);
using AdamWSig = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                      at::TensorList, at::TensorList, c10::ArrayRef<double>,
                      c10::ArrayRef<double>, double, double, double, double, double, bool, bool,
                      double);
using SgdCapSig = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                       c10::ArrayRef<int64_t>, const at::Tensor&, double, double, bool, double,
                       bool, const at::Tensor&);
using LarsCapSig = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                        c10::ArrayRef<int64_t>, c10::ArrayRef<int64_t>, const at::Tensor&, double,
                        double, double, bool, const at::Tensor&);
using AdamWCapSig = void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                         at::TensorList, at::TensorList, at::TensorList, const at::Tensor&, double,
                         double, double, double, bool, bool, const at::Tensor&);

std::string cpu_isa_name() { return cpu_isa() == CpuIsa::kAvx2 ? "avx2" : "baseline x86-64"; }

int64_t ema_plan_builds_op() { return ema_plan_builds(); }

void clear_ema_plan_cache_op() { clear_ema_plan_cache(); }

}  // namespace

TORCH_LIBRARY(eman_fused, m) {
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
  m.impl("ema_update_", c10::DispatchKey::Autograd, &ema_update_autograd);
  m.impl("ema_update_.tensor", c10::DispatchKey::Autograd, &ema_update_tensor_autograd);
  // EMAN normalization with running statistics: y = act(x*scale[c] + shift[c] + residual),
  // scale = weight * rsqrt(running_var + eps), shift = bias - running_mean * scale.
  m.def("eman_norm(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, "
        "Tensor? bias, float eps, Tensor? residual, bool relu) -> Tensor");
  // Frozen-statistics gradients in one pass: (grad_x, grad_residual, grad_weight, grad_bias);
  // `out` (the forward's output) gives the ReLU mask. Masked-out results are undefined.
  m.def("eman_norm_backward(Tensor grad, Tensor x, Tensor? out, Tensor running_mean, "
        "Tensor running_var, Tensor? weight, float eps, bool relu, bool[4] output_mask) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  // eman_norm's validation, for backends written outside C++ (Triton).
  m.def("_eman_norm_check(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, "
        "Tensor? bias, float eps, Tensor? residual) -> ()");
  m.impl("_eman_norm_check", c10::DispatchKey::CompositeExplicitAutograd, &eman_norm_check);
  // The checks the update runs on every call (momentum, grad mode), for Python backends.
  m.def("_ema_check_call(Tensor[] teacher, float momentum) -> ()");
  m.def("_ema_check_call.tensor(Tensor[] teacher, Tensor momentum) -> ()");
  m.impl("_ema_check_call", c10::DispatchKey::CompositeExplicitAutograd, &ema_check_call);
  m.impl("_ema_check_call.tensor", c10::DispatchKey::CompositeExplicitAutograd,
         &ema_check_call_tensor);
  // Fused optimizer steps: the student's params and state, and (teacher non-empty) the EMA
  // teacher of each param from the new value, in one pass. `first[i]` != 0: params[i]'s momentum
  // buffer is new (set to the gradient, as torch.optim.SGD does on its first step).
  m.def("sgd_ema_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] teacher, int[] first, float lr, float momentum, float dampening, "
        "bool nesterov, float weight_decay, bool maximize, float teacher_momentum) -> ()");
  // AdamW (decoupled weight decay); the per-param bias corrections come from each param's step:
  // step_sizes[i] = lr / (1 - beta1^step), bias_correction2_sqrts[i] = sqrt(1 - beta2^step).
  m.def("adamw_ema_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] teacher, "
        "float[] step_sizes, float[] bias_correction2_sqrts, float lr, float beta1, float beta2, "
        "float eps, float weight_decay, bool amsgrad, bool maximize, float teacher_momentum) -> ()");
  // LARS (BYOL/SimCLR): two passes, per-tensor norms then the update. adapt[i] != 0: params[i]
  // gets weight decay and the trust ratio trust_coefficient * |p| / |g + wd p|; others (biases,
  // BatchNorm) plain momentum SGD. first[i] != 0: a new momentum buffer.
  m.def("lars_ema_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!)[] teacher, int[] adapt, int[] first, float lr, float momentum, "
        "float weight_decay, float trust_coefficient, bool maximize, float teacher_momentum) -> ()");
  m.impl("lars_ema_step_", c10::DispatchKey::Autograd, &BelowAutograd<kLarsName, kDefault, LarsSig>::call);
  // Capturable variants: lr and the teacher momentum as 0-dim float32 tensors on the params'
  // device, and (AdamW) each param's step count there, read by the kernels: no host value per
  // step, so a CUDA graph can replay the step while schedules move those tensors.
  m.def("sgd_ema_step_.capturable(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] "
        "momentum_buffers, Tensor(c!)[] teacher, int[] first, Tensor lr, float momentum, "
        "float dampening, bool nesterov, float weight_decay, bool maximize, "
        "Tensor teacher_momentum) -> ()");
  m.def("adamw_ema_step_.capturable(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] teacher, "
        "Tensor[] steps, Tensor lr, float beta1, float beta2, float eps, float weight_decay, "
        "bool amsgrad, bool maximize, Tensor teacher_momentum) -> ()");
  m.def("lars_ema_step_.capturable(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] "
        "momentum_buffers, Tensor(c!)[] teacher, int[] adapt, int[] first, Tensor lr, "
        "float momentum, float weight_decay, float trust_coefficient, bool maximize, "
        "Tensor teacher_momentum) -> ()");
  m.impl("lars_ema_step_.capturable", c10::DispatchKey::Autograd,
         &BelowAutograd<kLarsName, kCapturable, LarsCapSig>::call);
  m.impl("sgd_ema_step_.capturable", c10::DispatchKey::Autograd,
         &BelowAutograd<kSgdName, kCapturable, SgdCapSig>::call);
  m.impl("adamw_ema_step_.capturable", c10::DispatchKey::Autograd,
         &BelowAutograd<kAdamWName, kCapturable, AdamWCapSig>::call);
  m.impl("sgd_ema_step_", c10::DispatchKey::Autograd, &BelowAutograd<kSgdName, kDefault, SgdSig>::call);
  m.impl("adamw_ema_step_", c10::DispatchKey::Autograd, &BelowAutograd<kAdamWName, kDefault, AdamWSig>::call);
  // The checks and table of a step without writing (for the Triton kernels; host int64).
  m.def("_sgd_ema_table(Tensor[] params, Tensor[] grads, Tensor[] momentum_buffers, "
        "Tensor[] teacher, int[] first, float lr, float momentum, float dampening, "
        "bool nesterov, float weight_decay, bool maximize, float teacher_momentum) -> Tensor");
  m.impl("_sgd_ema_table", c10::DispatchKey::CompositeExplicitAutograd, &sgd_ema_table);
  m.def("_adamw_ema_table(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, "
        "Tensor[] exp_avg_sqs, Tensor[] max_exp_avg_sqs, Tensor[] teacher, "
        "float[] step_sizes, float[] bias_correction2_sqrts, float lr, float beta1, float beta2, "
        "float eps, float weight_decay, bool amsgrad, bool maximize, float teacher_momentum) -> Tensor");
  m.impl("_adamw_ema_table", c10::DispatchKey::CompositeExplicitAutograd, &adamw_ema_table);
  m.def("_lars_ema_table(Tensor[] params, Tensor[] grads, Tensor[] momentum_buffers, "
        "Tensor[] teacher, int[] adapt, int[] first, float lr, float momentum, "
        "float weight_decay, float trust_coefficient, bool maximize, float teacher_momentum) -> Tensor");
  m.impl("_lars_ema_table", c10::DispatchKey::CompositeExplicitAutograd, &lars_ema_table);
  // The instruction set the CPU kernels chose (runtime dispatch; EMAN_FUSED_CPU_ISA overrides).
  m.def("_cpu_isa() -> str", &cpu_isa_name);
  // Test hooks for the plan cache.
  m.def("_ema_plan_builds() -> int", &ema_plan_builds_op);
  m.def("_clear_ema_plan_cache() -> ()", &clear_ema_plan_cache_op);
}

}  // namespace eman_fused
