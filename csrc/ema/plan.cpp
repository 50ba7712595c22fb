#include "ema/plan.h"

#include "common/overlap.h"
#include "common/parallel_chunks.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <list>
#include <mutex>
#include <sstream>
#include <vector>

namespace eman_fused {
namespace {


int64_t float_tag_or_throw(const at::Tensor& t, const char* side, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    case at::kDouble: return kF64;
    default:
      TORCH_CHECK_TYPE(false, "ema_update_: ", side, "[", i, "] has dtype ", t.scalar_type(),
                       "; floating tensors must be float32, bfloat16, float16 or float64");
  }
}

// Checks every pair, in index order, so the first offending index is the one named.
void validate_pairs(at::TensorList teacher, at::TensorList student) {
  const at::Device device = teacher[0].device();
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    TORCH_CHECK_VALUE(t.device() == device, "ema_update_: teacher[", i, "] is on ", t.device(),
                      " but teacher[0] is on ", device, "; all tensors must share one device");
    TORCH_CHECK_VALUE(s.device() == t.device(), "ema_update_: devices differ at index ", i,
                      ": teacher ", t.device(), ", student ", s.device());
    TORCH_CHECK_VALUE(t.sizes() == s.sizes(), "ema_update_: shapes differ at index ", i,
                      ": teacher ", t.sizes(), ", student ", s.sizes());
    TORCH_CHECK_TYPE(!t.is_complex() && !s.is_complex(), "ema_update_: complex tensors are not ",
                     "supported (index ", i, ": teacher ", t.scalar_type(), ", student ",
                     s.scalar_type(), ")");
    const bool tf = t.is_floating_point(), sf = s.is_floating_point();
    TORCH_CHECK_TYPE(tf == sf, "ema_update_: index ", i, " mixes integer and floating dtypes (",
                     "teacher ", t.scalar_type(), ", student ", s.scalar_type(),
                     "); integer tensors are copied, floating ones averaged");
    if (tf) {
      float_tag_or_throw(t, "teacher", i);
      float_tag_or_throw(s, "student", i);
    } else {
      TORCH_CHECK_TYPE(t.scalar_type() == s.scalar_type(), "ema_update_: integer dtypes differ ",
                       "at index ", i, ": teacher ", t.scalar_type(), ", student ",
                       s.scalar_type(), " (integer tensors are copied exactly)");
    }
    TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), "ema_update_: teacher[", i,
                      "] is not dense (strides ", t.strides(), "); pass contiguous or ",
                      "channels_last tensors");
    TORCH_CHECK_VALUE(s.is_non_overlapping_and_dense(), "ema_update_: student[", i,
                      "] is not dense (strides ", s.strides(), "); pass contiguous or ",
                      "channels_last tensors");
    // Dense with equal strides on every dimension longer than 1 means the same memory order,
    // so the pair can be walked as two flat arrays.
    for (int64_t d = 0; d < t.dim(); ++d) {
      TORCH_CHECK_VALUE(t.size(d) <= 1 || t.stride(d) == s.stride(d),
                        "ema_update_: memory layouts differ at index ", i, ": teacher strides ",
                        t.strides(), ", student strides ", s.strides(),
                        " (e.g. channels_last vs contiguous); make them match");
    }
  }
  // No teacher may share memory with any other tensor of the call: the kernels read students
  // and write teachers concurrently.
  std::vector<MemoryRange> ranges;
  ranges.reserve(2 * teacher.size());
  add_memory_ranges(ranges, teacher, "teacher", true);
  add_memory_ranges(ranges, student, "student", false);
  check_no_overlap("ema_update_", ranges, "teachers must not alias each other or a student");
}

std::shared_ptr<EmaPlan> build_plan(at::TensorList teacher, at::TensorList student) {
  std::vector<EmaTensorEntry> entries;
  std::vector<TensorChunk> chunks;
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    const at::Tensor& s = student[i];
    if (t.numel() == 0) continue;
    EmaTensorEntry e;
    e.teacher = reinterpret_cast<int64_t>(t.mutable_data_ptr());  // written (see append_key)
    e.student = reinterpret_cast<int64_t>(s.const_data_ptr());
    if (t.is_floating_point()) {
      e.numel = t.numel();
      e.kind = lerp_kind(float_tag_or_throw(t, "teacher", i), float_tag_or_throw(s, "student", i));
    } else {
      e.numel = t.numel() * static_cast<int64_t>(t.element_size());
      e.kind = kKindCopyBytes;
    }
    const auto index = static_cast<int64_t>(entries.size());
    for (int64_t start = 0; start < e.numel; start += kEmaChunkElems) chunks.push_back({index, start});
    entries.push_back(e);
  }
  auto plan = std::make_shared<EmaPlan>();
  plan->num_tensors = static_cast<int64_t>(entries.size());
  plan->num_chunks = static_cast<int64_t>(chunks.size());
  const int64_t words = plan->num_tensors * kEmaEntryWords + plan->num_chunks * kChunkWords;
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong));
  auto* out = host.mutable_data_ptr<int64_t>();
  std::copy_n(reinterpret_cast<const int64_t*>(entries.data()), plan->num_tensors * kEmaEntryWords, out);
  std::copy_n(reinterpret_cast<const int64_t*>(chunks.data()), plan->num_chunks * kChunkWords,
              out + plan->num_tensors * kEmaEntryWords);
  const at::Device device = teacher[0].device();
  plan->host_table = host;
  if (device.is_cpu()) {
    plan->table = host;
    plan->work_prefix.resize(chunks.size() + 1, 0);
    for (size_t c = 0; c < chunks.size(); ++c) {
      const int64_t n = std::min(kEmaChunkElems, entries[chunks[c].tensor].numel - chunks[c].start);
      plan->work_prefix[c + 1] = plan->work_prefix[c] + n + kChunkOverheadWork;
    }
  } else {
    // One blocking copy per miss; hits reuse the device table with no host-to-device traffic.
    plan->table = host.to(device);
    plan->alloc_stream = c10::impl::VirtualGuardImpl(device.type()).getStream(device);
  }
  return plan;
}

// The cache key holds everything the plan and its validation depend on.
void append_key(at::TensorList teacher, at::TensorList student, std::vector<int64_t>& key) {
  key.clear();
  key.push_back(static_cast<int64_t>(teacher.size()));
  for (size_t i = 0; i < teacher.size(); ++i) {
    for (int side = 0; side < 2; ++side) {
      const at::Tensor& x = side == 0 ? teacher[i] : student[i];
      TORCH_CHECK_VALUE(x.defined(), "ema_update_: ", side == 0 ? "teacher[" : "student[", i,
                        "] is an undefined tensor");
      TORCH_CHECK_VALUE(x.layout() == at::kStrided, "ema_update_: ",
                        side == 0 ? "teacher[" : "student[", i, "] has layout ", x.layout(),
                        "; only dense strided tensors are supported");
      const c10::TensorImpl* impl = x.unsafeGetTensorImpl();
      const c10::IntArrayRef sizes = impl->sizes(), strides = impl->strides();
      // The teacher's address as a write sees it: a copy-on-write storage (torch._lazy_clone)
      // is materialized here, so the plan never writes into memory another tensor shares.
      key.push_back(reinterpret_cast<int64_t>(side == 0 ? x.unsafeGetTensorImpl()->mutable_data()
                                                        : impl->data()));
      key.push_back((static_cast<int64_t>(impl->device_type()) << 32) ^
                    (static_cast<int64_t>(impl->device().index()) << 8) ^
                    static_cast<int64_t>(x.scalar_type()));
      key.push_back(static_cast<int64_t>(sizes.size()));
      key.insert(key.end(), sizes.begin(), sizes.end());
      key.insert(key.end(), strides.begin(), strides.end());
    }
  }
}

uint64_t hash_key(const std::vector<int64_t>& key) {
  uint64_t h = 0x9E3779B97F4A7C15ull;
  for (int64_t v : key) {
    h ^= static_cast<uint64_t>(v) + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  }
  return h;
}

struct CacheEntry {
  uint64_t hash;
  std::vector<int64_t> key;
  std::shared_ptr<const EmaPlan> plan;
};

// Least recently used first out. Plans are small (32 B per tensor, 16 B per chunk).
constexpr size_t kCacheCapacity = 64;
std::mutex cache_mutex;
std::list<CacheEntry> cache;
int64_t builds = 0;
// Plans a captured CUDA graph reads: a graph keeps raw device addresses and its lifetime is not
// visible from here, so these are never freed (one per distinct captured list pair).
std::vector<std::shared_ptr<const EmaPlan>> kept_for_graphs;

// Called with cache_mutex held.
void keep_for_graphs(const std::shared_ptr<const EmaPlan>& plan) {
  if (std::find(kept_for_graphs.begin(), kept_for_graphs.end(), plan) == kept_for_graphs.end()) {
    kept_for_graphs.push_back(plan);
  }
}

std::mutex launcher_mutex;
EmaLauncher launchers[static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)];

}  // namespace

void check_lengths(at::TensorList teacher, at::TensorList student) {
  TORCH_CHECK_VALUE(teacher.size() == student.size(), "ema_update_: got ", teacher.size(),
                    " teacher tensors but ", student.size(), " student tensors");
}

void check_momentum_value(double momentum) {
  TORCH_CHECK_VALUE(std::isfinite(momentum) && momentum >= 0.0 && momentum <= 1.0,
                    "ema_update_: momentum must be a finite number in [0, 1], got ", momentum);
}

void check_momentum_tensor(const at::Tensor& momentum, const at::Device& device) {
  TORCH_CHECK_VALUE(momentum.defined() && momentum.dim() == 0,
                    "ema_update_: a momentum tensor must be 0-dim, got shape ", momentum.sizes());
  TORCH_CHECK_TYPE(momentum.scalar_type() == at::kFloat || momentum.scalar_type() == at::kDouble,
                   "ema_update_: a momentum tensor must be float32 or float64, got ",
                   momentum.scalar_type());
  TORCH_CHECK_VALUE(momentum.device() == device, "ema_update_: the momentum tensor is on ",
                    momentum.device(), " but the teachers are on ", device);
  // On the CPU the value costs no synchronization to read, so it is range-checked too.
  if (momentum.device().is_cpu()) check_momentum_value(momentum_tensor_value(momentum));
}

double momentum_tensor_value(const at::Tensor& momentum) {
  if (momentum.device().is_cpu() && momentum.dim() == 0) {
    if (momentum.scalar_type() == at::kDouble) return *momentum.const_data_ptr<double>();
    if (momentum.scalar_type() == at::kFloat) return *momentum.const_data_ptr<float>();
  }
  return momentum.item<double>();
}

// The update is not recorded by autograd (it has no differentiable output; students are read as
// constants). So, under grad mode, a teacher that autograd tracks is refused, as torch's own
// in-place ops refuse a leaf or a view of a leaf that requires grad; a non-leaf teacher with
// history is refused too, since its recorded history would no longer describe its value.
void check_teacher_grad_mode(at::TensorList teacher) {
  if (!at::GradMode::is_enabled()) return;
  for (size_t i = 0; i < teacher.size(); ++i) {
    const at::Tensor& t = teacher[i];
    if (!t.requires_grad()) continue;
    TORCH_CHECK(!t.is_leaf(), "ema_update_: teacher[", i, "] is a leaf tensor that requires grad; ",
                "update under torch.no_grad() or call requires_grad_(False) on the teacher");
    TORCH_CHECK(!(t.is_view() && t._base().is_leaf()), "ema_update_: teacher[", i, "] is a view of ",
                "a leaf Variable that requires grad (torch's in-place ops refuse it too: \"a view of ",
                "a leaf Variable that requires grad is being used in an in-place operation\"); ",
                "update under torch.no_grad()");
    TORCH_CHECK(false, "ema_update_: teacher[", i, "] requires grad and has autograd history; ",
                "ema_update_ is not recorded by autograd, so a backward through the updated tensor ",
                "would be wrong: update under torch.no_grad() or update a detached tensor");
  }
}

void bump_teacher_versions(at::TensorList teacher) {
  for (const at::Tensor& t : teacher) t.unsafeGetTensorImpl()->bump_version();
}

void validate_ema_lists(at::TensorList teacher, at::TensorList student) {
  check_lengths(teacher, student);
  std::vector<int64_t> key;
  append_key(teacher, student, key);
  if (!teacher.empty()) validate_pairs(teacher, student);
}

std::shared_ptr<const EmaPlan> get_ema_plan(at::TensorList teacher, at::TensorList student,
                                            const char* build_refused, bool captured) {
  check_lengths(teacher, student);
  thread_local std::vector<int64_t> key;
  append_key(teacher, student, key);
  const uint64_t h = hash_key(key);
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    for (auto it = cache.begin(); it != cache.end(); ++it) {
      if (it->hash == h && it->key == key) {
        cache.splice(cache.begin(), cache, it);
        if (captured) keep_for_graphs(cache.front().plan);
        return cache.front().plan;
      }
    }
  }
  TORCH_CHECK(build_refused == nullptr, build_refused);
  if (teacher.empty()) {
    auto empty = std::make_shared<EmaPlan>();
    empty->table = at::empty({0}, at::TensorOptions().dtype(at::kLong));
    empty->host_table = empty->table;
    return empty;
  }
  validate_pairs(teacher, student);
  std::shared_ptr<const EmaPlan> plan = build_plan(teacher, student);
  std::lock_guard<std::mutex> lock(cache_mutex);
  ++builds;
  cache.push_front({h, key, plan});
  if (cache.size() > kCacheCapacity) cache.pop_back();
  if (captured) keep_for_graphs(plan);
  return plan;
}

int64_t ema_plan_builds() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return builds;
}

void clear_ema_plan_cache() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  cache.clear();
}

int64_t ema_plans_cached() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return static_cast<int64_t>(cache.size());
}

void keep_ema_plan_for_graphs(const std::shared_ptr<const EmaPlan>& plan) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  keep_for_graphs(plan);
}

int64_t ema_plans_kept_for_graphs() {
  std::lock_guard<std::mutex> lock(cache_mutex);
  return static_cast<int64_t>(kept_for_graphs.size());
}

void register_ema_launcher(c10::DeviceType device, EmaLauncher launcher) {
  std::lock_guard<std::mutex> lock(launcher_mutex);
  launchers[static_cast<size_t>(device)] = launcher;
}

// Registration happens in static initializers, before any caller can ask: no lock on reads.
const EmaLauncher* ema_launcher(c10::DeviceType device) {
  const EmaLauncher& l = launchers[static_cast<size_t>(device)];
  return l.launch != nullptr ? &l : nullptr;
}

}  // namespace eman_fused
