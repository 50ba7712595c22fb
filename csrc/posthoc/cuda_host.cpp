// posthoc_ema_update_ on CUDA: validation and plan from posthoc/plan.cpp, the launch from
// posthoc/cuda.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ema/plan.h"
#include "posthoc/cuda.h"
#include "posthoc/plan.h"

namespace eman_fused {
namespace {

const char* build_refused_while_capturing() {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    return nullptr;
  }
  return "posthoc_ema_update_: these tensor lists have no cached plan and a CUDA graph is being "
         "captured; run the update once before capture (warm-up) so the plan exists";
}

void posthoc_ema_update_cuda(at::TensorList profiles, at::TensorList student,
                             const at::Tensor& step, c10::ArrayRef<double> gammas) {
  const int64_t k = check_posthoc_lists(profiles, student, gammas);
  TORCH_CHECK_VALUE(!profiles.empty() && profiles[0].is_cuda(), "posthoc_ema_update_: the ",
                    "profiles are on ", profiles.empty() ? std::string("no device")
                                                         : profiles[0].device().str(),
                    " but another argument is on a CUDA device");
  check_posthoc_step(step, profiles[0].device());
  check_posthoc_grad_mode(profiles);
  const c10::cuda::CUDAGuard guard(profiles[0].device());
  auto plan = get_posthoc_plan(profiles, student, k, build_refused_while_capturing());
  for (const at::Tensor& p : profiles) p.unsafeGetTensorImpl()->bump_version();
  step.unsafeGetTensorImpl()->bump_version();
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  if (c10::Stream(stream) != plan->alloc_stream) plan->table.record_stream(stream);
  PosthocGammas g{};
  g.count = k;
  for (int64_t j = 0; j < k; ++j) g.gamma[j] = gammas[j];
  C10_CUDA_CHECK(launch_posthoc_ema_update(plan->entries(), plan->chunks(), plan->num_chunks, g,
                                           step.mutable_data_ptr<int64_t>(), stream.stream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CUDA, m) {
  m.impl("posthoc_ema_update_", &posthoc_ema_update_cuda);
}

}  // namespace eman_fused
