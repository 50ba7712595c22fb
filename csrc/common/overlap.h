// Memory-overlap check shared by every op that reads some tensors while writing others in one
// pass (the EMA update, the fused optimizer steps): the kernels walk the lists concurrently, so
// a written tensor must not share a byte with any other tensor of the call. One sweep over the
// byte ranges sorted by start finds any such pair in O(n log n).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace eman_fused {

struct MemoryRange {
  uintptr_t begin, end;  // [begin, end) in bytes
  bool written;
  const char* list;  // for the message: "teacher", "params", ...
  size_t index;
};

// Appends the ranges of a list's non-empty tensors (dense: numel * element_size bytes from the
// data pointer; the callers checked density before).
void add_memory_ranges(std::vector<MemoryRange>& ranges, at::TensorList list, const char* name,
                       bool written);

// ValueError "<op>: <list>[i] overlaps <list>[j] in memory; <rule>" for the first overlapping
// pair where at least one side is written. Sorts `ranges`.
void check_no_overlap(const char* op, std::vector<MemoryRange>& ranges, const char* rule);

}  // namespace eman_fused
