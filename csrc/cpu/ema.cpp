// CPU backend of ema_update_: the shared plan, parallel over chunks, one tight loop per
// dtype pair that the compiler vectorizes.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "../dtype_dispatch.h"
#include "../plan.h"

namespace eman_fused {
namespace {

template <typename TT, typename ST>
void lerp_span(TT* __restrict__ t, const ST* __restrict__ s, int64_t n, acc_t<TT, ST> m,
               acc_t<TT, ST> w) {
  using Acc = acc_t<TT, ST>;
  for (int64_t i = 0; i < n; ++i) {
    t[i] = static_cast<TT>(m * static_cast<Acc>(t[i]) + w * static_cast<Acc>(s[i]));
  }
}

template <typename TT, typename ST>
void convert_span(TT* __restrict__ t, const ST* __restrict__ s, int64_t n) {
  using Acc = acc_t<TT, ST>;
  for (int64_t i = 0; i < n; ++i) t[i] = static_cast<TT>(static_cast<Acc>(s[i]));
}

void run_chunk(const EmaTensorEntry& e, int64_t start, double m) {
  const int64_t n = std::min(kChunkElems, e.numel - start);
  if (e.kind == kKindCopyBytes) {
    std::memcpy(reinterpret_cast<char*>(e.teacher) + start,
                reinterpret_cast<const char*>(e.student) + start, n);
    return;
  }
  if (m == 1.0) return;  // bit-identical teacher, no memory traffic
  visit_float_tag<c10::Half, c10::BFloat16>(e.kind / kNumFloatTags, [&](auto tt) {
    visit_float_tag<c10::Half, c10::BFloat16>(e.kind % kNumFloatTags, [&](auto st) {
      using TT = typename decltype(tt)::type;
      using ST = typename decltype(st)::type;
      using Acc = acc_t<TT, ST>;
      TT* t = reinterpret_cast<TT*>(e.teacher) + start;
      const ST* s = reinterpret_cast<const ST*>(e.student) + start;
      if (m == 0.0) {
        convert_span(t, s, n);
      } else {
        lerp_span(t, s, n, static_cast<Acc>(m), static_cast<Acc>(1.0 - m));
      }
    });
  });
}

// First chunk of the part-th of `parts` equal shares of the plan's work.
int64_t share_start(const EmaPlan& plan, int64_t part, int64_t parts) {
  const auto& prefix = plan.work_prefix;
  const int64_t target = prefix.back() / parts * part;
  return std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
}

void run_plan(const EmaPlan& plan, double m) {
  if (plan.num_chunks == 0) return;
  const EmaTensorEntry* entries = plan.entries();
  const EmaChunk* chunks = plan.chunks();
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), plan.num_chunks);
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t last = part + 1 == parts ? plan.num_chunks : share_start(plan, part + 1, parts);
      for (int64_t c = share_start(plan, part, parts); c < last; ++c) {
        run_chunk(entries[chunks[c].tensor], chunks[c].start, m);
      }
    }
  });
}

void update(at::TensorList teacher, at::TensorList student, double momentum) {
  check_momentum_value(momentum);
  check_teacher_grad_mode(teacher);
  auto plan = get_ema_plan(teacher, student);
  bump_teacher_versions(teacher);
  run_plan(*plan, momentum);
}

void ema_update_cpu(at::TensorList teacher, at::TensorList student, double momentum) {
  update(teacher, student, momentum);
}

void ema_update_tensor_cpu(at::TensorList teacher, at::TensorList student,
                           const at::Tensor& momentum) {
  if (!teacher.empty()) check_momentum_tensor(momentum, teacher[0].device());
  update(teacher, student, momentum.item<double>());
}

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CPU, m) {
  m.impl("ema_update_", &ema_update_cpu);
  m.impl("ema_update_.tensor", &ema_update_tensor_cpu);
}

}  // namespace eman_fused
