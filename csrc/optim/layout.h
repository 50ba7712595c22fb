// The fused optimizer steps' table as the kernels see it (common/multi_tensor.h: entries, then
// chunks): plain structs, no torch types, so the CPU loops, the CUDA kernels (.cu) and Triton
// (through the exported layout) read one layout, built once per call in host C++ (optim/plan.cpp).
#pragma once
#include <cstdint>

#include "common/multi_tensor.h"

namespace eman_fused {

struct OptimEntry {
  int64_t param, grad, state0, state1, state2, teacher;  // data pointers; 0 = absent
  int64_t numel;
  int64_t first_chunk, num_chunks;  // this tensor's chunks (LARS sums its per-chunk norms)
  int64_t flags;                    // kOptimFirst | kOptimAdapt
  double scalar0, scalar1;          // AdamW: step_size, sqrt(bias_correction2)
  int64_t step;                     // capturable AdamW: its float32 step count on the device
};

constexpr int64_t kOptimFirst = 1;  // a new momentum buffer (SGD, LARS)
constexpr int64_t kOptimAdapt = 2;  // LARS: weight decay and trust ratio apply
// Elements per chunk: one CUDA block / one CPU work item. A multiple of 4 floats (16 bytes).
constexpr int64_t kOptimChunkElems = 16384;
constexpr int64_t kOptimEntryWords = entry_words<OptimEntry>();

}  // namespace eman_fused
