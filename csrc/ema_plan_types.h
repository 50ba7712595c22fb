// The multi-tensor EMA plan as the kernels see it: plain structs, no torch types,
// so CUDA (.cu), CPU and Triton (through the same int64 table) read one layout.
//
// Table layout (one int64 buffer on the teacher's device):
//   [EmaTensorEntry x num_tensors][EmaChunk x num_chunks]
#pragma once
#include <cstdint>

namespace eman_fused {

// Floating dtype tags; kind = teacher_tag * kNumFloatTags + student_tag for a lerp.
enum FloatTag : int64_t { kF32 = 0, kBF16 = 1, kF16 = 2, kF64 = 3 };
constexpr int64_t kNumFloatTags = 4;
// Integer and bool pairs are copied as raw bytes: numel is then a byte count.
constexpr int64_t kKindCopyBytes = 100;

constexpr int64_t lerp_kind(int64_t teacher_tag, int64_t student_tag) {
  return teacher_tag * kNumFloatTags + student_tag;
}

struct EmaTensorEntry {
  int64_t teacher;  // data pointer
  int64_t student;  // data pointer
  int64_t numel;    // elements (bytes for kKindCopyBytes)
  int64_t kind;
};

struct EmaChunk {
  int64_t tensor;  // index into the entry table
  int64_t start;   // first element of the chunk (64-bit: tensors may exceed 2^31 elements)
};

// Elements (or bytes for copies) per chunk: one CUDA block / one CPU task each.
// A multiple of 16 bytes for every dtype, so chunk starts keep 16-byte alignment.
constexpr int64_t kChunkElems = 32768;

constexpr int64_t kEntryWords = sizeof(EmaTensorEntry) / sizeof(int64_t);
constexpr int64_t kChunkWords = sizeof(EmaChunk) / sizeof(int64_t);

}  // namespace eman_fused
