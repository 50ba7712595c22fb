#include "posthoc/plan.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <list>
#include <mutex>

#include "common/parallel_chunks.h"
#include "ema/plan.h"

namespace eman_fused {
namespace {

// The EMA plan of the K*N (profile, student) pairs is the validation and its cache: a hit
// there means nothing changed, and its entries are the pairs in order, profile-major.
std::vector<at::Tensor> repeated(at::TensorList student, int64_t k) {
  std::vector<at::Tensor> out;
  out.reserve(student.size() * k);
  for (int64_t j = 0; j < k; ++j) out.insert(out.end(), student.begin(), student.end());
  return out;
}

std::shared_ptr<PosthocPlan> build_plan(const EmaPlan& pairs, int64_t k, const at::Device& device) {
  TORCH_INTERNAL_ASSERT(pairs.num_tensors % k == 0);
  const int64_t m = pairs.num_tensors / k;  // non-empty tensors per profile
  const EmaTensorEntry* e = pairs.host_entries();  // entries() is on the device for a CUDA plan
  std::vector<PosthocTensorEntry> entries(m);
  std::vector<TensorChunk> chunks;
  for (int64_t i = 0; i < m; ++i) {
    PosthocTensorEntry& p = entries[i];
    p.student = e[i].student;
    p.numel = e[i].numel;
    p.kind = e[i].kind;
    p.num_profiles = k;
    std::fill(std::begin(p.profiles), std::end(p.profiles), 0);
    for (int64_t j = 0; j < k; ++j) {
      const EmaTensorEntry& q = e[j * m + i];
      TORCH_CHECK_TYPE(q.kind == p.kind, "posthoc_ema_update_: profile ", j, " of tensor ", i,
                       " has another dtype than profile 0; every profile of a tensor must share "
                       "one dtype");
      p.profiles[j] = q.teacher;
    }
    for (int64_t start = 0; start < p.numel; start += kPosthocChunkElems) chunks.push_back({i, start});
  }
  auto plan = std::make_shared<PosthocPlan>();
  plan->num_tensors = m;
  plan->num_chunks = static_cast<int64_t>(chunks.size());
  const int64_t words = m * kPosthocEntryWords + plan->num_chunks * kChunkWords;
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong));
  auto* out = host.mutable_data_ptr<int64_t>();
  std::copy_n(reinterpret_cast<const int64_t*>(entries.data()), m * kPosthocEntryWords, out);
  std::copy_n(reinterpret_cast<const int64_t*>(chunks.data()), plan->num_chunks * kChunkWords,
              out + m * kPosthocEntryWords);
  if (device.is_cpu()) {
    plan->table = host;
    plan->work_prefix.resize(chunks.size() + 1, 0);
    for (size_t c = 0; c < chunks.size(); ++c) {
      const int64_t n =
          std::min(kPosthocChunkElems, entries[chunks[c].tensor].numel - chunks[c].start);
      plan->work_prefix[c + 1] = plan->work_prefix[c] + k * n + kChunkOverheadWork;
    }
  } else {
    plan->table = host.to(device);  // one blocking copy per miss
    plan->alloc_stream = c10::impl::VirtualGuardImpl(device.type()).getStream(device);
  }
  return plan;
}

struct CacheEntry {
  std::shared_ptr<const EmaPlan> pairs;  // held, so its address identifies it while cached
  int64_t k;
  std::shared_ptr<const PosthocPlan> plan;
};
constexpr size_t kCacheCapacity = 16;
std::mutex cache_mutex;
std::list<CacheEntry> cache;
int64_t builds = 0;

}  // namespace

int64_t check_posthoc_lists(at::TensorList profiles, at::TensorList student,
                            c10::ArrayRef<double> gammas) {
  const auto k = static_cast<int64_t>(gammas.size());
  TORCH_CHECK_VALUE(k >= 1 && k <= kMaxPosthocProfiles, "posthoc_ema_update_: got ", k,
                    " gammas; the number of profiles must be in [1, ", kMaxPosthocProfiles, "]");
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK_VALUE(std::isfinite(gammas[j]) && gammas[j] > 0.0, "posthoc_ema_update_: ",
                      "gamma[", j, "] must be a finite number > 0, got ", gammas[j]);
  }
  TORCH_CHECK_VALUE(profiles.size() == student.size() * static_cast<size_t>(k),
                    "posthoc_ema_update_: got ", profiles.size(), " profile tensors for ", k,
                    " profiles of ", student.size(), " student tensors (expected ",
                    student.size() * k, ": profile k's copy of student[i] at k * N + i)");
  return k;
}

void check_posthoc_step(const at::Tensor& step, const at::Device& device) {
  TORCH_CHECK_VALUE(step.defined() && step.dim() == 0 && step.scalar_type() == at::kLong,
                    "posthoc_ema_update_: step must be a 0-dim int64 tensor, got ",
                    step.defined() ? step.toString() : std::string("undefined"), " of shape ",
                    step.defined() ? step.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(step.device() == device, "posthoc_ema_update_: the step tensor is on ",
                    step.device(), " but the profiles are on ", device);
  if (step.device().is_cpu()) {
    TORCH_CHECK_VALUE(step.item<int64_t>() >= 0, "posthoc_ema_update_: step (the number of ",
                      "updates done so far) must be >= 0, got ", step.item<int64_t>());
  }
}

void check_posthoc_grad_mode(at::TensorList profiles) {
  if (!at::GradMode::is_enabled()) return;
  for (size_t i = 0; i < profiles.size(); ++i) {
    TORCH_CHECK(!(profiles[i].requires_grad() && profiles[i].is_leaf()), "posthoc_ema_update_: ",
                "profiles[", i, "] is a leaf tensor that requires grad; update under "
                "torch.no_grad() or call requires_grad_(False) on it");
  }
}

std::shared_ptr<const PosthocPlan> get_posthoc_plan(at::TensorList profiles,
                                                    at::TensorList student, int64_t k,
                                                    const char* build_refused) {
  if (profiles.empty()) {  // the EMA planner does not cache empty lists; nothing to run
    auto empty = std::make_shared<PosthocPlan>();
    empty->table = at::empty({0}, at::TensorOptions().dtype(at::kLong));
    return empty;
  }
  const std::vector<at::Tensor> rep = repeated(student, k);
  std::shared_ptr<const EmaPlan> pairs = get_ema_plan(profiles, rep, build_refused);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if (it->pairs == pairs && it->k == k) {
        cache.splice(cache.begin(), cache, it);
        return cache.front().plan;
      }
    }
  }
  TORCH_CHECK(build_refused == nullptr, build_refused);
  const at::Device device = profiles[0].device();
  std::shared_ptr<const PosthocPlan> plan = build_plan(*pairs, k, device);
  std::lock_guard<std::mutex> lock(cache_mutex);
  ++builds;
  cache.push_front({pairs, k, plan});
  if (cache.size() > kCacheCapacity) cache.pop_back();
  return plan;
}

int64_t posthoc_plan_builds() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return builds;
}

}  // namespace eman_fused
