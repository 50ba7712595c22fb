// C entry points for tests/emulated/harness.py (ctypes): each calls one of the real launchers
// of csrc/**/*.cu, compiled for the emulator, with raw pointers into emulator buffers.
// build.py generates emu_launchers.h: an #include of every csrc header that declares a
// `cudaError_t launch_...(` function, so files moving between folders need no edit here.
#include <string>

#include "cuda_emu.h"
#include "emu_launchers.h"

#define EMU_API extern "C" __attribute__((visibility("default")))

using namespace eman_fused;

// ---- layouts the tests build tables with (from the structs, not Python mirrors) ------------

EMU_API int64_t emu_layout(const char* name) {
  const std::string n = name;
  if (n == "ema_entry_words") return kEmaEntryWords;
  if (n == "ema_chunk_elems") return kEmaChunkElems;
  if (n == "chunk_words") return kChunkWords;
  if (n == "optim_entry_words") return kOptimEntryWords;
  if (n == "optim_chunk_elems") return kOptimChunkElems;
  if (n == "tag_float32") return kF32;
  if (n == "tag_bfloat16") return kBF16;
  if (n == "tag_float16") return kF16;
  if (n == "tag_float64") return kF64;
  if (n == "tag_absent") return kAbsent;
  return -100;
}

// Capturable AdamW: entry i reads its float32 step count from `step` (device memory).
EMU_API void emu_optim_set_step(void* entries, int64_t i, const void* step) {
  static_cast<OptimEntry*>(entries)[i].step = reinterpret_cast<int64_t>(step);
}

// ---- EMA ------------------------------------------------------------------------------------

EMU_API int emu_ema_update(const void* entries, const void* chunks, int64_t num_chunks,
                           double momentum, const void* momentum_ptr, int momentum_is_double) {
  return launch_ema_update(static_cast<const EmaTensorEntry*>(entries),
                           static_cast<const TensorChunk*>(chunks), num_chunks, momentum,
                           momentum_ptr, momentum_is_double != 0, nullptr);
}

// ---- eman_norm ------------------------------------------------------------------------------

EMU_API int64_t emu_norm_backward_workspace(int64_t outer, int64_t channels, int64_t inner) {
  return norm_backward_workspace(NormShape{outer, channels, inner});
}

EMU_API int emu_norm_forward(const void* x, const void* residual, void* y, const void* mean,
                             const void* var, const void* weight, const void* bias, double eps,
                             int relu, int dtype, int64_t outer, int64_t channels, int64_t inner) {
  NormForwardArgs a{};
  a.x = x;
  a.residual = residual;
  a.y = y;
  a.mean = mean;
  a.var = var;
  a.weight = weight;
  a.bias = bias;
  a.eps = eps;
  a.relu = relu != 0;
  a.dtype = static_cast<FloatTag>(dtype);
  a.shape = NormShape{outer, channels, inner};
  return launch_eman_norm_forward(a, nullptr);
}

EMU_API int emu_norm_backward(const void* grad, const void* x, const void* out, void* grad_x,
                              void* grad_residual, const void* mean, const void* var,
                              const void* weight, double eps, int dtype, int64_t outer,
                              int64_t channels, int64_t inner, void* grad_weight, void* grad_bias,
                              void* workspace) {
  NormBackwardArgs a{};
  a.grad = grad;
  a.x = x;
  a.out = out;
  a.grad_x = grad_x;
  a.grad_residual = grad_residual;
  a.mean = mean;
  a.var = var;
  a.weight = weight;
  a.eps = eps;
  a.dtype = static_cast<FloatTag>(dtype);
  a.shape = NormShape{outer, channels, inner};
  a.grad_weight = grad_weight;
  a.grad_bias = grad_bias;
  a.workspace = workspace;
  return launch_eman_norm_backward(a, nullptr);
}

// ---- fused optimizer steps ------------------------------------------------------------------

EMU_API int emu_sgd(const void* entries, const void* chunks, int64_t num_chunks, int param_tag,
                    int teacher_tag, float lr, float momentum, float dampening, float weight_decay,
                    float sign, float teacher_momentum, int nesterov, const float* lr_ptr,
                    const float* teacher_momentum_ptr) {
  SgdHyper h{};
  h.lr = lr;
  h.momentum = momentum;
  h.dampening = dampening;
  h.weight_decay = weight_decay;
  h.sign = sign;
  h.teacher_momentum = teacher_momentum;
  h.nesterov = nesterov != 0;
  h.lr_ptr = lr_ptr;
  h.teacher_momentum_ptr = teacher_momentum_ptr;
  return launch_sgd_ema(static_cast<const OptimEntry*>(entries),
                        static_cast<const TensorChunk*>(chunks), num_chunks,
                        static_cast<FloatTag>(param_tag), static_cast<FloatTag>(teacher_tag), h,
                        nullptr);
}

EMU_API int emu_adamw(const void* entries, const void* chunks, int64_t num_chunks, int param_tag,
                      int teacher_tag, float lr, double beta1, double beta2, float eps,
                      float weight_decay, float sign, float teacher_momentum, const float* lr_ptr,
                      const float* teacher_momentum_ptr) {
  AdamWHyper h{};
  h.lr = lr;
  h.beta1 = beta1;
  h.beta2 = beta2;
  h.eps = eps;
  h.weight_decay = weight_decay;
  h.sign = sign;
  h.teacher_momentum = teacher_momentum;
  h.lr_ptr = lr_ptr;
  h.teacher_momentum_ptr = teacher_momentum_ptr;
  return launch_adamw_ema(static_cast<const OptimEntry*>(entries),
                          static_cast<const TensorChunk*>(chunks), num_chunks,
                          static_cast<FloatTag>(param_tag), static_cast<FloatTag>(teacher_tag), h,
                          nullptr);
}

EMU_API int emu_lars(const void* entries, const void* chunks, int64_t num_chunks, int param_tag,
                     int teacher_tag, float lr, float momentum, float weight_decay,
                     float trust_coefficient, float sign, float teacher_momentum,
                     const float* lr_ptr, const float* teacher_momentum_ptr, double* partials) {
  LarsHyper h{};
  h.lr = lr;
  h.momentum = momentum;
  h.weight_decay = weight_decay;
  h.trust_coefficient = trust_coefficient;
  h.sign = sign;
  h.teacher_momentum = teacher_momentum;
  h.lr_ptr = lr_ptr;
  h.teacher_momentum_ptr = teacher_momentum_ptr;
  return launch_lars_ema(static_cast<const OptimEntry*>(entries),
                         static_cast<const TensorChunk*>(chunks), num_chunks,
                         static_cast<FloatTag>(param_tag), static_cast<FloatTag>(teacher_tag), h,
                         partials, nullptr);
}
