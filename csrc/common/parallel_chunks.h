// The CPU backends' split of a multi-tensor plan across at::parallel_for's threads: each thread
// takes a contiguous run of chunks holding an equal share of the plan's work (chunks differ in
// size: a tensor's tail chunk, a tiny BatchNorm buffer), so no thread waits on another that got
// the large chunks.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace eman_fused {

// Calls run(c) once for every chunk c of [0, num_chunks), in parallel. work_prefix[c] is the
// work of chunks [0, c) (num_chunks + 1 entries, as the plans build it).
template <typename Run>
void parallel_over_chunks(const std::vector<int64_t>& work_prefix, int64_t num_chunks, Run&& run) {
  if (num_chunks == 0) return;
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), num_chunks);
  // First chunk of the part-th of `parts` equal shares of the work.
  const auto share_start = [&](int64_t part) -> int64_t {
    const int64_t target = work_prefix.back() / parts * part;
    return std::lower_bound(work_prefix.begin(), work_prefix.end(), target) - work_prefix.begin();
  };
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t last = part + 1 == parts ? num_chunks : share_start(part + 1);
      for (int64_t c = share_start(part); c < last; ++c) run(c);
    }
  });
}

}  // namespace eman_fused
