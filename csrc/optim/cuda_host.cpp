// CUDA registrations of the fused optimizer steps: validation and the step's table from
// optim.cpp (the same as the CPU path), the table copied to the device asynchronously from
// pinned memory, launches from optim.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <list>
#include <mutex>
#include <vector>

#include "optim/plan.h"
#include "optim/cuda.h"

namespace eman_fused {
namespace {

// The step's table on the device (the same layout as the host copy it was made from).
OptimPlan on_device(const OptimPlan& host, at::Tensor device_table) {
  OptimPlan d;
  d.table = std::move(device_table);
  d.num_tensors = host.num_tensors;
  d.num_chunks = host.num_chunks;
  return d;
}

// The table goes host -> device on the current stream (pinned, non-blocking): a CUDA graph
// could not replay that copy with the next step's values, so capture is refused.
OptimPlan to_device(const char* op, const OptimPlan& host, const at::Device& device) {
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              op, ": the fused optimizer steps cannot be captured in a CUDA graph yet ",
              "(their table is copied from the host at each step)");
  return on_device(host, host.table.to(device, /*non_blocking=*/true));
}

// Capturable steps reuse a device copy of an identical table (same pointers and flags): the
// copy is made outside capture (warm-up steps), and a captured step only reads it.
OptimPlan cached_device_table(const char* op, const OptimPlan& host, const at::Device& device) {
  struct Entry {
    std::vector<int64_t> key;
    OptimPlan table;
  };
  static std::mutex mutex;
  // Most recent first; a handful of param groups per model. Never destroyed: device memory
  // must not be freed during static destruction, after the CUDA context may be gone.
  static auto& cache = *new std::list<Entry>();
  const int64_t* words = host.table.const_data_ptr<int64_t>();
  std::vector<int64_t> key(words, words + host.table.numel());
  key.push_back(device.index());
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if (it->key == key) {
        cache.splice(cache.begin(), cache, it);
        return cache.front().table;
      }
    }
  }
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              op, ": no device table for these tensors yet and a CUDA graph is being captured; run ",
              "two steps before capture (the first step's momentum buffers change the table)");
  OptimPlan d = on_device(host, host.table.to(device));
  std::lock_guard<std::mutex> lock(mutex);
  cache.push_front({std::move(key), d});
  if (cache.size() > 32) cache.pop_back();
  return d;
}

float sign_of(bool maximize) { return maximize ? -1.0f : 1.0f; }

void sgd_ema_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                       at::TensorList teacher, c10::ArrayRef<int64_t> first, double lr,
                       double momentum, double dampening, bool nesterov, double weight_decay,
                       bool maximize, double teacher_momentum) {
  const SgdArgs a{lr, momentum, dampening, nesterov, weight_decay, maximize, teacher_momentum};
  if (params.empty()) return check_sgd_ema(params, grads, bufs, teacher, first, a);
  const OptimPlan host = prepare_sgd(params, grads, bufs, teacher, first, a, true);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const OptimPlan d = to_device("sgd_ema_step_", host, params[0].device());
  const SgdHyper h{static_cast<float>(lr), static_cast<float>(momentum),
                   static_cast<float>(dampening), static_cast<float>(weight_decay),
                   sign_of(maximize), static_cast<float>(teacher_momentum), nesterov, nullptr,
                   nullptr};
  C10_CUDA_CHECK(launch_sgd_ema(d.entries(), d.chunks(), d.num_chunks, param_tag(params),
                                teacher_tag(teacher), h,
                                c10::cuda::getCurrentCUDAStream().stream()));
}

void adamw_ema_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::TensorList teacher, c10::ArrayRef<double> step_sizes,
                         c10::ArrayRef<double> bias_correction2_sqrts, double lr, double beta1,
                         double beta2, double eps, double weight_decay, bool amsgrad,
                         bool maximize, double teacher_momentum) {
  const AdamWArgs a{lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, teacher_momentum};
  if (params.empty()) {
    return check_adamw_ema(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, teacher,
                           step_sizes, bias_correction2_sqrts, a);
  }
  const OptimPlan host = prepare_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                        teacher, step_sizes, bias_correction2_sqrts, a, true);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const OptimPlan d = to_device("adamw_ema_step_", host, params[0].device());
  const AdamWHyper h{static_cast<float>(lr), beta1, beta2, static_cast<float>(eps),
                     static_cast<float>(weight_decay), sign_of(maximize),
                     static_cast<float>(teacher_momentum), nullptr, nullptr};
  C10_CUDA_CHECK(launch_adamw_ema(d.entries(), d.chunks(), d.num_chunks, param_tag(params),
                                  teacher_tag(teacher), h,
                                  c10::cuda::getCurrentCUDAStream().stream()));
}

void lars_ema_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                        at::TensorList teacher, c10::ArrayRef<int64_t> adapt,
                        c10::ArrayRef<int64_t> first, double lr, double momentum,
                        double weight_decay, double trust_coefficient, bool maximize,
                        double teacher_momentum) {
  const LarsArgs a{lr, momentum, weight_decay, trust_coefficient, maximize, teacher_momentum};
  if (params.empty()) return check_lars_ema(params, grads, bufs, teacher, adapt, first, a);
  const OptimPlan host = prepare_lars(params, grads, bufs, teacher, adapt, first, a, true);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const OptimPlan d = to_device("lars_ema_step_", host, params[0].device());
  at::Tensor partials = at::empty({2 * std::max<int64_t>(1, d.num_chunks)},
                                  params[0].options().dtype(at::kDouble));
  const LarsHyper h{static_cast<float>(lr), static_cast<float>(momentum),
                    static_cast<float>(weight_decay), static_cast<float>(trust_coefficient),
                    sign_of(maximize), static_cast<float>(teacher_momentum), nullptr, nullptr};
  C10_CUDA_CHECK(launch_lars_ema(d.entries(), d.chunks(), d.num_chunks, param_tag(params),
                                 teacher_tag(teacher), h,
                                 partials.mutable_data_ptr<double>(),
                                 c10::cuda::getCurrentCUDAStream().stream()));
}

void sgd_ema_step_capturable_cuda(at::TensorList params, at::TensorList grads,
                                  at::TensorList bufs, at::TensorList teacher,
                                  c10::ArrayRef<int64_t> first, const at::Tensor& lr,
                                  double momentum, double dampening, bool nesterov,
                                  double weight_decay, bool maximize,
                                  const at::Tensor& teacher_momentum) {
  check_capturable_scalars("sgd_ema_step_", params, lr, teacher_momentum, {});
  // Hyper-parameters given as floats are checked with placeholder lr / momentum values.
  const SgdArgs a{0.0, momentum, dampening, nesterov, weight_decay, maximize, 0.0};
  if (params.empty()) return check_sgd_ema(params, grads, bufs, teacher, first, a);
  const OptimPlan host = prepare_sgd(params, grads, bufs, teacher, first, a, false);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const OptimPlan d = cached_device_table("sgd_ema_step_", host, params[0].device());
  const SgdHyper h{0.0f, static_cast<float>(momentum), static_cast<float>(dampening),
                   static_cast<float>(weight_decay), sign_of(maximize), 0.0f, nesterov,
                   lr.const_data_ptr<float>(), teacher_momentum.const_data_ptr<float>()};
  C10_CUDA_CHECK(launch_sgd_ema(d.entries(), d.chunks(), d.num_chunks, param_tag(params),
                                teacher_tag(teacher), h,
                                c10::cuda::getCurrentCUDAStream().stream()));
}

void adamw_ema_step_capturable_cuda(at::TensorList params, at::TensorList grads,
                                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                    at::TensorList max_exp_avg_sqs, at::TensorList teacher,
                                    at::TensorList steps, const at::Tensor& lr, double beta1,
                                    double beta2, double eps, double weight_decay, bool amsgrad,
                                    bool maximize, const at::Tensor& teacher_momentum) {
  check_capturable_scalars("adamw_ema_step_", params, lr, teacher_momentum, steps);
  const AdamWArgs a{0.0, beta1, beta2, eps, weight_decay, amsgrad, maximize, 0.0};
  const std::vector<double> ones(params.size(), 1.0);  // placeholders: the kernel uses the steps
  if (params.empty()) {
    return check_adamw_ema(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, teacher, ones,
                           ones, a);
  }
  OptimPlan host = prepare_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, teacher,
                                  ones, ones, a, false);
  set_step_pointers(host, steps);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const OptimPlan d = cached_device_table("adamw_ema_step_", host, params[0].device());
  const AdamWHyper h{0.0f, beta1, beta2, static_cast<float>(eps), static_cast<float>(weight_decay),
                     sign_of(maximize), 0.0f, lr.const_data_ptr<float>(),
                     teacher_momentum.const_data_ptr<float>()};
  C10_CUDA_CHECK(launch_adamw_ema(d.entries(), d.chunks(), d.num_chunks, param_tag(params),
                                  teacher_tag(teacher), h,
                                  c10::cuda::getCurrentCUDAStream().stream()));
}

void lars_ema_step_capturable_cuda(at::TensorList params, at::TensorList grads,
                                   at::TensorList bufs, at::TensorList teacher,
                                   c10::ArrayRef<int64_t> adapt, c10::ArrayRef<int64_t> first,
                                   const at::Tensor& lr, double momentum, double weight_decay,
                                   double trust_coefficient, bool maximize,
                                   const at::Tensor& teacher_momentum) {
  check_capturable_scalars("lars_ema_step_", params, lr, teacher_momentum, {});
  const LarsArgs a{0.0, momentum, weight_decay, trust_coefficient, maximize, 0.0};
  if (params.empty()) return check_lars_ema(params, grads, bufs, teacher, adapt, first, a);
  const OptimPlan host = prepare_lars(params, grads, bufs, teacher, adapt, first, a, false);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const OptimPlan d = cached_device_table("lars_ema_step_", host, params[0].device());
  at::Tensor partials = at::empty({2 * std::max<int64_t>(1, d.num_chunks)},
                                  params[0].options().dtype(at::kDouble));
  const LarsHyper h{0.0f, static_cast<float>(momentum), static_cast<float>(weight_decay),
                    static_cast<float>(trust_coefficient), sign_of(maximize), 0.0f,
                    lr.const_data_ptr<float>(), teacher_momentum.const_data_ptr<float>()};
  C10_CUDA_CHECK(launch_lars_ema(d.entries(), d.chunks(), d.num_chunks, param_tag(params),
                                 teacher_tag(teacher), h,
                                 partials.mutable_data_ptr<double>(),
                                 c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CUDA, m) {
  m.impl("lars_ema_step_.capturable", &lars_ema_step_capturable_cuda);
  m.impl("sgd_ema_step_.capturable", &sgd_ema_step_capturable_cuda);
  m.impl("adamw_ema_step_.capturable", &adamw_ema_step_capturable_cuda);
  m.impl("sgd_ema_step_", &sgd_ema_step_cuda);
  m.impl("adamw_ema_step_", &adamw_ema_step_cuda);
  m.impl("lars_ema_step_", &lars_ema_step_cuda);
}

}  // namespace eman_fused
