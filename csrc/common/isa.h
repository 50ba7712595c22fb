// Which instruction set the CPU kernels use, decided once: AVX2 where the processor has it,
// else baseline x86-64; EMAN_FUSED_CPU_ISA=baseline|avx2 overrides (tests compare the two).
//
// Each op's loops are compiled twice from one file (common/isa_loops.h: namespaces `baseline`
// and `avx2`), and one macro picks the build for this process:
//   EMAN_FUSED_ISA_FN(run_chunk)(args...)    EMAN_FUSED_ISA_FN(sgd_span<PT, TT>)(args...)
// AVX2 only, not FMA: the same IEEE operations in the same order, so every machine (and the
// CUDA and Triton kernels) gets the same bits.
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

inline const char* cpu_isa_name() {
  return cpu_isa() == CpuIsa::kAvx2 ? "avx2" : "baseline x86-64";
}

}  // namespace eman_fused

// The function `fn` (a name, template arguments allowed) of the loops built for this process's
// instruction set. Where there is no AVX2 build, `avx2` is an alias of `baseline`.
#define EMAN_FUSED_ISA_FN(...)                                                     \
  (::eman_fused::cpu_isa() == ::eman_fused::CpuIsa::kAvx2 ? &avx2::__VA_ARGS__ \
                                                          : &baseline::__VA_ARGS__)
