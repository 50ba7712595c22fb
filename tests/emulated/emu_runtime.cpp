// The CPU emulator behind cuda_emu.h: launches, fibers, barriers, warp exchange, faults, and the
// guarded buffers the tests hand to the kernels. Test-only; compiled by tests/emulated/build.py.
//
// One launch runs its blocks one after another on the calling OS thread (in a seeded random
// order in the random modes). The threads of a block are fibers with their own stacks; a fiber
// runs until it reaches __syncthreads, a warp shuffle or its end, then the scheduler picks the
// next runnable fiber: in thread order, uniformly at random, or by random warp priorities (see
// Order), so code that relies on an order the GPU does not promise gives different results.
//
// Nothing here is thread_local: the module's TLS block then holds only the kernels' __shared__
// arrays (cuda_emu.h makes them thread_local), and the runtime can poison all of it (0xFF bytes,
// NaN in every float type) before each block, as a GPU gives a block uninitialised shared memory.
#include <dlfcn.h>
#include <link.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "cuda_emu.h"
#undef reinterpret_cast  // the checked cast is for kernel code

// The context switch (x86-64 assembly below) and the first frame of every fiber.
extern "C" void emu_switch_stacks(void** save_sp, void* load_sp);
extern "C" [[noreturn]] void emu_fiber_entry();

namespace emu {

ThreadCtx* current = nullptr;

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // -O0 --coverage frames are large
constexpr unsigned char kPoison = 0xFF;     // shared memory at block start, buffer slack

size_t page_size() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}

// ---- context switch -------------------------------------------------------------------------
// x86-64: callee-saved registers, MXCSR and the x87 control word on the stack, then swap stack
// pointers (no signal-mask system call, unlike swapcontext).
asm(R"(
  .text
  .p2align 4
  .globl emu_switch_stacks
  .hidden emu_switch_stacks
  .type emu_switch_stacks, @function
emu_switch_stacks:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stacks, .-emu_switch_stacks
)");
static_assert(sizeof(void*) == 8, "the emulator's context switch is written for x86-64");

enum class State : uint8_t { kRunnable, kBarrier, kWarp, kDone };

struct Fiber {
  ThreadCtx ctx{};
  void* sp = nullptr;
  char* stack = nullptr;  // mapping: [guard page][kStackBytes]
  State state = State::kRunnable;
  int linear = 0;
  unsigned warp_gen = 0;  // generation of the warp exchange this lane waits in
};

struct Warp {
  uint64_t slots[2][32];
  unsigned gen = 0;
  unsigned mask = 0;
  int arrived = 0;
  int lanes = 0;  // threads of the block in this warp
};

struct Alloc {
  char* map;  // [guard][data pages][guard]
  size_t map_bytes;
  char* data;  // the buffer handed out
  size_t bytes;
};

struct Fault {
  cudaError_t code = cudaSuccess;
};

std::mutex launch_mutex;
std::vector<Fiber> fibers;
std::vector<Warp> warps;
std::vector<int> runnable;
BlockCtx block_ctx;
void* scheduler_sp = nullptr;
Fiber* running = nullptr;
const std::function<void()>* body = nullptr;
Fault sticky;                        // a kernel fault: every later launch fails, as on a GPU
cudaError_t last_error = cudaSuccess;  // cudaGetLastError: returned once, then cleared
std::string message;                   // what the last failed launch said
// kSequential: thread order. kRandom: any runnable thread, uniformly. kWarps: warps in a random
// priority order (reshuffled at every barrier), the highest-priority runnable warp first, so one
// warp can run far ahead of another as on a GPU (a uniform pick almost never lets all 32 lanes
// of one warp pass several shuffles before some other thread's next step).
enum class Order { kSequential, kRandom, kWarps };
Order order_mode = Order::kSequential;
std::vector<int> warp_rank;
uint64_t seed = 0;
uint64_t launch_count = 0;
std::mt19937_64 rng;
std::map<uintptr_t, Alloc> allocs;  // by data address
struct sigaction previous_segv;
stack_t previous_altstack;
std::vector<char> altstack(64 * 1024);
thread_local volatile char tls_anchor;  // touched so this module's TLS block exists before poisoning

void set_message(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  message = buf;
}

char* map_with_guards(size_t data_bytes, size_t* map_bytes) {
  const size_t p = page_size();
  *map_bytes = data_bytes + 2 * p;
  void* m = mmap(nullptr, *map_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    std::perror("emu: mmap");
    std::abort();
  }
  char* c = static_cast<char*>(m);
  mprotect(c, p, PROT_NONE);
  mprotect(c + p + data_bytes, p, PROT_NONE);
  return c;
}

// ---- fibers ---------------------------------------------------------------------------------

void ensure_fibers(size_t n) {
  while (fibers.size() < n) {
    Fiber f;
    size_t map_bytes;
    f.stack = map_with_guards(kStackBytes, &map_bytes);
    fibers.push_back(f);
  }
}

void init_fiber(Fiber& f) {
  // Top of stack, 16-byte aligned: [0 fake return][emu_fiber_entry][rbp rbx r12-r15][mxcsr|fpcw]
  // so that `ret` enters emu_fiber_entry with rsp = 8 (mod 16), as after a call.
  auto* top = reinterpret_cast<uint64_t*>(f.stack + page_size() + kStackBytes);
  top[-1] = 0;
  top[-2] = reinterpret_cast<uint64_t>(&emu_fiber_entry);
  for (int k = 3; k <= 8; ++k) top[-k] = 0;
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  top[-9] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpcw) << 32);
  f.sp = &top[-9];
}

[[noreturn]] void to_scheduler() {
  void* dead;
  emu_switch_stacks(&dead, scheduler_sp);
  __builtin_unreachable();
}

void yield_to_scheduler() { emu_switch_stacks(&running->sp, scheduler_sp); }

bool in_stack_guard(uintptr_t a, const Fiber** which) {
  for (const Fiber& f : fibers) {
    const auto g = reinterpret_cast<uintptr_t>(f.stack);
    if (a >= g && a < g + page_size()) {
      *which = &f;
      return true;
    }
  }
  return false;
}

// ---- faults ---------------------------------------------------------------------------------

const char* describe_thread(char* buf, size_t n) {
  if (running == nullptr) return "host code";
  snprintf(buf, n, "block (%u,%u,%u) thread (%u,%u,%u)", block_ctx.block_idx.x,
           block_ctx.block_idx.y, block_ctx.block_idx.z, running->ctx.thread_idx.x,
           running->ctx.thread_idx.y, running->ctx.thread_idx.z);
  return buf;
}

// Where an address lies relative to the guarded buffers (for fault messages).
std::string locate(uintptr_t a) {
  char buf[256];
  for (const auto& [start, al] : allocs) {
    const auto m = reinterpret_cast<uintptr_t>(al.map);
    if (a < m || a >= m + al.map_bytes) continue;
    const long long off = static_cast<long long>(a) - static_cast<long long>(start);
    snprintf(buf, sizeof buf, "byte %lld of a %zu-byte buffer at %p", off, al.bytes,
             reinterpret_cast<void*>(start));
    return buf;
  }
  snprintf(buf, sizeof buf, "address %p, in no emulator buffer", reinterpret_cast<void*>(a));
  return buf;
}

void segv_handler(int sig, siginfo_t* info, void* uctx) {
  if (running == nullptr) {  // not in a kernel: not ours; let the previous handler see it
    sigaction(SIGSEGV, &previous_segv, nullptr);
    return;  // the faulting instruction runs again and reaches that handler
  }
  (void)sig;
  (void)uctx;
  const auto a = reinterpret_cast<uintptr_t>(info->si_addr);
  char who[96];
  const Fiber* f;
  if (in_stack_guard(a, &f)) {
    sticky = {cudaErrorIllegalAddress};
    set_message("stack overflow of the fiber of %s", describe_thread(who, sizeof who));
  } else {
    sticky = {cudaErrorIllegalAddress};
    set_message("out-of-bounds access: %s, by %s", locate(a).c_str(),
                describe_thread(who, sizeof who));
  }
  to_scheduler();  // abandons this handler's frame on the alternate stack (SA_NODEFER)
}

void install_segv_handler() {
  stack_t ss{};
  ss.ss_sp = altstack.data();
  ss.ss_size = altstack.size();
  sigaltstack(&ss, &previous_altstack);
  struct sigaction sa {};
  sa.sa_sigaction = segv_handler;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &previous_segv);
}

void restore_segv_handler() {
  sigaction(SIGSEGV, &previous_segv, nullptr);
  sigaltstack(&previous_altstack, nullptr);
}

// ---- shared memory poisoning ----------------------------------------------------------------

struct TlsBlock {
  void* data = nullptr;
  size_t bytes = 0;
};

int find_tls(struct dl_phdr_info* info, size_t, void* out) {
  Dl_info self;
  if (dladdr(reinterpret_cast<void*>(&find_tls), &self) == 0) return 0;
  if (reinterpret_cast<uintptr_t>(self.dli_fbase) != info->dlpi_addr) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type == PT_TLS) {
      auto* t = static_cast<TlsBlock*>(out);
      t->data = info->dlpi_tls_data;
      t->bytes = info->dlpi_phdr[i].p_memsz;
      return 1;
    }
  }
  return 1;
}

// This module's TLS block in the calling thread: the kernels' __shared__ arrays.
TlsBlock shared_memory() {
  tls_anchor = 1;  // dlopen'ed modules get their TLS block at the first access
  TlsBlock t;
  dl_iterate_phdr(find_tls, &t);
  return t;
}

TlsBlock shared_block;

void poison_shared_memory() {
  if (shared_block.data != nullptr) std::memset(shared_block.data, kPoison, shared_block.bytes);
}

// ---- one block --------------------------------------------------------------------------------

void rank_warps() {
  if (order_mode != Order::kWarps) return;
  warp_rank.resize(warps.size());
  for (size_t w = 0; w < warp_rank.size(); ++w) warp_rank[w] = static_cast<int>(w);
  std::shuffle(warp_rank.begin(), warp_rank.end(), rng);
}

int pick() {
  size_t k = 0;
  if (order_mode == Order::kRandom) {
    k = std::uniform_int_distribution<size_t>(0, runnable.size() - 1)(rng);
  } else if (order_mode == Order::kWarps) {  // highest-priority warp, then lane order
    auto key = [](int f) { return warp_rank[f / 32] * 32 + f % 32; };
    for (size_t j = 1; j < runnable.size(); ++j) {
      if (key(runnable[j]) < key(runnable[k])) k = j;
    }
  }
  const int f = runnable[k];
  if (order_mode == Order::kSequential) {
    runnable.erase(runnable.begin());
  } else {
    runnable[k] = runnable.back();
    runnable.pop_back();
  }
  return f;
}

bool block_fault(cudaError_t code, const char* what) {
  sticky = {code};
  set_message("%s in block (%u,%u,%u)", what, block_ctx.block_idx.x, block_ctx.block_idx.y,
              block_ctx.block_idx.z);
  return false;
}

// Runs every thread of the block to its end; false on a fault (sticky holds it).
bool run_block(int n) {
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    const dim3& bd = block_ctx.block_dim;
    f.ctx.thread_idx = dim3(i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y));
    f.ctx.block = &block_ctx;
    f.state = State::kRunnable;
    f.linear = i;
    init_fiber(f);
  }
  warps.assign((n + 31) / 32, Warp{});
  for (int w = 0; w < static_cast<int>(warps.size()); ++w) warps[w].lanes = std::min(32, n - 32 * w);
  runnable.clear();
  for (int i = 0; i < n; ++i) runnable.push_back(i);
  rank_warps();
  poison_shared_memory();
  for (;;) {
    while (!runnable.empty()) {
      Fiber& f = fibers[pick()];
      running = &f;
      current = &f.ctx;
      emu_switch_stacks(&scheduler_sp, f.sp);
      current = nullptr;
      running = nullptr;
      if (sticky.code != cudaSuccess) return false;
    }
    int done = 0, barrier = 0, warp = 0;
    for (int i = 0; i < n; ++i) {
      done += fibers[i].state == State::kDone;
      barrier += fibers[i].state == State::kBarrier;
      warp += fibers[i].state == State::kWarp;
    }
    if (done == n) return true;
    if (warp > 0) {
      return block_fault(cudaErrorLaunchFailure,
                         "deadlock: a warp shuffle waits for lanes that exited or wait at "
                         "__syncthreads");
    }
    if (done > 0) {
      char what[160];
      snprintf(what, sizeof what, "__syncthreads reached by %d threads while %d have exited",
               barrier, done);
      return block_fault(cudaErrorLaunchFailure, what);
    }
    for (int i = 0; i < n; ++i) {  // every thread is at the barrier: release them
      fibers[i].state = State::kRunnable;
      runnable.push_back(i);
    }
    rank_warps();
  }
}

}  // namespace

// ---- the API cuda_emu.h declares ----------------------------------------------------------------

void syncthreads() {
  if (running == nullptr) fault(cudaErrorLaunchFailure, "__syncthreads outside a kernel", "", 0);
  running->state = State::kBarrier;
  yield_to_scheduler();
}

uint64_t warp_exchange(unsigned mask, uint64_t deposit, int delta, int width) {
  if (running == nullptr) fault(cudaErrorLaunchFailure, "warp shuffle outside a kernel", "", 0);
  const int lane = running->linear % 32;
  Warp& w = warps[running->linear / 32];
  const unsigned present = w.lanes == 32 ? 0xffffffffu : (1u << w.lanes) - 1;
  if (width != 32) fault(cudaErrorLaunchFailure, "__shfl_down_sync: only width 32 is emulated", "", 0);
  if ((mask & (1u << lane)) == 0 || (mask & ~present) != 0) {
    fault(cudaErrorLaunchFailure, "__shfl_down_sync: the mask names lanes that do not exist or "
          "omits the calling lane", "", 0);
  }
  if (w.arrived > 0 && w.mask != mask) {
    fault(cudaErrorLaunchFailure, "__shfl_down_sync: lanes of one warp disagree on the mask", "", 0);
  }
  w.mask = mask;
  const unsigned gen = w.gen;
  w.slots[gen % 2][lane] = deposit;
  running->warp_gen = gen;
  running->state = State::kWarp;
  if (++w.arrived == __builtin_popcount(mask)) {  // the last lane releases the warp
    w.arrived = 0;
    ++w.gen;
    const int base = (running->linear / 32) * 32;
    for (int l = 0; l < 32; ++l) {
      if ((mask >> l) & 1u) {
        fibers[base + l].state = State::kRunnable;
        if (base + l != running->linear) runnable.push_back(base + l);
      }
    }
    // The last lane keeps running (it is not on the runnable list).
  } else {
    yield_to_scheduler();
  }
  const int src = lane + delta;
  return src < 32 && ((mask >> src) & 1u) ? w.slots[gen % 2][src] : deposit;
}

void fault(cudaError_t code, const char* what, const char* file, int line) {
  char who[96];
  sticky = {code};
  if (line > 0) {
    set_message("%s at %s:%d, by %s", what, file, line, describe_thread(who, sizeof who));
  } else {
    set_message("%s, by %s", what, describe_thread(who, sizeof who));
  }
  if (running == nullptr) std::abort();  // host code: a bug in the harness itself
  to_scheduler();
}

void check_alignment(const void* p, size_t align, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % align == 0) return;
  char what[128];
  snprintf(what, sizeof what, "misaligned address %p for a %zu-byte-aligned type", p, align);
  fault(cudaErrorMisalignedAddress, what, file, line);
}

namespace {
// Buffer slack (between a buffer and its guard pages) must still hold the poison bytes.
bool check_canaries() {
  const size_t p = page_size();
  for (const auto& [start, al] : allocs) {
    char* lo = al.map + p;
    char* hi = al.map + al.map_bytes - p;
    for (const char* c = lo; c < hi; ++c) {
      if (c >= al.data && c < al.data + al.bytes) {
        c = al.data + al.bytes - 1;
        continue;
      }
      if (static_cast<unsigned char>(*c) != kPoison) {
        sticky = {cudaErrorIllegalAddress};
        set_message("out-of-bounds write: %s (its guard bytes changed)",
                    locate(reinterpret_cast<uintptr_t>(c)).c_str());
        std::memset(lo, kPoison, al.data - lo);  // reported once
        std::memset(al.data + al.bytes, kPoison, hi - (al.data + al.bytes));
        return false;
      }
    }
  }
  return true;
}
}  // namespace

void launch(const LaunchSpec& s, const std::function<void()>& kernel_body) {
  std::lock_guard<std::mutex> lock(launch_mutex);
  if (sticky.code != cudaSuccess) {  // a faulted context refuses further work
    last_error = sticky.code;
    return;
  }
  const dim3 g = s.grid, b = s.block;
  const uint64_t threads = uint64_t{b.x} * b.y * b.z;
  // The driver's checks (cudaErrorInvalidConfiguration, "invalid configuration argument").
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0 || threads > 1024 ||
      b.x > 1024 || b.y > 1024 || b.z > 64 || g.x > 2147483647u || g.y > 65535 || g.z > 65535) {
    last_error = cudaErrorInvalidConfiguration;
    set_message("invalid configuration argument: grid (%u,%u,%u), block (%u,%u,%u) at %s:%d", g.x,
                g.y, g.z, b.x, b.y, b.z, s.file, s.line);
    return;
  }
  ++launch_count;
  rng.seed(seed * 0x9E3779B97F4A7C15ull + launch_count);
  std::vector<uint64_t> order(uint64_t{g.x} * g.y * g.z);
  for (uint64_t i = 0; i < order.size(); ++i) order[i] = i;
  if (order_mode != Order::kSequential) std::shuffle(order.begin(), order.end(), rng);
  ensure_fibers(threads);
  shared_block = shared_memory();
  body = &kernel_body;
  block_ctx.block_dim = b;
  block_ctx.grid_dim = g;
  install_segv_handler();
  bool ok = true;
  for (uint64_t id : order) {
    block_ctx.block_idx = dim3(id % g.x, (id / g.x) % g.y, id / (uint64_t{g.x} * g.y));
    if (!(ok = run_block(static_cast<int>(threads)))) break;
  }
  restore_segv_handler();
  body = nullptr;
  if (ok) ok = check_canaries();
  if (!ok) last_error = sticky.code;
}

}  // namespace emu

extern "C" [[noreturn]] void emu_fiber_entry() {
  (*emu::body)();
  emu::running->state = emu::State::kDone;
  emu::to_scheduler();
}

// ---- C interface for tests/emulated/harness.py --------------------------------------------------

extern "C" {

cudaError_t emu_cudaGetLastError(void) {
  const cudaError_t e = emu::last_error;
  emu::last_error = emu::sticky.code;  // a kernel fault stays; a configuration error clears
  return e;
}

// mode 0: sequential, 1: uniformly random, 2: random warp priorities (see Order).
__attribute__((visibility("default"))) void emu_set_order(int mode, uint64_t seed) {
  emu::order_mode = mode == 1 ? emu::Order::kRandom : mode == 2 ? emu::Order::kWarps
                                                                : emu::Order::kSequential;
  emu::seed = seed;
  emu::launch_count = 0;  // the same seed gives the same orders for the same launches
}

// Clears a sticky fault (a fresh context) and returns what the last failure said.
__attribute__((visibility("default"))) void emu_reset() {
  emu::sticky = {};
  emu::last_error = cudaSuccess;
  emu::message.clear();
}

// Bytes of this thread's __shared__ storage the runtime poisons before each block (-1: none found).
__attribute__((visibility("default"))) int64_t emu_shared_memory_bytes() {
  const emu::TlsBlock t = emu::shared_memory();
  return t.data != nullptr ? static_cast<int64_t>(t.bytes) : -1;
}

__attribute__((visibility("default"))) const char* emu_message() { return emu::message.c_str(); }

__attribute__((visibility("default"))) int emu_sticky_error() { return emu::sticky.code; }

// A buffer of `bytes` at `offset` bytes past a 16-byte boundary, with inaccessible pages on both
// sides and poison bytes in the slack between. at_start: the buffer starts right after the
// leading guard page (underruns fault at once); else it ends within 16 bytes of the trailing one.
// bytes == 0: a pointer into the trailing guard page (any access faults).
__attribute__((visibility("default"))) void* emu_alloc(size_t bytes, size_t offset, int at_start) {
  const size_t p = emu::page_size();
  const size_t span = (bytes + offset + 15) / 16 * 16;
  const size_t data_bytes = std::max<size_t>(p, (span + p - 1) / p * p);
  size_t map_bytes;
  char* map = emu::map_with_guards(data_bytes, &map_bytes);
  std::memset(map + p, emu::kPoison, data_bytes);
  char* data = at_start ? map + p + offset : map + p + data_bytes - span + offset;
  if (bytes == 0) data = map + p + data_bytes;
  std::lock_guard<std::mutex> lock(emu::launch_mutex);
  emu::allocs[reinterpret_cast<uintptr_t>(data)] = {map, map_bytes, data, bytes};
  return data;
}

__attribute__((visibility("default"))) void emu_free(void* data) {
  std::lock_guard<std::mutex> lock(emu::launch_mutex);
  auto it = emu::allocs.find(reinterpret_cast<uintptr_t>(data));
  if (it == emu::allocs.end()) return;
  munmap(it->second.map, it->second.map_bytes);
  emu::allocs.erase(it);
}

__attribute__((visibility("default"))) const char* emu_error_name(int code) {
  switch (code) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    default: return "cudaError(other)";
  }
}

// The driver's own strings for the codes the emulator produces.
__attribute__((visibility("default"))) const char* emu_error_string(int code) {
  switch (code) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorMisalignedAddress: return "misaligned address";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

#ifdef EMU_COVERAGE
void __gcov_dump(void);
void __gcov_reset(void);
#endif

// Writes the .gcda files now (gcov otherwise writes them at process exit).
__attribute__((visibility("default"))) int emu_coverage_dump() {
#ifdef EMU_COVERAGE
  __gcov_dump();
  return 1;
#else
  return 0;
#endif
}

}  // extern "C"
