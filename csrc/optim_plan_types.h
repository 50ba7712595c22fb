// The fused optimizer steps' table as the kernels see it: plain structs, no torch types, so the
// CPU loops and the CUDA kernels (.cu) read one layout, built once per call in host C++
// (optim.cpp). Layout (one int64 buffer): [OptimEntry x num_tensors][OptimChunk x num_chunks].
#pragma once
#include <cstdint>

namespace eman_fused {

struct OptimEntry {
  int64_t param, grad, state0, state1, state2, teacher;  // data pointers; 0 = absent
  int64_t numel;
  int64_t first_chunk, num_chunks;  // this tensor's chunks (LARS sums its per-chunk norms)
  int64_t flags;                    // kOptimFirst | kOptimAdapt
  double scalar0, scalar1;          // AdamW: step_size, sqrt(bias_correction2)
  int64_t step;                     // capturable AdamW: its float32 step count on the device
};

struct OptimChunk {
  int64_t tensor;  // index into the entry table
  int64_t start;   // first element of the chunk
};

constexpr int64_t kOptimFirst = 1;  // a new momentum buffer (SGD, LARS)
constexpr int64_t kOptimAdapt = 2;  // LARS: weight decay and trust ratio apply
// Elements per chunk: one CUDA block / one CPU work item. A multiple of 4 floats (16 bytes).
constexpr int64_t kOptimChunkElems = 16384;
constexpr int64_t kOptimEntryWords = sizeof(OptimEntry) / sizeof(int64_t);
constexpr int64_t kOptimChunkWords = sizeof(OptimChunk) / sizeof(int64_t);

}  // namespace eman_fused
