// The EMA plan's table as the kernels see it (common/multi_tensor.h: entries, then chunks):
// plain structs, no torch types, so CUDA (.cu), CPU and Triton read one layout.
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/multi_tensor.h"

namespace eman_fused {

// Integer and bool pairs are copied as raw bytes: numel is then a byte count.
// Floating pairs: kind = lerp_kind(teacher tag, student tag).
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

// Elements (or bytes for copies) per chunk: one CUDA block / one CPU task each.
// A multiple of 16 bytes for every dtype, so chunk starts keep 16-byte alignment.
constexpr int64_t kEmaChunkElems = 32768;
constexpr int64_t kEmaEntryWords = entry_words<EmaTensorEntry>();

}  // namespace eman_fused
