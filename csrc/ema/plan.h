// Validation and the cached multi-tensor plan, shared by every backend (CPU, CUDA, Triton).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/Stream.h>

#include <memory>
#include <vector>

#include "common/multi_tensor_plan.h"
#include "ema/layout.h"

namespace eman_fused {

// The validated, cached table of one pair of lists (entries: ema/layout.h).
struct EmaPlan : MultiTensorPlan<EmaTensorEntry> {
  c10::Stream alloc_stream{c10::Stream::DEFAULT, c10::Device(c10::kCPU)};
  // CPU plans: work_prefix[c] = work of chunks [0, c). Threads split the work evenly, not the
  // chunk count: a model's many tiny tensors (BatchNorm vectors) cluster in a few layers.
  std::vector<int64_t> work_prefix;
};

// Checks that do not depend on the lists' storage and so run on every call.
void check_lengths(at::TensorList teacher, at::TensorList student);
void check_momentum_value(double momentum);
// A 0-dim float32/float64 tensor on `device`; its value is range-checked when on the CPU.
void check_momentum_tensor(const at::Tensor& momentum, const at::Device& device);
void check_teacher_grad_mode(at::TensorList teacher);
// Marks the teachers as modified in place (autograd's version counters), before the write:
// a graph that saved a teacher then fails loudly instead of using changed values.
void bump_teacher_versions(at::TensorList teacher);

// Validates the lists and returns their plan, from the cache when the lists' pointers,
// sizes, strides and dtypes match a cached one (no allocation, no copy), else built anew.
// `build_refused` non-null: a miss raises with that message instead of building
// (used while a CUDA graph is being captured).
std::shared_ptr<const EmaPlan> get_ema_plan(at::TensorList teacher, at::TensorList student,
                                            const char* build_refused = nullptr);

// The same validation as get_ema_plan, without building or caching a plan.
void validate_ema_lists(at::TensorList teacher, at::TensorList student);

// Number of plans built since start (a test hook for cache hits and invalidation).
int64_t ema_plan_builds();
void clear_ema_plan_cache();

}  // namespace eman_fused
