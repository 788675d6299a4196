// The emulator runtime: one shared library per build mode, loaded once with
// RTLD_GLOBAL before any kernel module. It runs a launch's blocks on a pool of
// OS threads and, for kernels with barriers or warp collectives, the threads
// of each block as cooperatively scheduled fibers.
//
// Fibers are started lazily, in thread order, and a fiber that finishes hands
// its stack to the next thread: a block whose threads never wait runs on one
// stack. A waiting fiber parks until the scheduler's pass over the block finds
// every thread parked; then it releases whole warp groups or the block barrier,
// or reports a deadlock naming the block and where its threads wait.
#include "dcn_context.h"

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <csetjmp>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

__thread dcn::ThreadContext* dcn_current __attribute__((tls_model("initial-exec"))) = nullptr;

namespace dcn {
namespace {

constexpr std::size_t kMaxDynamicShared = 227 * 1024;  // H100/H200 opt-in maximum

// The traced runtime (counters and racecheck modes, dcn_trace.cpp) follows
// each block's start and end, each released barrier and each synchronisation
// of a whole warp (a full __syncwarp(), a wmma operation).
#if defined(DCN_TRACED)
}  // namespace
void trace_block_begin();
void trace_block_end();
void trace_barrier();
void trace_warp_sync(unsigned warp);
namespace {
#define DCN_TRACE_EVENT(call) call
#else
#define DCN_TRACE_EVENT(call) ((void)0)
#endif
enum LaunchStatus : int { kOk = 0, kDeadlock = 1, kTrap = 2, kInvalidLaunch = 3, kWarpMatrix = 4 };

std::string format(const char* fmt, ...) {
  char buffer[1024];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buffer, sizeof buffer, fmt, args);
  va_end(args);
  return buffer;
}

std::string dim_string(unsigned x, unsigned y, unsigned z) { return format("(%u, %u, %u)", x, y, z); }

// ------------------------------------------------------- context switching --
// x86-64: save the callee-saved registers on the old stack, swap stack
// pointers, restore. Other architectures fall back to ucontext.
#if defined(__x86_64__)
extern "C" void dcn_switch_stack(void** save_sp, void* next_sp);
extern "C" void dcn_fiber_trampoline();
asm(R"(
  .text
  .p2align 4
  .type dcn_switch_stack,@function
dcn_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dcn_switch_stack, .-dcn_switch_stack
  .p2align 4
  .type dcn_fiber_trampoline,@function
dcn_fiber_trampoline:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size dcn_fiber_trampoline, .-dcn_fiber_trampoline
)");

struct Context {
  void* sp = nullptr;
};

void init_context(Context& context, char* stack, std::size_t size, void (*entry)(void*), void* arg) {
  // Seven slots popped/returned through by dcn_switch_stack; chosen so that
  // the trampoline's call sees a 16-byte aligned stack, as the ABI wants.
  auto top = reinterpret_cast<std::uintptr_t>(stack + size) & ~std::uintptr_t(15);
  auto* slots = reinterpret_cast<void**>(top - 72);
  slots[0] = nullptr;                                          // r15
  slots[1] = nullptr;                                          // r14
  slots[2] = reinterpret_cast<void*>(entry);                   // r13
  slots[3] = arg;                                              // r12
  slots[4] = nullptr;                                          // rbx
  slots[5] = nullptr;                                          // rbp
  slots[6] = reinterpret_cast<void*>(&dcn_fiber_trampoline);  // return address
  context.sp = slots;
}

inline void raw_switch(Context& from, Context& to) { dcn_switch_stack(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void init_context(Context& context, char* stack, std::size_t size, void (*entry)(void*), void* arg) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = size;
  context.uc.uc_link = nullptr;
  // makecontext passes int arguments: split the pointer in two.
  auto bits = reinterpret_cast<std::uintptr_t>(arg);
  makecontext(&context.uc, reinterpret_cast<void (*)()>(+[](unsigned hi, unsigned lo, unsigned ehi,
                                                             unsigned elo) {
                auto a = reinterpret_cast<void*>((std::uintptr_t(hi) << 32) | lo);
                auto e = reinterpret_cast<void (*)(void*)>((std::uintptr_t(ehi) << 32) | elo);
                e(a);
              }),
              4, unsigned(bits >> 32), unsigned(bits), unsigned(reinterpret_cast<std::uintptr_t>(entry) >> 32),
              unsigned(reinterpret_cast<std::uintptr_t>(entry)));
}

inline void raw_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---------------------------------------------------------------- stacks --
// mmap'd, committed lazily by the kernel, with a PROT_NONE guard page below
// so that an overflow faults instead of corrupting the neighbour.
struct Stack {
  char* base;
  std::size_t size;
};

class StackPool {
 public:
  explicit StackPool(std::size_t stack_size) : stack_size_(stack_size) {}
  StackPool(const StackPool&) = delete;
  ~StackPool() {
    for (const Stack& s : all_) munmap(s.base - page_size(), stack_size_ + page_size());
  }
  std::size_t stack_size() const { return stack_size_; }

  Stack acquire() {
    if (!free_.empty()) {
      Stack s = free_.back();
      free_.pop_back();
      return s;
    }
    std::size_t total = stack_size_ + page_size();
    void* memory = mmap(nullptr, total, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (memory == MAP_FAILED) {
      std::fprintf(stderr, "dcnbench emulator: cannot map a %zu-byte fiber stack\n", total);
      std::abort();
    }
    mprotect(memory, page_size(), PROT_NONE);
    // Stagger the stack tops: equally aligned tops would all map to the same
    // cache sets, and a block's fibers touch them round-robin.
    // At most a quarter of the stack, in 64-byte steps.
    const std::size_t span = std::min<std::size_t>(65536, stack_size_ / 4) & ~std::size_t(63);
    const std::size_t color = span ? (all_.size() * 1088) % span : 0;
    Stack s{static_cast<char*>(memory) + page_size(), stack_size_ - color};
    all_.push_back(s);
    return s;
  }

  void release(Stack s) {
#if defined(__SANITIZE_ADDRESS__)
    // A fiber abandoned mid-kernel leaves its frames' redzones poisoned.
    ASAN_UNPOISON_MEMORY_REGION(s.base, s.size);
#endif
    free_.push_back(s);
  }

 private:
  static std::size_t page_size() { return std::size_t(sysconf(_SC_PAGESIZE)); }
  std::size_t stack_size_;
  std::vector<Stack> all_;
  std::vector<Stack> free_;
};

// Pools outlive launches, so a launch reuses stacks whose pages are already
// committed instead of faulting them in again.
std::mutex idle_pools_mutex;
std::vector<std::unique_ptr<StackPool>> idle_pools;

std::unique_ptr<StackPool> take_pool(std::size_t stack_size) {
  std::lock_guard<std::mutex> lock(idle_pools_mutex);
  for (auto it = idle_pools.begin(); it != idle_pools.end(); ++it) {
    if ((*it)->stack_size() == stack_size) {
      auto pool = std::move(*it);
      idle_pools.erase(it);
      return pool;
    }
  }
  return std::make_unique<StackPool>(stack_size);
}

void return_pool(std::unique_ptr<StackPool> pool) {
  std::lock_guard<std::mutex> lock(idle_pools_mutex);
  idle_pools.push_back(std::move(pool));
}

// -------------------------------------------------------------- launches --
struct Launch {
  void (*run_thread)(void**);
  void** args;
  const char* kernel_name;
  dim3 grid, block;
  std::size_t shared_mem;
  unsigned threads_per_block;
  unsigned long long num_blocks;
  std::size_t stack_size;
  bool use_fibers;

  std::atomic<unsigned long long> next_block{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  int status = kOk;
  std::string message;

  void fail(int code, const std::string& text) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (status == kOk) {
      status = code;
      message = text;
    }
    failed.store(true, std::memory_order_relaxed);
  }
};

// Every OS thread keeps one fixed `extern __shared__` buffer for its
// lifetime: namespace-scope `extern __shared__` arrays become thread_local
// pointers initialised once per OS thread.
struct DynamicSharedBuffer {
  unsigned char* data = nullptr;
  ~DynamicSharedBuffer() { std::free(data); }
  unsigned char* get() {
    if (!data) data = static_cast<unsigned char*>(std::aligned_alloc(256, kMaxDynamicShared));
    return data;
  }
};
thread_local DynamicSharedBuffer dynamic_shared_buffer;

// ---------------------------------------------------------------- fibers --
enum class FiberState { kNew, kRunnable, kAtBarrier, kAtWarp, kDone, kTrapped };

class BlockScheduler;

struct Fiber {
  Context context;
  Stack stack{};
  ThreadContext ctx{};
  BlockScheduler* scheduler = nullptr;
  FiberState state = FiberState::kNew;
  // What the fiber waits for.
  int line = 0;
  BarrierKind barrier = BarrierKind::kSync;
  WarpOp op = WarpOp::kSyncwarp;
  unsigned mask = 0;
  unsigned long long value = 0;
  int param = 0;
  int width = 32;
  unsigned long long result = 0;
  // At a wmma operation (op kMatrix): its name and combine; `value` holds the lane's data.
  const char* matrix_name = nullptr;
  MatrixCombine combine = nullptr;
};

const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSyncwarp: return "__syncwarp";
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kMatrix: return "a wmma operation";
  }
  return "?";
}

const char* barrier_name(BarrierKind kind) {
  switch (kind) {
    case BarrierKind::kSync: return "__syncthreads()";
    case BarrierKind::kCount: return "__syncthreads_count()";
    case BarrierKind::kAnd: return "__syncthreads_and()";
    case BarrierKind::kOr: return "__syncthreads_or()";
  }
  return "?";
}

class BlockScheduler {
 public:
  BlockScheduler(Launch& launch, StackPool& stacks)
      : launch_(launch), stacks_(stacks), fibers_(launch.threads_per_block) {
    for (Fiber& f : fibers_) f.scheduler = this;
  }

  // Runs one block to completion; false (and launch.fail) on deadlock or trap.
  bool run(const ThreadContext& block_ctx) {
    const dim3 d = launch_.block;
    for (unsigned t = 0; t < fibers_.size(); ++t) {
      Fiber& f = fibers_[t];
      f.state = FiberState::kNew;
      f.ctx = block_ctx;
      f.ctx.thread_idx = {t % d.x, (t / d.x) % d.y, t / (d.x * d.y)};
      f.ctx.linear_tid = t;
      f.ctx.fiber = &f;
    }
    finished_ = 0;
    bool ok = schedule();
    for (Fiber& f : fibers_)  // abandoned fibers after a deadlock or trap
      if (f.state != FiberState::kNew && f.state != FiberState::kDone) stacks_.release(f.stack);
    return ok;
  }

  // Called on the fiber's own stack.
  void park(Fiber& f) { switch_to_scheduler(f, false); }

  [[noreturn]] void finish(Fiber& f, FiberState final_state) {
    f.state = final_state;
    switch_to_scheduler(f, true);
    __builtin_unreachable();
  }

 private:
  static void fiber_main(void* arg) {
    Fiber& f = *static_cast<Fiber*>(arg);
    BlockScheduler& s = *f.scheduler;
#if defined(__SANITIZE_ADDRESS__)
    __sanitizer_finish_switch_fiber(nullptr, &s.os_stack_bottom_, &s.os_stack_size_);
#endif
    s.launch_.run_thread(s.launch_.args);
    s.finish(f, FiberState::kDone);
  }

  void resume(Fiber& f) {
    if (f.state == FiberState::kNew) {
      f.stack = stacks_.acquire();
      init_context(f.context, f.stack.base, f.stack.size, &fiber_main, &f);
    }
    f.state = FiberState::kRunnable;
    dcn_current = &f.ctx;
#if defined(__SANITIZE_ADDRESS__)
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(&fake_stack, f.stack.base, f.stack.size);
    raw_switch(scheduler_context_, f.context);
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
    raw_switch(scheduler_context_, f.context);
#endif
    if (f.state == FiberState::kDone) {
      stacks_.release(f.stack);
      ++finished_;
    }
  }

  void switch_to_scheduler(Fiber& f, bool dying) {
#if defined(__SANITIZE_ADDRESS__)
    void* fake_stack = nullptr;
    __sanitizer_start_switch_fiber(dying ? nullptr : &fake_stack, os_stack_bottom_, os_stack_size_);
    raw_switch(f.context, scheduler_context_);
    __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
    (void)dying;
    raw_switch(f.context, scheduler_context_);
#endif
  }

  bool schedule() {
    for (;;) {
      for (Fiber& f : fibers_) {
        if (f.state == FiberState::kNew || f.state == FiberState::kRunnable) resume(f);
        if (launch_.failed.load(std::memory_order_relaxed)) return false;
      }
      if (finished_ == fibers_.size()) return true;
      if (release_warp_groups()) continue;
      if (release_block_barrier()) continue;
      if (!launch_.failed.load(std::memory_order_relaxed)) report_deadlock();
      return false;
    }
  }

  // Releases every warp group whose lanes have all arrived at a collective.
  // The result of each lane is computed here, from all lanes' values at once.
  bool release_warp_groups() {
    bool released = false;
    for (std::size_t base = 0; base < fibers_.size(); base += 32) {
      const unsigned lanes = unsigned(std::min<std::size_t>(32, fibers_.size() - base));
      const unsigned present = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
      unsigned waiting = 0;
      unsigned matrix = 0;
      for (unsigned l = 0; l < lanes; ++l) {
        const Fiber& f = fibers_[base + l];
        if (f.state != FiberState::kAtWarp) continue;
        (f.op == WarpOp::kMatrix ? matrix : waiting) |= 1u << l;
      }
      if (matrix && release_matrix(base, lanes, matrix)) released = true;
      if (launch_.failed.load(std::memory_order_relaxed)) return false;
      for (unsigned l = 0; l < lanes; ++l) {
        if (!(waiting >> l & 1)) continue;
        const unsigned group = (fibers_[base + l].mask & present) | (1u << l);
        if ((group & waiting) != group) continue;
        if (fibers_[base + l].op == WarpOp::kSyncwarp && group == present)
          DCN_TRACE_EVENT(trace_warp_sync(unsigned(base / 32)));
        resolve_warp_group(&fibers_[base], group);
        waiting &= ~group;
        released = true;
      }
    }
    return released;
  }

  // A wmma operation: released when all 32 lanes of the warp wait at the same
  // one (the same call on the same line); `combine` then runs over them once.
  // Lanes that never arrive, or wait at another, are a deadlock.
  bool release_matrix(std::size_t base, unsigned lanes, unsigned waiting) {
    Fiber* warp = &fibers_[base];
    const Fiber& first = warp[__builtin_ctz(waiting)];
    if (lanes < 32) {
      launch_.fail(kWarpMatrix, block_prefix() + format(
          "%s on line %d is an operation of a whole warp, but warp %zu of the block has only %u "
          "thread(s): wmma needs every warp full (a block size that is a multiple of 32)",
          first.matrix_name, first.line, base / 32, lanes));
      return false;
    }
    if (waiting != 0xffffffffu) return false;
    for (unsigned l = 0; l < 32; ++l)
      if (warp[l].line != warp[0].line || warp[l].combine != warp[0].combine) return false;
    void* lane_data[32];
    for (unsigned l = 0; l < 32; ++l) lane_data[l] = reinterpret_cast<void*>(warp[l].value);
    if (const char* problem = warp[0].combine(lane_data)) {
      launch_.fail(kWarpMatrix, block_prefix() + format("warp %zu, %s on line %d: %s", base / 32,
                                                        first.matrix_name, first.line, problem));
      return false;
    }
    DCN_TRACE_EVENT(trace_warp_sync(unsigned(base / 32)));
    for (unsigned l = 0; l < 32; ++l) warp[l].state = FiberState::kRunnable;
    return true;
  }

  static void resolve_warp_group(Fiber* warp, unsigned group) {
    unsigned ballot = 0;
    for (unsigned l = 0; l < 32; ++l)
      if ((group >> l & 1) && warp[l].value) ballot |= 1u << l;
    for (unsigned l = 0; l < 32; ++l) {
      if (!(group >> l & 1)) continue;
      Fiber& f = warp[l];
      const unsigned width = unsigned(f.width);
      const unsigned segment = l & ~(width - 1);
      unsigned src = l;
      switch (f.op) {
        case WarpOp::kShfl: src = segment + (unsigned(f.param) & (width - 1)); break;
        case WarpOp::kShflUp:
          if ((l - segment) >= unsigned(f.param)) src = l - unsigned(f.param);
          break;
        case WarpOp::kShflDown:
          if ((l - segment) + unsigned(f.param) < width) src = l + unsigned(f.param);
          break;
        case WarpOp::kShflXor: {
          unsigned x = l ^ unsigned(f.param);
          if (x < 32 && (x & ~(width - 1)) == segment) src = x;
          break;
        }
        default: break;
      }
      const unsigned mine = ballot & f.mask;
      switch (f.op) {
        case WarpOp::kSyncwarp: f.result = 0; break;
        case WarpOp::kBallot: f.result = mine; break;
        case WarpOp::kAll: f.result = (mine == (group & f.mask)); break;
        case WarpOp::kAny: f.result = (mine != 0); break;
        default:  // shuffles: a source lane outside the group yields the lane's own value
          f.result = (group >> src & 1) ? warp[src].value : f.value;
      }
      f.state = FiberState::kRunnable;
    }
  }

  // Releases the block barrier if every thread waits at the same one; reports
  // divergent barriers and threads that exited past it.
  bool release_block_barrier() {
    std::size_t at_barrier = 0;
    int line = -1;
    bool same_line = true;
    int count = 0;
    for (const Fiber& f : fibers_) {
      if (f.state != FiberState::kAtBarrier) continue;
      ++at_barrier;
      if (line >= 0 && f.line != line) same_line = false;
      line = f.line;
      count += f.value != 0;
    }
    if (at_barrier == 0 || at_barrier != fibers_.size()) return false;  // deadlock: reported by caller
    if (!same_line) {
      launch_.fail(kDeadlock, block_prefix() + "divergent __syncthreads(): threads of one block wait at "
                                               "different barriers (" + wait_summary() +
                                               "). Every thread of a block must reach the same "
                                               "__syncthreads() call.");
      return false;
    }
    const int n = int(at_barrier);
    DCN_TRACE_EVENT(trace_barrier());
    for (Fiber& f : fibers_) {
      switch (f.barrier) {
        case BarrierKind::kSync: f.result = 0; break;
        case BarrierKind::kCount: f.result = unsigned(count); break;
        case BarrierKind::kAnd: f.result = count == n; break;
        case BarrierKind::kOr: f.result = count != 0; break;
      }
      f.state = FiberState::kRunnable;
    }
    return true;
  }

  std::string block_prefix() const {
    const ThreadContext& c = fibers_[0].ctx;
    return format("kernel '%s', block ", launch_.kernel_name) +
           dim_string(c.block_idx.x, c.block_idx.y, c.block_idx.z) + " of block size " +
           dim_string(launch_.block.x, launch_.block.y, launch_.block.z) + ": ";
  }

  // "128 thread(s) wait at __syncthreads() on line 14; 128 thread(s) exited"
  std::string wait_summary() const {
    std::map<std::tuple<int, std::string, unsigned>, int> waits;  // (line, what, mask) -> threads
    int exited = 0;
    for (const Fiber& f : fibers_) {
      if (f.state == FiberState::kDone) ++exited;
      else if (f.state == FiberState::kAtBarrier) ++waits[{f.line, barrier_name(f.barrier), 0u}];
      else if (f.state == FiberState::kAtWarp)
        ++waits[{f.line, f.op == WarpOp::kMatrix ? f.matrix_name : warp_op_name(f.op), f.mask}];
    }
    std::string text;
    for (const auto& [where, threads] : waits) {
      const auto& [line, what, mask] = where;
      if (!text.empty()) text += "; ";
      text += format("%d thread(s) wait at %s on line %d", threads, what.c_str(), line);
      if (mask) text += format(" (mask 0x%08x)", mask);
    }
    if (exited) text += format("; %d thread(s) exited without reaching it", exited);
    return text;
  }

  void report_deadlock() {
    launch_.fail(kDeadlock, block_prefix() + "deadlock: " + wait_summary() +
                                ". Every thread of a block must reach each __syncthreads(), and "
                                "every lane named in a warp collective's mask must reach it.");
  }

  Launch& launch_;
  StackPool& stacks_;
  std::vector<Fiber> fibers_;
  std::size_t finished_ = 0;
  Context scheduler_context_;
#if defined(__SANITIZE_ADDRESS__)
  const void* os_stack_bottom_ = nullptr;
  std::size_t os_stack_size_ = 0;
#endif
};

Fiber& current_fiber(const char* what) {
  auto* f = static_cast<Fiber*>(dcn_current->fiber);
  if (!f)
    trap(format("%s reached in a kernel run without fibers (the emulator found no barrier or "
                "collective in its module source); set DCNBENCH_EMULATOR_FIBERS=1 and report this",
                what)
             .c_str(),
         "", 0);
  return *f;
}

// ---------------------------------------------------------------- workers --
// Traps on the fast path unwind to the block loop (kernel frames hold only
// trivially destructible values); fibers are simply never resumed.
thread_local std::jmp_buf* fast_path_trap_target = nullptr;
thread_local Launch* current_launch = nullptr;
thread_local unsigned long long block_serial_counter = 0;

void run_blocks(Launch& launch) {
  current_launch = &launch;
  ThreadContext ctx{};
  ctx.block_dim = launch.block;
  ctx.grid_dim = launch.grid;
  ctx.dynamic_shared = dynamic_shared_buffer.get();
  dcn_current = &ctx;

  std::unique_ptr<StackPool> stacks;
  std::unique_ptr<BlockScheduler> scheduler;
  if (launch.use_fibers) {
    stacks = take_pool(launch.stack_size);
    scheduler = std::make_unique<BlockScheduler>(launch, *stacks);
  }
  const dim3 g = launch.grid, d = launch.block;
  std::jmp_buf trap_target;
  for (;;) {
    if (launch.failed.load(std::memory_order_relaxed)) break;
    const unsigned long long b = launch.next_block.fetch_add(1, std::memory_order_relaxed);
    if (b >= launch.num_blocks) break;
    ctx.block_idx = {unsigned(b % g.x), unsigned((b / g.x) % g.y), unsigned(b / (g.x * g.y))};
    ctx.block_serial = ++block_serial_counter;
    std::memset(ctx.dynamic_shared, 0xFF, launch.shared_mem);  // NaN poison, like static shared
    DCN_TRACE_EVENT(trace_block_begin());
    if (scheduler) {
      const bool ok = scheduler->run(ctx);
      dcn_current = &ctx;
      if (!ok) break;
      DCN_TRACE_EVENT(trace_block_end());
      continue;
    }
    if (setjmp(trap_target)) break;
    fast_path_trap_target = &trap_target;
    for (unsigned z = 0; z < d.z; ++z)
      for (unsigned y = 0; y < d.y; ++y)
        for (unsigned x = 0; x < d.x; ++x) {
          ctx.thread_idx = {x, y, z};
          ctx.linear_tid = x + d.x * (y + d.y * z);
          launch.run_thread(launch.args);
        }
    fast_path_trap_target = nullptr;
    DCN_TRACE_EVENT(trace_block_end());
  }
  fast_path_trap_target = nullptr;
  dcn_current = nullptr;
  current_launch = nullptr;
  if (stacks) return_pool(std::move(stacks));
}

}  // namespace

// ------------------------------------------------- entry points for kernels --
int block_barrier(int line, BarrierKind kind, int predicate) {
  Fiber& f = current_fiber(barrier_name(kind));
  f.state = FiberState::kAtBarrier;
  f.line = line;
  f.barrier = kind;
  f.value = predicate != 0;
  f.scheduler->park(f);
  return int(f.result);
}

unsigned long long warp_collective(int line, WarpOp op, unsigned mask, unsigned long long value,
                                   int param, int width) {
  Fiber& f = current_fiber(warp_op_name(op));
  if (width <= 0 || width > 32 || (width & (width - 1)))
    trap(format("%s: width %d is not a power of two in [1, 32]", warp_op_name(op), width).c_str(), "",
         unsigned(line));
  f.state = FiberState::kAtWarp;
  f.line = line;
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.param = param;
  f.width = width;
  f.scheduler->park(f);
  return f.result;
}

void warp_matrix(int line, const char* name, void* lane_data, MatrixCombine combine) {
  Fiber& f = current_fiber(name);
  f.state = FiberState::kAtWarp;
  f.line = line;
  f.op = WarpOp::kMatrix;
  f.mask = 0xffffffffu;
  f.value = reinterpret_cast<unsigned long long>(lane_data);
  f.matrix_name = name;
  f.combine = combine;
  f.scheduler->park(f);
}

unsigned active_mask() {
  // Lanes of this warp that have not exited; the emulator runs no warp
  // divergently, so that is every live lane.
  const ThreadContext& c = *dcn_current;
  const unsigned threads = c.block_dim.x * c.block_dim.y * c.block_dim.z;
  const unsigned base = c.linear_tid & ~31u;
  const unsigned lanes = std::min(32u, threads - base);
  return lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
}

void trap(const char* what, const char* file, unsigned line) {
  const ThreadContext& c = *dcn_current;
  Launch& launch = *current_launch;
  std::string where = file && *file ? format(" at %s:%u", file, line) : std::string();
  launch.fail(kTrap, format("kernel '%s', block ", launch.kernel_name) +
                         dim_string(c.block_idx.x, c.block_idx.y, c.block_idx.z) + ", thread " +
                         dim_string(c.thread_idx.x, c.thread_idx.y, c.thread_idx.z) +
                         ": device trap: " + what + where);
  if (auto* f = static_cast<Fiber*>(c.fiber)) f->scheduler->finish(*f, FiberState::kTrapped);
  std::longjmp(*fast_path_trap_target, 1);
}

}  // namespace dcn

// Runs one launch to completion on `num_workers` OS threads (the caller's
// included). Returns 0, or a LaunchStatus with a message in `message`.
extern "C" int dcn_launch(void (*run_thread)(void**), void** args, const char* kernel_name,
                          const unsigned* grid, const unsigned* block, std::size_t shared_mem,
                          int num_workers, int use_fibers, std::size_t stack_size, char* message,
                          std::size_t message_size) {
  using namespace dcn;
  Launch launch;
  launch.run_thread = run_thread;
  launch.args = args;
  launch.kernel_name = kernel_name;
  launch.grid = dim3(grid[0], grid[1], grid[2]);
  launch.block = dim3(block[0], block[1], block[2]);
  launch.shared_mem = shared_mem;
  launch.threads_per_block = block[0] * block[1] * block[2];
  launch.num_blocks = (unsigned long long)grid[0] * grid[1] * grid[2];
  launch.stack_size = stack_size;
  launch.use_fibers = use_fibers != 0;
  if (shared_mem > kMaxDynamicShared) {
    std::snprintf(message, message_size, "shared_mem=%zu exceeds the %zu bytes of dynamic shared "
                  "memory a block can have", shared_mem, kMaxDynamicShared);
    return kInvalidLaunch;
  }

  const unsigned long long workers =
      std::max(1ull, std::min<unsigned long long>(num_workers, launch.num_blocks));
  std::vector<std::thread> helpers;
  for (unsigned long long i = 1; i < workers; ++i) helpers.emplace_back(run_blocks, std::ref(launch));
  run_blocks(launch);
  for (std::thread& t : helpers) t.join();

  if (launch.status != kOk) std::snprintf(message, message_size, "%s", launch.message.c_str());
  return launch.status;
}
