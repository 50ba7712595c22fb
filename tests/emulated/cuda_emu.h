// The CUDA surface our kernels use, as host C++ for g++: force-included (-include) before each
// csrc/**/*.cu when tests/emulated/build.py compiles it for the CPU emulator. Never seen by nvcc.
//
// - keywords: __global__/__device__/__host__ vanish; __shared__ becomes function-static,
//   thread_local storage: one copy per instantiation, shared by every CUDA thread (fiber) of the
//   block that runs on this OS thread; emu_runtime.cpp poisons it before each block.
// - threadIdx / blockIdx / blockDim / gridDim read the running fiber's context.
// - __syncthreads and __shfl_down_sync suspend the fiber until the block (or warp) has arrived.
// - EMAN_FUSED_LAUNCH (csrc/common/launch.cuh) becomes emu::launch: driver's configuration
//   checks, then every block, each of its threads a fiber (thread order, or a seeded random
//   order: uniform, or by warp priorities).
// - reinterpret_cast to a pointer checks the target type's alignment inside kernels (16 bytes
//   for the vector packs), as the GPU faults on a misaligned access.
#pragma once

// Every header the .cu files include, first: the reinterpret_cast macro below must not reach
// library headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

namespace emu {

struct BlockCtx {
  dim3 block_idx, block_dim, grid_dim;
};

struct ThreadCtx {
  dim3 thread_idx;
  const BlockCtx* block;
};

// The fiber now running (nullptr in host code). A plain global: emulated launches are
// serialized (emu_runtime.cpp holds a lock), and the module keeps no thread_local of its own
// so that its TLS block is exactly the kernels' __shared__ arrays.
extern ThreadCtx* current;

void syncthreads();
// Blocks until every lane named in mask has arrived; slot_out gets lane `src`'s deposit.
uint64_t warp_exchange(unsigned mask, uint64_t deposit, int src_lane_delta, int width);
// A kernel fault (misaligned or out-of-bounds access, bad barrier): ends the launch with `code`.
[[noreturn]] void fault(cudaError_t code, const char* what, const char* file, int line);

struct LaunchSpec {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  const char* file;
  int line;
};
// Runs body once per CUDA thread of the grid (after the launch-configuration checks).
void launch(const LaunchSpec& spec, const std::function<void()>& body);

template <typename... P>
struct BoundKernel {
  LaunchSpec spec;
  void (*kernel)(P...);
  template <typename... A>
  void operator()(A&&... args) const {
    // Arguments are converted to the kernel's parameter types once, on the host, as the
    // driver copies them; every thread then gets its own copy (by-value parameters).
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    void (*k)(P...) = kernel;
    launch(spec, [&params, k] { std::apply(k, params); });
  }
};

struct LaunchConfig {
  LaunchSpec spec;
  template <typename... P>
  BoundKernel<P...> kernel(void (*k)(P...)) const {
    return {spec, k};
  }
};

inline LaunchSpec make_spec(dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                            const char* file, int line) {
  return {grid, block, smem, stream, file, line};
}

void check_alignment(const void* p, size_t align, const char* file, int line);

struct CastSite {
  const char* file;
  int line;
  template <typename To, typename From>
  To cast(From&& from) const {
    if constexpr (std::is_pointer_v<To>) {
      To p = reinterpret_cast<To>(from);
      using Pointee = std::remove_cv_t<std::remove_pointer_t<To>>;
      if constexpr (!std::is_void_v<Pointee>) {
        if (current != nullptr) check_alignment(reinterpret_cast<const void*>(p), alignof(Pointee), file, line);
      }
      return p;
    } else {
      return reinterpret_cast<To>(from);
    }
  }
};

template <typename T>
T shfl_down_sync(unsigned mask, T var, unsigned delta, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_exchange(mask, bits, static_cast<int>(delta), width);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}

}  // namespace emu

#define threadIdx (::emu::current->thread_idx)
#define blockIdx (::emu::current->block->block_idx)
#define blockDim (::emu::current->block->block_dim)
#define gridDim (::emu::current->block->grid_dim)

inline void __syncthreads() { ::emu::syncthreads(); }

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::emu::shfl_down_sync(mask, var, delta, width);
}

// Device-side min/max over one type, as CUDA's overloads (host C++ has only std::min).
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

// The launch error is read (and cleared) by the launchers' cudaGetLastError(); renamed so the
// emulator never binds to libcudart's symbol when a CUDA build of torch is in the process.
extern "C" cudaError_t emu_cudaGetLastError(void);
#define cudaGetLastError emu_cudaGetLastError

#define EMAN_FUSED_EMULATED 1
#define EMAN_FUSED_EMULATED_LAUNCH(grid, block, smem, stream, ...)                        \
  ::emu::LaunchConfig{::emu::make_spec(grid, block, smem, stream, __FILE__, __LINE__)} \
      .kernel(__VA_ARGS__)

// Last: every later reinterpret_cast in the .cu sources goes through the alignment check.
#define reinterpret_cast ::emu::CastSite{__FILE__, __LINE__}.cast
