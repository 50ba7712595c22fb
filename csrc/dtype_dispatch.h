// Maps a FloatTag to a C++ element type and the fp32 (fp64 for double pairs) math type.
// Templated on the half/bfloat16 types so CPU (c10) and CUDA (cuda_fp16/cuda_bf16) share it.
#pragma once
#include <type_traits>

#include "ema_plan_types.h"

namespace eman_fused {

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
