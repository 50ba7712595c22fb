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

// The plans' work estimate of a chunk: its elements plus this fixed dispatch cost (element units).
constexpr int64_t kChunkOverheadWork = 256;

// Below this many elements in all, waking the other threads costs more than it saves. Measured
// on this project's 2-core CI machine: 5,000 one-element tensors took ~0.5 ms on one thread and
// ~8 ms split in two; 100 x 10,000 elements took 0.31 ms on one thread and 0.18 ms on two.
constexpr int64_t kSerialElements = int64_t{1} << 17;

// Calls run(first, last) on consecutive ranges of chunks covering [0, num_chunks) once, in
// parallel. work_prefix[c] is the
// work of chunks [0, c) (num_chunks + 1 entries, as the plans build it, each chunk counted with
// kChunkOverheadWork).
template <typename Run>
void parallel_over_chunks(const std::vector<int64_t>& work_prefix, int64_t num_chunks, Run&& run) {
  if (num_chunks == 0) return;
  const int64_t elements = work_prefix.back() - kChunkOverheadWork * num_chunks;
  if (elements < kSerialElements || at::get_num_threads() == 1 || at::in_parallel_region()) {
    run(int64_t{0}, num_chunks);
    return;
  }
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), num_chunks);
  // First chunk of the part-th of `parts` equal shares of the work.
  const auto share_start = [&](int64_t part) -> int64_t {
    const int64_t target = work_prefix.back() / parts * part;
    return std::lower_bound(work_prefix.begin(), work_prefix.end(), target) - work_prefix.begin();
  };
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t last = part + 1 == parts ? num_chunks : share_start(part + 1);
      run(share_start(part), last);
    }
  });
}

}  // namespace eman_fused
