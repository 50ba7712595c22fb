// Launchers of the eman_norm CUDA kernels: raw pointers and a stream, no torch types.
// Tensors are dense in memory order [outer, C, inner] (see norm/geometry.h).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"

namespace eman_fused {

struct NormShape {
  int64_t outer, channels, inner;
};

struct NormForwardArgs {
  const void* x;
  const void* residual;  // nullable
  void* y;
  const void* mean;
  const void* var;
  const void* weight;  // nullable
  const void* bias;    // nullable
  double eps;
  bool relu;
  FloatTag dtype;  // activations; statistics are float (double with kF64)
  NormShape shape;
};

struct NormBackwardArgs {
  const void* grad;
  const void* x;
  const void* out;  // forward output, for the ReLU mask; nullptr without ReLU
  void* grad_x;     // nullable
  void* grad_residual;  // nullable
  const void* mean;
  const void* var;
  const void* weight;  // nullable
  double eps;
  FloatTag dtype;
  NormShape shape;
  void* grad_weight;  // nullable (statistics dtype)
  void* grad_bias;    // nullable
  void* workspace;    // norm_backward_workspace(shape) elements of the math type, when sums are needed
};

// Elements (float; double with kF64) of per-block partial sums the backward needs.
int64_t norm_backward_workspace(const NormShape& shape);

cudaError_t launch_eman_norm_forward(const NormForwardArgs& args, cudaStream_t stream);
// Two launches when grad_weight/grad_bias are asked for: the fused pass writes per-block
// partial sums, a second kernel adds them in a fixed order (deterministic results).
cudaError_t launch_eman_norm_backward(const NormBackwardArgs& args, cudaStream_t stream);

}  // namespace eman_fused
