// The fused optimizer steps' table as the kernels see it (common/multi_tensor.h: entries, then
// chunks), followed by the call's scalar block (optim/math.h): plain structs, no torch types, so
// the CPU loops, the CUDA kernels (.cu) and Triton (through the exported layout) read one
// layout, built once per call in host C++ (optim/plan.cpp).
#pragma once
#include <cstdint>

#include "common/multi_tensor.h"
#include "optim/math.h"

namespace eman_fused {

struct OptimEntry {
  int64_t param, grad;          // data pointers; 0 = absent (here and below)
  int64_t first_moment;         // SGD / LARS: momentum_buffer; AdamW: exp_avg
  int64_t second_moment;        // AdamW: exp_avg_sq
  int64_t max_second_moment;    // AdamW with amsgrad: max_exp_avg_sq
  int64_t teacher;              // the EMA teacher's copy of the param
  int64_t numel;
  int64_t first_chunk, num_chunks;  // this tensor's chunks (LARS sums its per-chunk norms)
  int64_t flags;                    // kOptimFirst | kOptimAdapt
  // AdamW with a host step count: this step's 1 - beta1^step and sqrt(1 - beta2^step).
  double bias_correction1, bias_correction2_sqrt;
  // AdamW with a step count on the params' device (capturable): its float32 address, read by the
  // kernel, which forms the bias corrections itself; 0 otherwise.
  int64_t step;
};

constexpr int64_t kOptimFirst = 1;  // a new momentum buffer: set to the first update (SGD, LARS)
constexpr int64_t kOptimAdapt = 2;  // LARS: the tensor gets the trust ratio (not excluded)
// Elements per chunk: one CUDA block / one CPU work item. A multiple of 4 floats (16 bytes).
constexpr int64_t kOptimChunkElems = 16384;
constexpr int64_t kOptimEntryWords = entry_words<OptimEntry>();

}  // namespace eman_fused
