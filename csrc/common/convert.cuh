// Element <-> math-type conversions for the CUDA kernels (round to nearest even, as torch).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace eman_fused {

template <typename Acc, typename T>
__device__ __forceinline__ Acc to_acc(T x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return static_cast<Acc>(__bfloat162float(x));
  } else if constexpr (std::is_same_v<T, __half>) {
    return static_cast<Acc>(__half2float(x));
  } else {
    return static_cast<Acc>(x);
  }
}

// Through float for the 16-bit types, as torch's own casts do.
template <typename T, typename Acc>
__device__ __forceinline__ T from_acc(Acc x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(static_cast<float>(x));
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(static_cast<float>(x));
  } else {
    return static_cast<T>(x);
  }
}

}  // namespace eman_fused
