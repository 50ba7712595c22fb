// C entry points for tests/emulated/harness.py (ctypes): each calls one of the real launchers
// of csrc/**/*.cu, compiled for the emulator, with raw pointers into emulator buffers.
// build.py generates emu_launchers.h: an #include of every csrc header that declares a
// `cudaError_t launch_...(` function, so files moving between folders need no edit here.
#include <string>

#include "cuda_emu.h"
#include "emu_launchers.h"
#include "optim/math.h"  // kOptimScalarWords: the scalar block closing a step's table

#define EMU_API extern "C" __attribute__((visibility("default")))

using namespace eman_fused;

// ---- layouts the tests build tables with (from the structs, not Python mirrors) ------------

EMU_API int64_t emu_layout(const char* name) {
  const std::string n = name;
  if (n == "ema_entry_words") return kEmaEntryWords;
  if (n == "ema_chunk_elems") return kEmaChunkElems;
  if (n == "chunk_words") return kChunkWords;
  if (n == "optim_entry_words") return kOptimEntryWords;
  if (n == "posthoc_entry_words") return kPosthocEntryWords;
  if (n == "posthoc_chunk_elems") return kPosthocChunkElems;
  if (n == "posthoc_max_profiles") return kMaxPosthocProfiles;
  if (n == "optim_chunk_elems") return kOptimChunkElems;
  if (n == "optim_scalar_words") return kOptimScalarWords;
  if (n == "optim_max_hyper") return kMaxHyper;
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

// ---- post-hoc EMA (K power-function profiles) -----------------------------------------------

// gammas: `count` doubles, 1 <= count <= kMaxPosthocProfiles (the host op checks it before a
// launch); step: device int64, read by the kernel, then advanced by the launcher.
EMU_API int emu_posthoc_update(const void* entries, const void* chunks, int64_t num_chunks,
                               const double* gammas, int64_t count, void* step) {
  PosthocGammas g{};
  g.count = count;
  for (int64_t j = 0; j < count; ++j) g.gamma[j] = gammas[j];
  return launch_posthoc_ema_update(static_cast<const PosthocTensorEntry*>(entries),
                                   static_cast<const TensorChunk*>(chunks), num_chunks, g,
                                   static_cast<int64_t*>(step), nullptr);
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

// One launch of the step op's kernels (optim/cuda.h: launch_optim_ema). values: the op's `hyper`
// list (optim/hyper.h's order, `count` of them); device: null, or `count` float32 device
// addresses, null where the host value holds (capturable hyper-parameters).
EMU_API int emu_optim(int optimizer, const void* entries, const void* chunks, int64_t num_chunks,
                      int param_tag, int teacher_tag, const double* values,
                      const float* const* device, int64_t count, double* partials) {
  if (count < 0 || count > kMaxHyper) return -1;
  HyperArgs h{};
  for (int64_t k = 0; k < count; ++k) {
    h.value[k] = values[k];
    h.device[k] = device != nullptr ? device[k] : nullptr;
  }
  return launch_optim_ema(static_cast<Optimizer>(optimizer), static_cast<const OptimEntry*>(entries),
                          static_cast<const TensorChunk*>(chunks), num_chunks,
                          static_cast<FloatTag>(param_tag), static_cast<FloatTag>(teacher_tag), h,
                          partials, nullptr);
}
