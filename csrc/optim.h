// Validation shared by every backend of the fused optimizer steps (SGD, AdamW + EMA teacher).
#pragma once
#include <ATen/core/Tensor.h>

#include <initializer_list>

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

// Every list is checked before anything is written: lengths, dtypes (float32 params, grads and
// state; float32/bfloat16/float16 teachers), devices, shapes and memory layouts per index,
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

}  // namespace eman_fused
