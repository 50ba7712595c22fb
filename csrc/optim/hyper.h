// The fused optimizers: which one a step op call runs, how each hyper-parameter is checked, and
// the per-optimizer traits the host code dispatches on. The hyper-parameter lists themselves,
// X(name, check), live in optim/math.h beside the math that reads them; from them come the
// structs the kernels read, the checks here, and the names Python reads through
// _C.table_layout() (it takes each value from the param group's key of that name).
// Torch-free (the .cu files use it).
#pragma once
#include <cstdint>

#include "optim/math.h"

namespace eman_fused {

// Which optimizer a step op call runs (its first argument). The two LARS formulas share the
// hyper-parameters and the two passes, and differ in the trust ratio and the update.
enum class Optimizer : int64_t { kSgd = 0, kAdamW = 1, kLarsSimclr = 2, kLarsYou2017 = 3 };
constexpr int64_t kNumOptimizers = 4;

// How a value is checked before anything is written (every value must also be finite).
enum class HyperCheck : int64_t {
  kFinite = 0,       // any finite value
  kNonNegative = 1,  // [0, inf)
  kUnit = 2,         // [0, 1]
  kBelowOne = 3,     // [0, 1)
  kFlag = 4,         // 0 or 1 (a bool)
};


struct HyperInfo {
  const char* name;
  HyperCheck check;
};
#define EMAN_FUSED_HYPER_INFO(name, check) HyperInfo{#name, HyperCheck::check},
inline constexpr HyperInfo kSgdHyperInfo[] = {EMAN_FUSED_SGD_HYPER(EMAN_FUSED_HYPER_INFO)};
inline constexpr HyperInfo kAdamWHyperInfo[] = {EMAN_FUSED_ADAMW_HYPER(EMAN_FUSED_HYPER_INFO)};
inline constexpr HyperInfo kLarsHyperInfo[] = {EMAN_FUSED_LARS_HYPER(EMAN_FUSED_HYPER_INFO)};
#undef EMAN_FUSED_HYPER_INFO

// The most hyper-parameters any optimizer has (the CUDA launch carries them in fixed arrays).
constexpr int64_t kMaxHyper = 12;

// Per optimizer: its hyper struct, the list describing it, and its name in messages.
template <Optimizer O>
struct OptimizerTraits;
template <>
struct OptimizerTraits<Optimizer::kSgd> {
  using Hyper = SgdHyper;
  static constexpr const HyperInfo* info = kSgdHyperInfo;
  static constexpr int64_t count = sizeof(kSgdHyperInfo) / sizeof(HyperInfo);
  static constexpr const char* name = "SGD";
};
template <>
struct OptimizerTraits<Optimizer::kAdamW> {
  using Hyper = AdamWHyper;
  static constexpr const HyperInfo* info = kAdamWHyperInfo;
  static constexpr int64_t count = sizeof(kAdamWHyperInfo) / sizeof(HyperInfo);
  static constexpr const char* name = "AdamW";
};
template <>
struct OptimizerTraits<Optimizer::kLarsSimclr> {
  using Hyper = LarsHyper;
  static constexpr const HyperInfo* info = kLarsHyperInfo;
  static constexpr int64_t count = sizeof(kLarsHyperInfo) / sizeof(HyperInfo);
  static constexpr const char* name = "LARS (simclr)";
};
template <>
struct OptimizerTraits<Optimizer::kLarsYou2017> : OptimizerTraits<Optimizer::kLarsSimclr> {
  static constexpr const char* name = "LARS (you2017)";
};

template <Optimizer O>
struct OptimizerTag {
  static constexpr Optimizer value = O;
  using Traits = OptimizerTraits<O>;
};

// Calls f(OptimizerTag<O>{}) for the optimizer `o`; false for an unknown value.
template <typename F>
bool visit_optimizer(int64_t o, F&& f) {
  switch (static_cast<Optimizer>(o)) {
    case Optimizer::kSgd: f(OptimizerTag<Optimizer::kSgd>{}); return true;
    case Optimizer::kAdamW: f(OptimizerTag<Optimizer::kAdamW>{}); return true;
    case Optimizer::kLarsSimclr: f(OptimizerTag<Optimizer::kLarsSimclr>{}); return true;
    case Optimizer::kLarsYou2017: f(OptimizerTag<Optimizer::kLarsYou2017>{}); return true;
  }
  return false;
}

constexpr bool is_lars(Optimizer o) {
  return o == Optimizer::kLarsSimclr || o == Optimizer::kLarsYou2017;
}

}  // namespace eman_fused
