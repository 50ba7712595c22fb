// CPU backend of posthoc_ema_update_: the shared plan, parallel over chunks, every profile of
// a chunk updated from one read of its student tile.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/convert.h"
#include "common/dtype.h"
#include "common/isa.h"
#include "common/parallel_chunks.h"
#include "posthoc/plan.h"

namespace eman_fused {
namespace {

#define EMAN_FUSED_LOOPS "posthoc/cpu_loops.inc"
#include "common/isa_loops.h"

void posthoc_ema_update_cpu(at::TensorList profiles, at::TensorList student,
                            const at::Tensor& step, c10::ArrayRef<double> gammas) {
  const int64_t k = check_posthoc_lists(profiles, student, gammas);
  if (profiles.empty()) return;
  check_posthoc_step(step, profiles[0].device());
  check_posthoc_grad_mode(profiles);
  auto plan = get_posthoc_plan(profiles, student, k);
  for (const at::Tensor& p : profiles) p.unsafeGetTensorImpl()->bump_version();
  step.unsafeGetTensorImpl()->bump_version();
  const int64_t now = step.item<int64_t>() + 1;
  step.fill_(now);
  // EDM2's power-function coefficient, in double (eman_fused.reference.power_beta).
  const double t = static_cast<double>(now);
  double betas[kMaxPosthocProfiles];
  for (int64_t j = 0; j < k; ++j) betas[j] = std::pow(1.0 - 1.0 / t, gammas[j] + 1.0);
  const PosthocTensorEntry* entries = plan->entries();
  const TensorChunk* chunks = plan->chunks();
  const auto run = EMAN_FUSED_ISA_FN(run_chunk);
  parallel_over_chunks(plan->work_prefix, plan->num_chunks, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) run(entries[chunks[c].tensor], chunks[c].start, betas);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(eman_fused, CPU, m) {
  m.impl("posthoc_ema_update_", &posthoc_ema_update_cpu);
}

}  // namespace eman_fused
