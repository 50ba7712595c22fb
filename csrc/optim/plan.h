// Validation shared by every backend of the fused optimizer steps (SGD, AdamW + EMA teacher).
#pragma once
#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <vector>

#include "common/dtype.h"
#include "common/multi_tensor_plan.h"
#include "optim/layout.h"

namespace eman_fused {

struct SgdArgs {
  double lr, momentum, dampening;
  bool nesterov;
  double weight_decay;
  bool maximize;
  double teacher_momentum;
};

struct AdamWArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool amsgrad, maximize;
  double teacher_momentum;
};

struct LarsArgs {
  double lr, momentum, weight_decay, trust_coefficient;
  bool maximize;
  double teacher_momentum;
};

// Every list is checked before anything is written: lengths, dtypes (float32, bfloat16 or
// float16 params, one dtype per call, grads and state in the param's dtype; float32/bfloat16/
// float16 teachers, one dtype per call), devices, shapes and memory layouts per index,
// hyper-parameters in range.
void check_sgd_ema(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                   at::TensorList teacher, c10::ArrayRef<int64_t> first, const SgdArgs& a);
void check_adamw_ema(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList teacher, c10::ArrayRef<double> step_sizes,
                     c10::ArrayRef<double> bias_correction2_sqrts, const AdamWArgs& a);
void check_lars_ema(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                    at::TensorList teacher, c10::ArrayRef<int64_t> adapt,
                    c10::ArrayRef<int64_t> first, const LarsArgs& a);
void bump_versions(std::initializer_list<at::TensorList> lists);

// The per-call table of a fused optimizer step, in host memory (entries: optim/layout.h).
// states: up to three per-param state lists (absent lists empty); flags/scalar0/scalar1: per
// param, or empty for all zeros.
using OptimPlan = MultiTensorPlan<OptimEntry>;
OptimPlan build_optim_table(at::TensorList params, at::TensorList grads,
                             std::initializer_list<at::TensorList> states, at::TensorList teacher,
                             c10::ArrayRef<int64_t> flags, c10::ArrayRef<double> scalar0,
                             c10::ArrayRef<double> scalar1, bool pinned);
// Each op's checks, table and version bumps (the shared prologue of the CPU and CUDA kernels):
// nothing is written unless every check passed.
OptimPlan prepare_sgd(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                       at::TensorList teacher, c10::ArrayRef<int64_t> first, const SgdArgs& a,
                       bool pinned);
OptimPlan prepare_adamw(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::TensorList teacher, c10::ArrayRef<double> step_sizes,
                         c10::ArrayRef<double> bias_correction2_sqrts, const AdamWArgs& a,
                         bool pinned);
OptimPlan prepare_lars(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                        at::TensorList teacher, c10::ArrayRef<int64_t> adapt,
                        c10::ArrayRef<int64_t> first, const LarsArgs& a, bool pinned);
// The same checks and table without the bumps, for backends that launch from Python (Triton;
// their custom ops bump versions): the host int64 table of optim/layout.h.
at::Tensor sgd_ema_table(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                         at::TensorList teacher, c10::ArrayRef<int64_t> first, double lr,
                         double momentum, double dampening, bool nesterov, double weight_decay,
                         bool maximize, double teacher_momentum);
at::Tensor adamw_ema_table(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                           at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                           at::TensorList teacher, c10::ArrayRef<double> step_sizes,
                           c10::ArrayRef<double> bias_correction2_sqrts, double lr, double beta1,
                           double beta2, double eps, double weight_decay, bool amsgrad,
                           bool maximize, double teacher_momentum);
at::Tensor lars_ema_table(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                          at::TensorList teacher, c10::ArrayRef<int64_t> adapt,
                          c10::ArrayRef<int64_t> first, double lr, double momentum,
                          double weight_decay, double trust_coefficient, bool maximize,
                          double teacher_momentum);
// The device scalars of the capturable variants: `lr` and `teacher_momentum` 0-dim float32 on
// the params' device (range-checked where reading them costs no synchronization: the CPU);
// `steps` (AdamW) one 0-dim float32 per param, there too.
void check_capturable_scalars(const char* op, at::TensorList params, const at::Tensor& lr,
                              const at::Tensor& teacher_momentum, at::TensorList steps);
// A table's step pointers (capturable AdamW), set after build_optim_table.
void set_step_pointers(OptimPlan& table, at::TensorList steps);
// LARS's per-param table flags from its adapt / first lists.
std::vector<int64_t> lars_flags(c10::ArrayRef<int64_t> adapt, c10::ArrayRef<int64_t> first);
// The teachers' dtype (one per call; kAbsent without a teacher) and the params' (and their
// grads' and state's), after the checks admitted only float32, bfloat16 and float16.
FloatTag teacher_tag(at::TensorList teacher);
FloatTag param_tag(at::TensorList params);

}  // namespace eman_fused
