// One spelling of a kernel launch for the .cu launchers:
//   EMAN_FUSED_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...);
// is kernel<<<grid, block, shared_bytes, stream>>>(args...) under nvcc. The kernel comes last
// so a template-id with commas (forward_rows<T, S, Acc>) needs no parentheses. When the test
// suite compiles the .cu sources as host C++ for its CPU emulator, its shim header
// (tests/emulated/cuda_emu.h, force-included first) defines EMAN_FUSED_EMULATED_LAUNCH and
// the same line runs the grid there.
#pragma once

#if defined(EMAN_FUSED_EMULATED_LAUNCH)
#define EMAN_FUSED_LAUNCH(grid, block, shared_bytes, stream, ...) \
  EMAN_FUSED_EMULATED_LAUNCH(grid, block, shared_bytes, stream, __VA_ARGS__)
#else
#define EMAN_FUSED_LAUNCH(grid, block, shared_bytes, stream, ...) \
  __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#endif
