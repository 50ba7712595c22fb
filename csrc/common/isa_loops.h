// Compiles an op's loop file (EMAN_FUSED_LOOPS, a path) twice, in namespaces `baseline` and
// `avx2` (the latter under `#pragma GCC target("avx2")`), for EMAN_FUSED_ISA_FN to choose from
// at run time (common/isa.h). Included once per op, inside that op's namespace, after what the
// loops use; deliberately without an include guard.
#ifndef EMAN_FUSED_LOOPS
#error "define EMAN_FUSED_LOOPS (the loop file) before including common/isa_loops.h"
#endif
namespace baseline {
#include EMAN_FUSED_LOOPS
}  // namespace baseline
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
#include EMAN_FUSED_LOOPS
}  // namespace avx2
#pragma GCC pop_options
#else
namespace avx2 = baseline;
#endif
#undef EMAN_FUSED_LOOPS
