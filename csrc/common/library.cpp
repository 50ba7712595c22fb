// The eman_fused operator library. Each op declares its schemas beside its kernels
// (ema/schema.cpp, norm/schema.cpp, optim/schema.cpp, as TORCH_LIBRARY_FRAGMENTs); what is
// shared by all of them lives here.
#include <torch/library.h>

#include <string>

#include "common/isa.h"

namespace eman_fused {
namespace {

std::string cpu_isa_op() { return cpu_isa_name(); }

}  // namespace

TORCH_LIBRARY(eman_fused, m) {
  // The instruction set the CPU kernels chose (runtime dispatch; EMAN_FUSED_CPU_ISA overrides).
  m.def("_cpu_isa() -> str", &cpu_isa_op);
}

}  // namespace eman_fused
