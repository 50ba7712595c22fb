// The fused optimizer steps' schemas (SGD, AdamW, LARS + EMA teacher), their Autograd kernels,
// and the table ops that the Triton kernels read. CPU and CUDA kernels: optim/cpu.cpp,
// optim/cuda_host.cpp; fake kernels: eman_fused/ops/optim.py.
#include <torch/library.h>

#include "common/below_autograd.h"
#include "optim/plan.h"

namespace eman_fused {
namespace {

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(eman_fused, m) {
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
  m.impl("lars_ema_step_", c10::DispatchKey::Autograd, &BelowAutograd<kLarsName, kDefaultOverload, LarsSig>::call);
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
         &BelowAutograd<kLarsName, kCapturableOverload, LarsCapSig>::call);
  m.impl("sgd_ema_step_.capturable", c10::DispatchKey::Autograd,
         &BelowAutograd<kSgdName, kCapturableOverload, SgdCapSig>::call);
  m.impl("adamw_ema_step_.capturable", c10::DispatchKey::Autograd,
         &BelowAutograd<kAdamWName, kCapturableOverload, AdamWCapSig>::call);
  m.impl("sgd_ema_step_", c10::DispatchKey::Autograd, &BelowAutograd<kSgdName, kDefaultOverload, SgdSig>::call);
  m.impl("adamw_ema_step_", c10::DispatchKey::Autograd, &BelowAutograd<kAdamWName, kDefaultOverload, AdamWSig>::call);
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
}

}  // namespace eman_fused
