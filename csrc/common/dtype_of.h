// FloatTag of a torch dtype (host code only; the kernels see tags, never torch types).
#pragma once
#include <c10/core/ScalarType.h>

#include <optional>

#include "common/dtype.h"

namespace eman_fused {

inline std::optional<FloatTag> float_tag_of(c10::ScalarType st) {
  switch (st) {
    case c10::kFloat: return kF32;
    case c10::kBFloat16: return kBF16;
    case c10::kHalf: return kF16;
    case c10::kDouble: return kF64;
    default: return std::nullopt;
  }
}

}  // namespace eman_fused
