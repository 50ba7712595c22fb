// The one dtype tag of the kernels (EMA plans, norm launches, optimizer steps) and the visit
// that maps a tag to a C++ element type. Templated on the half/bfloat16 types so the CPU loops
// (c10 types) and the CUDA kernels (cuda_fp16/cuda_bf16 types) share it. No torch headers.
#pragma once
#include <cstdint>
#include <type_traits>

namespace eman_fused {

// kAbsent marks a list that a call does not have (an optimizer step without a teacher).
enum FloatTag : int64_t { kAbsent = -1, kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };
constexpr int64_t kNumFloatTags = 4;

template <typename T>
struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) for the element type of `tag`; returns false for an unknown tag.
template <typename Half, typename BFloat16, typename F>
#ifdef __CUDACC__
__host__ __device__
#endif
inline bool visit_float_tag(int64_t tag, F&& f) {
  switch (tag) {
    case kF32: f(TypeTag<float>{}); return true;
    case kBF16: f(TypeTag<BFloat16>{}); return true;
    case kF16: f(TypeTag<Half>{}); return true;
    case kF64: f(TypeTag<double>{}); return true;
    default: return false;
  }
}

// Math in fp32, or fp64 when either side is double.
template <typename TT, typename ST>
using acc_t = std::conditional_t<std::is_same_v<TT, double> || std::is_same_v<ST, double>,
                                 double, float>;

}  // namespace eman_fused
