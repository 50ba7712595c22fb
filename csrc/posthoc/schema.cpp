// posthoc_ema_update_'s schema, its Autograd and "no kernel for this device" kernels.
// CPU and CUDA kernels: posthoc/cpu.cpp, posthoc/cuda_host.cpp; fake kernel:
// eman_fused/ops/posthoc.py.
#include <torch/library.h>

#include "common/below_autograd.h"
#include "ema/plan.h"
#include "posthoc/plan.h"

namespace eman_fused {
namespace {

void posthoc_no_kernel(at::TensorList profiles, at::TensorList student, const at::Tensor&,
                       c10::ArrayRef<double> gammas) {
  const int64_t k = check_posthoc_lists(profiles, student, gammas);
  std::vector<at::Tensor> rep;
  for (int64_t j = 0; j < k; ++j) rep.insert(rep.end(), student.begin(), student.end());
  validate_ema_lists(profiles, rep);
  TORCH_CHECK_NOT_IMPLEMENTED(false, "posthoc_ema_update_: eman_fused has no kernel for tensors on ",
                              profiles.empty() ? std::string("this device")
                                               : profiles[0].device().str(),
                              "; see eman_fused.backends()");
}

int64_t posthoc_plan_builds_op() { return posthoc_plan_builds(); }

// Every check of a call (lists, gammas, step, grad mode), then the cached plan's table: the
// Triton kernel and the emulated CUDA tests walk the table the C++ kernels walk.
at::Tensor posthoc_plan(at::TensorList profiles, at::TensorList student, const at::Tensor& step,
                        c10::ArrayRef<double> gammas) {
  const int64_t k = check_posthoc_lists(profiles, student, gammas);
  if (!profiles.empty()) {
    check_posthoc_step(step, profiles[0].device());
    check_posthoc_grad_mode(profiles);
  }
  return get_posthoc_plan(profiles, student, k)->table;
}

constexpr char kPosthocName[] = "eman_fused::posthoc_ema_update_";
using PosthocSig = void(at::TensorList, at::TensorList, const at::Tensor&, c10::ArrayRef<double>);

}  // namespace

TORCH_LIBRARY_FRAGMENT(eman_fused, m) {
  // K power-function EMA profiles (EDM2) in one pass: with t = step + 1 (step counts the
  // updates done so far; the op then stores t there) and beta_k = (1 - 1/t)^(gammas[k] + 1), profile k <- beta_k * profile k +
  // (1 - beta_k) * student for floating tensors, <- student for integer ones. profiles holds
  // the K lists back to back (profile k's copy of student[i] at k * N + i). step is a 0-dim
  // int64 tensor on the profiles' device, read and advanced on the device (CUDA-graph
  // friendly); a rejected call leaves it, like the profiles, untouched.
  m.def("posthoc_ema_update_(Tensor(a!)[] profiles, Tensor[] student, Tensor(b!) step, "
        "float[] gammas) -> ()");
  m.impl("posthoc_ema_update_", c10::DispatchKey::CompositeExplicitAutograd, &posthoc_no_kernel);
  m.impl("posthoc_ema_update_", c10::DispatchKey::Autograd,
         &BelowAutograd<kPosthocName, kDefaultOverload, PosthocSig>::call);
  m.def("_posthoc_plan_builds() -> int", &posthoc_plan_builds_op);
  m.def("posthoc_plan(Tensor[] profiles, Tensor[] student, Tensor step, float[] gammas) -> Tensor");
  m.impl("posthoc_plan", c10::DispatchKey::CompositeExplicitAutograd, &posthoc_plan);
}

}  // namespace eman_fused
