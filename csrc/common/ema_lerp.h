// The teacher update of one element, as every kernel that writes a teacher computes it:
// ema_update_ and the fused optimizer steps, on the CPU and in CUDA (eman_fused/triton/_common.py
// is the Triton twin). torch.lerp's two forms with w = 1 - m:
//   t + w*(s - t) for w < 1/2, else s - (s - t)*v with v = 1 - w.
// A student equal to its teacher is a fixed point. m*t + w*s is not: m and w, each rounded, do
// not sum to 1, which biases the teacher by about (m + w - 1)/(1 - m) (2e-4 relative at
// m = 0.9999). Each operation is rounded once, with no fused multiply-add on the GPU either (nvcc
// would contract the product and the sum otherwise), so the two ops, the two devices and the
// eager reference (eman_fused.reference.ema_update_) agree bit for bit.
// Header-only and torch-free (CPU loops and .cu files include it).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define EMAN_FUSED_HD __host__ __device__ __forceinline__
#else
#define EMAN_FUSED_HD inline
#endif

namespace eman_fused {

// The weights of one update in the math type: w = 1 - m rounded once from the exact (double)
// momentum, v = 1 - w in the math type (exact when it is used: w >= 1/2).
template <typename Acc>
struct EmaWeights {
  Acc w, v;
};
template <typename Acc>
EMAN_FUSED_HD EmaWeights<Acc> ema_weights(double momentum) {
  const Acc w = static_cast<Acc>(1.0 - momentum);
  return {w, static_cast<Acc>(1) - w};
}

// The two forms, separately, for loops that hoist the choice (it is uniform per call).
EMAN_FUSED_HD float ema_lerp_small(float t, float s, float w) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(t, __fmul_rn(w, __fsub_rn(s, t)));
#else
  return t + w * (s - t);
#endif
}
EMAN_FUSED_HD float ema_lerp_large(float t, float s, float v) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(s, __fmul_rn(__fsub_rn(s, t), v));
#else
  return s - (s - t) * v;
#endif
}
EMAN_FUSED_HD double ema_lerp_small(double t, double s, double w) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(t, __dmul_rn(w, __dsub_rn(s, t)));
#else
  return t + w * (s - t);
#endif
}
EMAN_FUSED_HD double ema_lerp_large(double t, double s, double v) {
#if defined(__CUDA_ARCH__)
  return __dsub_rn(s, __dmul_rn(__dsub_rn(s, t), v));
#else
  return s - (s - t) * v;
#endif
}

template <typename Acc>
EMAN_FUSED_HD Acc ema_lerp(Acc t, Acc s, EmaWeights<Acc> k) {
  return k.w < static_cast<Acc>(0.5) ? ema_lerp_small(t, s, k.w) : ema_lerp_large(t, s, k.v);
}

// What one update does to a floating teacher, from the momentum in double (its exact value):
// momentum 1 leaves it bit-identical (no memory touched), momentum 0 copies the student (a NaN
// or inf teacher is replaced, which the lerp would not do), else the lerp.
enum class EmaMode : int32_t { kSkip = 0, kCopy = 1, kLerp = 2 };

EMAN_FUSED_HD EmaMode ema_mode(double momentum) {
  return momentum == 1.0 ? EmaMode::kSkip : momentum == 0.0 ? EmaMode::kCopy : EmaMode::kLerp;
}

}  // namespace eman_fused
