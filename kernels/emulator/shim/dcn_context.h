// The contract between the emulator runtime (dcn_runtime.cpp, one shared
// library per build mode) and every kernel module compiled against the shim:
// the per-CUDA-thread context that threadIdx & co read, and the runtime's
// entry points for barriers, warp collectives and traps.
#pragma once

#include <cstddef>
#include <vector_types.h>

namespace dcn {

// What one emulated CUDA thread sees. The fast path reuses one context per OS
// thread; with fibers every CUDA thread of the running block has its own.
struct ThreadContext {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
  unsigned linear_tid;  // threadIdx.x + threadIdx.y*Dx + threadIdx.z*Dx*Dy
  // Unique per block run on this OS thread; static __shared__ arrays compare it
  // with the serial they were last poisoned for.
  unsigned long long block_serial;
  unsigned char* dynamic_shared;  // this OS thread's fixed `extern __shared__` buffer
  void* fiber;                    // the runtime's fiber, nullptr on the fast path
};

enum class BarrierKind : int { kSync, kCount, kAnd, kOr };
enum class WarpOp : int {
  kSyncwarp, kShfl, kShflUp, kShflDown, kShflXor, kBallot, kAll, kAny, kMatrix
};

// A warp matrix operation (wmma) of a whole warp: called once, when all 32
// lanes have arrived, with each lane's `lane_data` in lane order. Returns
// nullptr, or what is wrong (lanes that disagree) for the launch's error.
using MatrixCombine = const char* (*)(void* const* lane_data);

// Both suspend the calling fiber until its block (warp) arrives; they return
// the collective's result. `line` is the source line, for deadlock reports.
int block_barrier(int line, BarrierKind kind, int predicate);
unsigned long long warp_collective(int line, WarpOp op, unsigned mask, unsigned long long value,
                                   int param, int width);
unsigned active_mask();
// Suspends the calling fiber until every lane of its warp, 32 of them, waits
// at the same wmma operation (`name` on `line`), then runs `combine` over them.
void warp_matrix(int line, const char* name, void* lane_data, MatrixCombine combine);
// Ends the launch with an error naming the current block and thread.
[[noreturn]] void trap(const char* what, const char* file, unsigned line);

#if defined(DCN_TRACED)
// The traced build (counters and racecheck modes): an atomic on `address`,
// counted at its call site; a static __shared__ array of the running block.
void trace_atomic(void* address, unsigned bytes);
void trace_shared(void* array, std::size_t bytes);
// One lane's part of a wmma load or store: `bytes` at `address`, counted at `site`.
void trace_matrix_access(const void* address, unsigned bytes, bool store, const void* site);
#endif

}  // namespace dcn

// Initial-exec TLS: one fs-relative load per access. `__thread` (not C++
// thread_local) so that modules do not call a TLS init wrapper on each access.
extern __thread dcn::ThreadContext* dcn_current __attribute__((tls_model("initial-exec")));
