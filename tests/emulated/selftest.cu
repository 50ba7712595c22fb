// Kernels with planted bugs, so the emulator's own tests (test_emu_harness.py) show that each
// bug class is caught: a missing barrier, an out-of-bounds index, a misaligned vector load, a
// barrier some threads skip, a read of shared memory nothing wrote, bad launch configurations.
// Compiled only for the emulator (with cuda_emu.h), never by nvcc.
#include <cstdint>

#include "common/launch.cuh"  // csrc/ is on the include path (build.py)

namespace {

constexpr int kThreads = 128;

// out[t] = shared[(t + 1) % n] after every thread wrote shared[t] = t + 1.
__global__ void neighbour_kernel(float* out, bool barrier) {
  __shared__ float shared[kThreads];
  const int t = threadIdx.x;
  shared[t] = static_cast<float>(t + 1);
  if (barrier) __syncthreads();
  out[blockIdx.x * blockDim.x + t] = shared[(t + 1) % blockDim.x];
}

// Warp sums by shuffles, one per warp.
__global__ void warp_sum_kernel(const float* in, float* out) {
  float v = in[threadIdx.x];
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = v;
}

__global__ void write_kernel(float* p, int n, int shift) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) p[i + shift] = 1.0f;
}

__global__ void vector_copy_kernel(const char* src, char* dst) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
}

__global__ void early_exit_kernel(float* out) {
  if (threadIdx.x < 5) return;  // a barrier after a non-uniform exit
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float shared[kThreads];
  if (blockIdx.x == 0) shared[threadIdx.x] = 1.0f;  // only block 0 writes its shared memory
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = shared[threadIdx.x];
}

// Two block sums through one shared array, as the norm backward does; without the first
// barrier a warp that runs ahead overwrites shared[warp] before warp 0 has read the first sum.
__device__ float block_sum(float v, float* shared, bool reuse_barrier) {
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  if (reuse_barrier) __syncthreads();
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.0f;
  if (threadIdx.x < 32) {
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

__global__ void two_sums_kernel(const float* in, float* out, bool reuse_barrier) {
  __shared__ float shared[32];
  const float a = block_sum(in[threadIdx.x], shared, reuse_barrier);
  const float b = block_sum(2.0f * in[threadIdx.x], shared, reuse_barrier);
  if (threadIdx.x == 0) out[0] = a, out[1] = b;
}

__global__ void nothing_kernel() {}

}  // namespace

#define EMU_API extern "C" __attribute__((visibility("default")))

EMU_API int emu_self_neighbour(float* out, int blocks, int barrier) {
  EMAN_FUSED_LAUNCH(blocks, kThreads, 0, nullptr, neighbour_kernel)(out, barrier != 0);
  return cudaGetLastError();
}

EMU_API int emu_self_warp_sum(const float* in, float* out, int threads) {
  EMAN_FUSED_LAUNCH(1, threads, 0, nullptr, warp_sum_kernel)(in, out);
  return cudaGetLastError();
}

EMU_API int emu_self_write(float* p, int n, int shift) {
  EMAN_FUSED_LAUNCH((n + kThreads - 1) / kThreads, kThreads, 0, nullptr, write_kernel)(p, n, shift);
  return cudaGetLastError();
}

EMU_API int emu_self_vector_copy(const char* src, char* dst) {
  EMAN_FUSED_LAUNCH(1, 1, 0, nullptr, vector_copy_kernel)(src, dst);
  return cudaGetLastError();
}

EMU_API int emu_self_early_exit(float* out) {
  EMAN_FUSED_LAUNCH(1, kThreads, 0, nullptr, early_exit_kernel)(out);
  return cudaGetLastError();
}

EMU_API int emu_self_unwritten_shared(float* out, int blocks) {
  EMAN_FUSED_LAUNCH(blocks, kThreads, 0, nullptr, unwritten_shared_kernel)(out);
  return cudaGetLastError();
}

EMU_API int emu_self_two_sums(const float* in, float* out, int threads, int reuse_barrier) {
  EMAN_FUSED_LAUNCH(1, threads, 0, nullptr, two_sums_kernel)(in, out, reuse_barrier != 0);
  return cudaGetLastError();
}

EMU_API int emu_self_configuration(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                   unsigned bz) {
  EMAN_FUSED_LAUNCH(dim3(gx, gy, gz), dim3(bx, by, bz), 0, nullptr, nothing_kernel)();
  return cudaGetLastError();
}
