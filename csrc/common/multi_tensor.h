// The multi-tensor table shared by the EMA update and the optimizer steps: one int64 buffer
//   [Entry x num_tensors][TensorChunk x num_chunks]
// where each op defines its Entry (ema/layout.h, optim/layout.h) and a kernel block (or CPU
// task) reads chunk -> tensor entry. Plain structs, no torch types, so CUDA (.cu), CPU and
// Triton (through the exported layout, see python_api.cpp) read one layout.
#pragma once
#include <cstdint>

namespace eman_fused {

struct TensorChunk {
  int64_t tensor;  // index into the entry table
  int64_t start;   // first element of the chunk (64-bit: tensors may exceed 2^31 elements)
};
constexpr int64_t kChunkWords = sizeof(TensorChunk) / sizeof(int64_t);

template <typename Entry>
constexpr int64_t entry_words() {
  static_assert(sizeof(Entry) % sizeof(int64_t) == 0, "entries are whole int64 words");
  return sizeof(Entry) / sizeof(int64_t);
}

}  // namespace eman_fused
