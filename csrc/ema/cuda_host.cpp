// ema_update_ on CUDA: validation and plan from ema/plan.cpp, the launch from ema/cuda.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ema/plan.h"
#include "ema/cuda.h"

namespace eman_fused {
namespace {

// Building a plan copies it host-to-device, which a CUDA graph capture cannot record.
const char* build_refused_while_capturing() {
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    return nullptr;
  }
  return "ema_update_: these tensor lists have no cached plan and a CUDA graph is being "
         "captured; run the update once before capture (warm-up) so the plan exists";
}

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// The launch of a checked plan on the current stream of the teachers' device.
void launch_plan(const EmaPlan& plan, const at::Device& device, double momentum,
                 const at::Tensor* momentum_tensor) {
  const c10::cuda::CUDAGuard guard(device);
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream();
  // The plan may be evicted and freed while this launch still reads it on another stream.
  if (c10::Stream(stream) != plan.alloc_stream) plan.table.record_stream(stream);
  C10_CUDA_CHECK(launch_ema_update(
      plan.entries(), plan.chunks(), plan.num_chunks, momentum,
      momentum_tensor ? momentum_tensor->const_data_ptr() : nullptr,
      momentum_tensor && momentum_tensor->scalar_type() == at::kDouble, stream.stream()));
}

const bool registered = [] {
  EmaLauncher launcher;
  launcher.build_refused = &build_refused_while_capturing;
  launcher.capturing = &capturing;
  launcher.launch = &launch_plan;
  register_ema_launcher(c10::DeviceType::CUDA, launcher);
  return true;
}();

void launch(at::TensorList teacher, at::TensorList student, double momentum,
            const at::Tensor* momentum_tensor) {
  if (!teacher[0].is_cuda()) {  // reached CUDA through another argument: name what is wrong
    validate_ema_lists(teacher, student);
    TORCH_CHECK_VALUE(false, "ema_update_: the teachers are on ", teacher[0].device(),
                      " but another argument is on a CUDA device");
  }
  check_teacher_grad_mode(teacher);
  const c10::cuda::CUDAGuard guard(teacher[0].device());
  auto plan = get_ema_plan(teacher, student, build_refused_while_capturing(), capturing());
  bump_teacher_versions(teacher);
  launch_plan(*plan, teacher[0].device(), momentum, momentum_tensor);
}

void ema_update_cuda(at::TensorList teacher, at::TensorList student, double momentum) {
  check_momentum_value(momentum);
  check_lengths(teacher, student);
  if (teacher.empty()) return;
  launch(teacher, student, momentum, nullptr);
}

// The momentum value stays on the device: it is not range-checked here (that would
// synchronize); the kernel reads it when it runs.
void ema_update_tensor_cuda(at::TensorList teacher, at::TensorList student,
                            const at::Tensor& momentum) {
  check_lengths(teacher, student);
  if (teacher.empty()) return;
  check_momentum_tensor(momentum, teacher[0].device());
  launch(teacher, student, 0.0, &momentum);
}

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CUDA, m) {
  m.impl("ema_update_", &ema_update_cuda);
  m.impl("ema_update_.tensor", &ema_update_tensor_cuda);
}

}  // namespace eman_fused
