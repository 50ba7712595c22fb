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
  // The table's host copy: `table` itself for a CPU plan; for a device plan, the host table it
  // was copied from. Host code that reads entries (the post-hoc planner) reads these: a device
  // plan's `entries()` is a device address.
  at::Tensor host_table;
  const EmaTensorEntry* host_entries() const {
    return reinterpret_cast<const EmaTensorEntry*>(host_table.const_data_ptr<int64_t>());
  }
};

// Checks that do not depend on the lists' storage and so run on every call.
void check_lengths(at::TensorList teacher, at::TensorList student);
void check_momentum_value(double momentum);
// A 0-dim float32/float64 tensor on `device`; its value is range-checked when on the CPU.
void check_momentum_tensor(const at::Tensor& momentum, const at::Device& device);
void check_teacher_grad_mode(at::TensorList teacher);
// The value of a momentum tensor; a CPU float32/float64 one is read directly (Tensor::item
// costs a dispatcher round trip, ~1 us, more than a whole small update's host work).
double momentum_tensor_value(const at::Tensor& momentum);
// Marks the teachers as modified in place (autograd's version counters), before the write:
// a graph that saved a teacher then fails loudly instead of using changed values.
void bump_teacher_versions(at::TensorList teacher);

// Validates the lists and returns their plan, from the cache when the lists' pointers,
// sizes, strides and dtypes match a cached one (no allocation, no copy), else built anew.
// `build_refused` non-null: a miss raises with that message instead of building
// (used while a CUDA graph is being captured). `captured`: the plan is used inside a CUDA-graph
// capture; it is then kept for the life of the process, since the graph holds its device
// address and may replay it after the cache would have evicted it.
std::shared_ptr<const EmaPlan> get_ema_plan(at::TensorList teacher, at::TensorList student,
                                            const char* build_refused = nullptr,
                                            bool captured = false);

// The same validation as get_ema_plan, without building or caching a plan.
void validate_ema_lists(at::TensorList teacher, at::TensorList student);

// Number of plans built since start (a test hook for cache hits and invalidation).
int64_t ema_plan_builds();
// Drops the cached plans (not those kept for captured graphs). A plan still in use stays alive
// with its users (a handle, a launch in flight): the cache shares it, it does not own it alone.
void clear_ema_plan_cache();
// Plans in the cache, and plans kept for captured CUDA graphs (test hooks).
int64_t ema_plans_cached();
int64_t ema_plans_kept_for_graphs();
// Keeps `plan` for the life of the process (a CUDA graph captured a launch of it).
void keep_ema_plan_for_graphs(const std::shared_ptr<const EmaPlan>& plan);

// How a backend launches a validated plan (registered by each backend's file: ema/cpu.cpp,
// ema/cuda_host.cpp), for callers that hold a plan (ema/handle.h) and skip the dispatcher.
struct EmaLauncher {
  // A miss while this returns non-null must not build (its message says why); null: may build.
  const char* (*build_refused)() = nullptr;
  // Whether the launch is being recorded into a CUDA graph (the plan must then outlive it).
  bool (*capturing)() = nullptr;
  // Runs `plan` (of lists on `device`) at `momentum`, or at *momentum_tensor when non-null (a
  // 0-dim float32/float64 tensor on the plan's device, already checked).
  void (*launch)(const EmaPlan& plan, const at::Device& device, double momentum,
                 const at::Tensor* momentum_tensor) = nullptr;
};
void register_ema_launcher(c10::DeviceType device, EmaLauncher launcher);
// The launcher of `device`, or null when none is registered (no C++ kernel for that device).
const EmaLauncher* ema_launcher(c10::DeviceType device);

}  // namespace eman_fused
