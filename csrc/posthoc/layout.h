// The post-hoc EMA plan's table as the kernels see it (common/multi_tensor.h: entries, then
// chunks): one entry per student tensor holding the pointers of all K profiles, so a kernel
// reads each student chunk once and updates every profile from it. Plain structs, no torch
// types, so CUDA (.cu) and CPU read one layout.
#pragma once
#include <cstdint>

#include "common/multi_tensor.h"
#include "ema/layout.h"  // kKindCopyBytes, lerp_kind: the same kinds as the EMA update

namespace eman_fused {

// Fixed so an entry is a fixed number of words; EDM2 trains with 2 profiles.
constexpr int64_t kMaxPosthocProfiles = 8;

struct PosthocTensorEntry {
  int64_t student;  // data pointer
  int64_t numel;    // elements (bytes for kKindCopyBytes)
  int64_t kind;     // lerp_kind(profile tag, student tag) or kKindCopyBytes; every profile alike
  int64_t num_profiles;
  int64_t profiles[kMaxPosthocProfiles];  // data pointers; the first num_profiles are used
};

// The EMA update's chunk size (one CUDA block / one CPU task each); a multiple of 16 bytes
// for every dtype, so chunk starts keep 16-byte alignment.
constexpr int64_t kPosthocChunkElems = kEmaChunkElems;
constexpr int64_t kPosthocEntryWords = entry_words<PosthocTensorEntry>();

}  // namespace eman_fused
