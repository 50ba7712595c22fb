// CPU backend of ema_update_: the shared plan, parallel over chunks, one tight loop per
// dtype pair that the compiler vectorizes.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common/dtype.h"
#include "ema/plan.h"
#include "common/convert.h"
#include "common/ema_lerp.h"
#include "common/isa.h"
#include "common/parallel_chunks.h"

namespace eman_fused {
namespace {

#define EMAN_FUSED_LOOPS "ema/cpu_loops.inc"
#include "common/isa_loops.h"

void run_plan(const EmaPlan& plan, double m) {
  const EmaTensorEntry* entries = plan.entries();
  const TensorChunk* chunks = plan.chunks();
  const auto run = EMAN_FUSED_ISA_FN(run_chunks);
  parallel_over_chunks(plan.work_prefix, plan.num_chunks,
                       [&](int64_t first, int64_t last) { run(entries, chunks, first, last, m); });
}

void update(at::TensorList teacher, at::TensorList student, double momentum) {
  check_momentum_value(momentum);
  check_teacher_grad_mode(teacher);
  auto plan = get_ema_plan(teacher, student);
  bump_teacher_versions(teacher);
  run_plan(*plan, momentum);
}

void ema_update_cpu(at::TensorList teacher, at::TensorList student, double momentum) {
  update(teacher, student, momentum);
}

void ema_update_tensor_cpu(at::TensorList teacher, at::TensorList student,
                           const at::Tensor& momentum) {
  if (!teacher.empty()) check_momentum_tensor(momentum, teacher[0].device());
  update(teacher, student, momentum_tensor_value(momentum));
}

void launch_cpu(const EmaPlan& plan, const at::Device& /*device*/, double momentum,
                const at::Tensor* momentum_tensor) {
  run_plan(plan, momentum_tensor ? momentum_tensor_value(*momentum_tensor) : momentum);
}

const bool registered = [] {
  EmaLauncher launcher;
  launcher.launch = &launch_cpu;
  register_ema_launcher(c10::DeviceType::CPU, launcher);
  return true;
}();

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CPU, m) {
  m.impl("ema_update_", &ema_update_cpu);
  m.impl("ema_update_.tensor", &ema_update_tensor_cpu);
}

}  // namespace eman_fused
