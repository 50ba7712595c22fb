#include "common/overlap.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <string>

namespace eman_fused {

void add_memory_ranges(std::vector<MemoryRange>& ranges, at::TensorList list, const char* name,
                       bool written) {
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& x = list[i];
    if (x.numel() == 0) continue;  // no storage touched (and null data pointers may repeat)
    // A written tensor's address as the write will see it: a copy-on-write storage (shared
    // with another tensor until written) is materialized first, so the sweep compares the
    // memory the kernels really write.
    const auto b = reinterpret_cast<uintptr_t>(written ? x.mutable_data_ptr() : x.const_data_ptr());
    ranges.push_back({b, b + static_cast<uintptr_t>(x.numel()) * x.element_size(), written, name, i});
  }
}

void check_no_overlap(const char* op, std::vector<MemoryRange>& ranges, const char* rule) {
  std::sort(ranges.begin(), ranges.end(),
            [](const MemoryRange& a, const MemoryRange& b) { return a.begin < b.begin; });
  // A range conflicts with an earlier one that reaches past its start: any earlier range if it
  // is written, else an earlier written one. Tracking the furthest-reaching range of each kind
  // is enough: if any earlier range of that kind overlaps, the furthest-reaching one does.
  const MemoryRange* furthest_any = nullptr;
  const MemoryRange* furthest_written = nullptr;
  auto name = [](const MemoryRange* r) {
    return std::string(r->list) + "[" + std::to_string(r->index) + "]";
  };
  for (const MemoryRange& r : ranges) {
    const MemoryRange* hit = r.written ? furthest_any : furthest_written;
    TORCH_CHECK_VALUE(!(hit && hit->end > r.begin), op, ": ", name(&r), " overlaps ", name(hit),
                      " in memory; ", rule);
    if (!furthest_any || r.end > furthest_any->end) furthest_any = &r;
    if (r.written && (!furthest_written || r.end > furthest_written->end)) furthest_written = &r;
  }
}

}  // namespace eman_fused
