// Validation and the cached plan of the fused K-profile post-hoc EMA update (every backend).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Stream.h>

#include <memory>
#include <vector>

#include "common/multi_tensor_plan.h"
#include "posthoc/layout.h"

namespace eman_fused {

struct PosthocPlan : MultiTensorPlan<PosthocTensorEntry> {
  c10::Stream alloc_stream{c10::Stream::DEFAULT, c10::Device(c10::kCPU)};
  std::vector<int64_t> work_prefix;  // CPU: work of chunks [0, c), to split threads evenly
};

// `profiles` holds K lists of the student's length back to back: profiles[k * N + i] is
// profile k's copy of student[i]. Checks K against the list lengths and the gammas.
int64_t check_posthoc_lists(at::TensorList profiles, at::TensorList student,
                            c10::ArrayRef<double> gammas);
// The step tensor (updates done so far): 0-dim int64 on the profiles' device; on the CPU its
// value must be >= 0.
void check_posthoc_step(const at::Tensor& step, const at::Device& device);
void check_posthoc_grad_mode(at::TensorList profiles);

// Validates every (profile, student) pair with the EMA update's validation (dtypes, shapes,
// layouts, no aliasing between any profile and any other tensor of the call) and returns the
// plan, cached while the tensors keep their storage, sizes, strides and dtypes.
// `build_refused` non-null: a miss raises with that message (CUDA graph capture).
std::shared_ptr<const PosthocPlan> get_posthoc_plan(at::TensorList profiles,
                                                    at::TensorList student, int64_t k,
                                                    const char* build_refused = nullptr);

int64_t posthoc_plan_builds();

}  // namespace eman_fused
