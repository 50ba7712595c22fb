// Which instruction set the CPU kernels use, decided once: AVX2 where the processor has it,
// else baseline x86-64; EMAN_FUSED_CPU_ISA=baseline|avx2 overrides (tests compare the two).
#pragma once
#include <cstdlib>
#include <cstring>

namespace eman_fused {

enum class CpuIsa { kBaseline, kAvx2 };

inline CpuIsa detect_cpu_isa() {
  const char* forced = std::getenv("EMAN_FUSED_CPU_ISA");
#if defined(__x86_64__) && defined(__GNUC__)
  const bool has_avx2 = __builtin_cpu_supports("avx2");
#else
  const bool has_avx2 = false;
#endif
  if (forced && std::strcmp(forced, "baseline") == 0) return CpuIsa::kBaseline;
  return has_avx2 ? CpuIsa::kAvx2 : CpuIsa::kBaseline;
}

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

}  // namespace eman_fused
