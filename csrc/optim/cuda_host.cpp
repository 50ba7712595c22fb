// CUDA registration of the fused optimizer step: validation and the step's table from
// optim/plan.cpp (the same as the CPU path), the table copied to the device asynchronously from
// pinned memory (or, for a capturable call, found in a device cache), the launch of optim/cuda.cu.
#include <ATen/ops/_foreach_add.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <algorithm>
#include <list>
#include <mutex>
#include <vector>

#include "optim/cuda.h"
#include "optim/plan.h"

namespace eman_fused {
namespace {

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// The entries and chunks of a host table (the kernels form the scalars themselves).
at::Tensor kernel_words(const OptimPlan& host) {
  return host.table.narrow(0, 0, host.num_tensors * kOptimEntryWords + host.num_chunks * kChunkWords);
}

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
  TORCH_CHECK(!capturing(), op, ": a non-capturable fused optimizer step cannot be captured in a ",
              "CUDA graph (its table is copied from the host at each step); use capturable=True");
  return on_device(host, kernel_words(host).to(device, /*non_blocking=*/true));
}

// Capturable calls reuse a device copy of an identical table (same pointers and flags): the
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
  const at::Tensor words = kernel_words(host);
  const int64_t* w = words.const_data_ptr<int64_t>();
  std::vector<int64_t> key(w, w + words.numel());
  key.push_back(device.index());
  // Tables a captured graph reads: the graph holds their device addresses and may replay after
  // this cache evicted them, so they are kept for the process (one per captured table).
  static auto& kept_for_graphs = *new std::vector<OptimPlan>();
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if (it->key == key) {
        cache.splice(cache.begin(), cache, it);
        const OptimPlan& found = cache.front().table;
        if (capturing() &&
            std::none_of(kept_for_graphs.begin(), kept_for_graphs.end(), [&](const OptimPlan& k) {
              return k.table.is_same(found.table);
            })) {
          kept_for_graphs.push_back(found);
        }
        return found;
      }
    }
  }
  TORCH_CHECK(!capturing(), op, ": no device table for these tensors yet and a CUDA graph is being ",
              "captured; run two steps before capture (the first step's momentum buffers change the table)");
  OptimPlan d = on_device(host, words.to(device));
  std::lock_guard<std::mutex> lock(mutex);
  cache.push_front({std::move(key), d});
  if (cache.size() > 32) cache.pop_back();
  return d;
}

void optim_ema_step_cuda(int64_t optimizer, at::TensorList params, at::TensorList grads,
                         at::TensorList first_moments, at::TensorList second_moments,
                         at::TensorList max_second_moments, at::TensorList teacher,
                         c10::ArrayRef<int64_t> flags, at::TensorList steps,
                         c10::ArrayRef<double> hyper,
                         const c10::List<std::optional<at::Tensor>>& hyper_tensors) {
  const char* op = "optim_ema_step_";
  const OptimLists lists{params, grads, first_moments, second_moments, max_second_moments,
                         teacher, steps, flags};
  // Pinned host memory for the asynchronous copy; not while capturing (a capturable call's
  // table comes from the device cache then, and pinned allocations are not capture-safe).
  const OptimCall call = check_optim_call(optimizer, lists, hyper, hyper_tensors, !capturing());
  if (params.empty()) return;
  bump_step_versions(lists);
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const OptimPlan d = call.device_inputs ? cached_device_table(op, call.table, device)
                                         : to_device(op, call.table, device);
  advance_host_steps(steps);  // host counts were read into the table already
  HyperArgs h{};
  for (int64_t k = 0; k < kMaxHyper; ++k) h.value[k] = call.hyper[k], h.device[k] = call.hyper_ptrs[k];
  at::Tensor partials;
  if (is_lars(call.optimizer)) {
    partials = at::empty({2 * std::max<int64_t>(1, d.num_chunks)}, params[0].options().dtype(at::kDouble));
  }
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(launch_optim_ema(call.optimizer, d.entries(), d.chunks(), d.num_chunks,
                                  call.param_tag, call.teacher_tag, h,
                                  partials.defined() ? partials.mutable_data_ptr<double>() : nullptr,
                                  stream));
  // Device step counts (capturable): advanced after the kernel read them, on the same stream.
  std::vector<at::Tensor> device_steps;
  for (const at::Tensor& s : steps) {
    if (!s.device().is_cpu()) device_steps.push_back(s);
  }
  if (!device_steps.empty()) at::_foreach_add_(device_steps, 1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CUDA, m) {
  m.impl("optim_ema_step_", &optim_ema_step_cuda);
}

}  // namespace eman_fused
