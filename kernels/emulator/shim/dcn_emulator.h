// The device side of the CPU emulator: included (via the generated module
// prelude) before every kernel source, it turns CUDA C++ into plain C++ for
// g++. Keywords are defined away, the built-in variables read the runtime's
// per-thread context, and intrinsics, atomics and collectives get host
// implementations. See docs/emulator.md for the supported subset.
#pragma once

// Standard headers first: some of the macros below (__noinline__) would break
// libstdc++ headers included after them.
#include <algorithm>
#include <assert.h>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <math.h>
#include <new>
#include <type_traits>
#include <utility>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include "dcn_context.h"

// ---------------------------------------------------------------- keywords --
// host_defines.h maps these to GCC attributes g++ warns about; the emulator
// runs everything as host code.
#undef __global__
#undef __device__
#undef __host__
#undef __constant__
#undef __managed__
#undef __shared__  // rewritten by the source transform; any leftover is an error
#undef __forceinline__
#undef __launch_bounds__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __grid_constant__

// Device code may branch on these; the emulator follows the device paths.
#define __CUDACC__ 1
#define __CUDACC_RTC__ 1
#define __CUDA_ARCH__ 900
#define DCNBENCH_EMULATOR 1

// ------------------------------------------------------- built-in variables --
#define threadIdx (dcn_current->thread_idx)
#define blockIdx (dcn_current->block_idx)
#define blockDim (dcn_current->block_dim)
#define gridDim (dcn_current->grid_dim)
constexpr int warpSize = 32;

// ------------------------------------------------------------------ traps --
// A failed device assert ends the launch with an error instead of aborting
// Python. Hidden visibility binds assert's call to this definition.
extern "C" __attribute__((visibility("hidden"), noreturn)) inline void __assert_fail(
    const char* expression, const char* file, unsigned line, const char*) noexcept {
  dcn::trap(expression, file, line);
}
[[noreturn]] inline void __trap() { dcn::trap("__trap()", "", 0); }
[[noreturn]] inline void __brkpt() { dcn::trap("__brkpt()", "", 0); }

// ------------------------------------------------------------- min / max --
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(C(a), C(b));
  else return C(b) < C(a) ? C(b) : C(a);
}
template <class A, class B,
          class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(C(a), C(b));
  else return C(a) < C(b) ? C(b) : C(a);
}
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned umax(unsigned a, unsigned b) { return a < b ? b : a; }
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a < b ? b : a; }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a < b ? b : a; }

// ------------------------------------------------------------- fast math --
// The GPU's approximate intrinsics, computed exactly: results differ from the
// GPU by at most the intrinsic's documented error.
inline float __expf(float x) { return expf(x); }
inline float __exp10f(float x) { return exp10f(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __log10f(float x) { return log10f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { sincosf(x, s, c); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fdiv_rn(float x, float y) { return x / y; }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fsub_rn(float x, float y) { return x - y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline double __dadd_rn(double x, double y) { return x + y; }
inline double __dmul_rn(double x, double y) { return x * y; }
inline double __fma_rn(double x, double y, double z) { return fma(x, y, z); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / cbrtf(x); }
inline float __saturatef(float x) { return x >= 1.0f ? 1.0f : (x > 0.0f ? x : 0.0f); }  // NaN -> 0
inline float saturate(float x) { return __saturatef(x); }
inline float normcdff(float x) { return 0.5f * erfcf(-x * 0.70710678118654752f); }
inline double normcdf(double x) { return 0.5 * erfc(-x * 0.70710678118654752); }

// ------------------------------------------------------------ conversions --
inline int __float2int_rn(float x) { return int(nearbyintf(x)); }
inline int __float2int_rz(float x) { return int(x); }
inline int __float2int_rd(float x) { return int(floorf(x)); }
inline int __float2int_ru(float x) { return int(ceilf(x)); }
inline unsigned __float2uint_rn(float x) { return unsigned(nearbyintf(x)); }
inline unsigned __float2uint_rz(float x) { return unsigned(x); }
inline long long __float2ll_rn(float x) { return (long long)(nearbyintf(x)); }
inline long long __float2ll_rz(float x) { return (long long)(x); }
inline int __double2int_rn(double x) { return int(nearbyint(x)); }
inline int __double2int_rz(double x) { return int(x); }
inline long long __double2ll_rn(double x) { return (long long)(nearbyint(x)); }
inline float __double2float_rn(double x) { return float(x); }
inline float __int2float_rn(int x) { return float(x); }
inline float __uint2float_rn(unsigned x) { return float(x); }
inline float __ll2float_rn(long long x) { return float(x); }
inline double __int2double_rn(int x) { return double(x); }

template <class To, class From>
inline To dcn_bit_cast(From from) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between types of different sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
inline int __float_as_int(float x) { return dcn_bit_cast<int>(x); }
inline unsigned __float_as_uint(float x) { return dcn_bit_cast<unsigned>(x); }
inline float __int_as_float(int x) { return dcn_bit_cast<float>(x); }
inline float __uint_as_float(unsigned x) { return dcn_bit_cast<float>(x); }
inline long long __double_as_longlong(double x) { return dcn_bit_cast<long long>(x); }
inline double __longlong_as_double(long long x) { return dcn_bit_cast<double>(x); }
inline int __double2hiint(double x) { return int(dcn_bit_cast<unsigned long long>(x) >> 32); }
inline int __double2loint(double x) { return int(dcn_bit_cast<unsigned long long>(x)); }

// ---------------------------------------------------------- integer bits --
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x ? __builtin_clz(unsigned(x)) : 32; }
inline int __clzll(long long x) { return x ? __builtin_clzll((unsigned long long)x) : 64; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return ((unsigned long long)__brev(unsigned(x)) << 32) | __brev(unsigned(x >> 32));
}
inline int __mul24(int x, int y) { return int((long long)((x << 8) >> 8) * ((y << 8) >> 8)); }
inline unsigned __umul24(unsigned x, unsigned y) { return (x & 0xFFFFFFu) * (y & 0xFFFFFFu); }
inline int __mulhi(int x, int y) { return int(((long long)x * y) >> 32); }
inline unsigned __umulhi(unsigned x, unsigned y) { return unsigned(((unsigned long long)x * y) >> 32); }
inline long long __mul64hi(long long x, long long y) { return (long long)(((__int128)x * y) >> 64); }
inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) {
  return (unsigned long long)(((unsigned __int128)x * y) >> 64);
}
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned shift) {
  unsigned long long v = ((unsigned long long)hi << 32) | lo;
  return unsigned((v << (shift & 31)) >> 32);
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned shift) {
  unsigned long long v = ((unsigned long long)hi << 32) | lo;
  return unsigned(v >> (shift & 31));
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long bytes = ((unsigned long long)y << 32) | x;
  unsigned result = 0;
  for (int i = 0; i < 4; ++i) result |= unsigned((bytes >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
  return result;
}

// --------------------------------------------------- loads, stores, fences --
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
// The threads of a block share one OS thread: a compiler barrier suffices.
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline long long clock64() { return (long long)__builtin_ia32_rdtsc(); }
inline void __nanosleep(unsigned) {}

// ---------------------------------------------------------------- atomics --
// Real atomics: blocks run concurrently on OS threads. Types the hardware has
// no CPU instruction for (float, half, bfloat16) go through a CAS loop on
// their bit pattern. Relaxed ordering, as on the GPU.
//
// In the traced build (counters, racecheck) each atomic is one traced access
// at its call site: DCN_ATOMIC inlines the atomic into the kernel, where
// DCN_TRACE_ATOMIC's call records it, and the CAS loop is kept out of the
// load/store instrumentation (DCN_UNTRACED). A new atomic follows the same
// pattern: `DCN_ATOMIC T atomicX(T* a, ...) { DCN_TRACE_ATOMIC(a); ... }`.
#define DCN_ATOMIC inline __attribute__((always_inline))
#if defined(DCN_TRACED)
#define DCN_TRACE_ATOMIC(address) ::dcn::trace_atomic((void*)(address), sizeof(*(address)))
#define DCN_UNTRACED __attribute__((noinline, no_sanitize("coverage")))
#else
#define DCN_TRACE_ATOMIC(address) ((void)0)
#define DCN_UNTRACED inline
#endif
namespace dcn {
template <class T>
using BitsOf = std::conditional_t<sizeof(T) == 2, unsigned short,
               std::conditional_t<sizeof(T) == 4, unsigned, unsigned long long>>;

// Atomically replaces *address by update(*address); returns the old value.
template <class T, class Update>
DCN_UNTRACED T atomic_update(T* address, Update update) {
  using Bits = BitsOf<T>;
  static_assert(sizeof(T) == sizeof(Bits), "no atomic of this size");
  Bits* bits = reinterpret_cast<Bits*>(address);
  Bits expected = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    T old = dcn_bit_cast<T>(expected);
    Bits desired = dcn_bit_cast<Bits>(T(update(old)));
    if (__atomic_compare_exchange_n(bits, &expected, desired, true, __ATOMIC_RELAXED,
                                    __ATOMIC_RELAXED))
      return old;
  }
}

template <class T>
DCN_UNTRACED T compare_and_swap(T* address, T compare, T value) {
  __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}
}  // namespace dcn

#define DCN_INTEGER_ATOMICS(T)                                                              \
  DCN_ATOMIC T atomicAdd(T* a, T v) {                                                       \
    DCN_TRACE_ATOMIC(a);                                                                    \
    return __atomic_fetch_add(a, v, __ATOMIC_RELAXED);                                      \
  }                                                                                         \
  DCN_ATOMIC T atomicSub(T* a, T v) {                                                       \
    DCN_TRACE_ATOMIC(a);                                                                    \
    return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED);                                      \
  }                                                                                         \
  DCN_ATOMIC T atomicExch(T* a, T v) {                                                      \
    DCN_TRACE_ATOMIC(a);                                                                    \
    return __atomic_exchange_n(a, v, __ATOMIC_RELAXED);                                     \
  }                                                                                         \
  DCN_ATOMIC T atomicAnd(T* a, T v) {                                                       \
    DCN_TRACE_ATOMIC(a);                                                                    \
    return __atomic_fetch_and(a, v, __ATOMIC_RELAXED);                                      \
  }                                                                                         \
  DCN_ATOMIC T atomicOr(T* a, T v) {                                                        \
    DCN_TRACE_ATOMIC(a);                                                                    \
    return __atomic_fetch_or(a, v, __ATOMIC_RELAXED);                                       \
  }                                                                                         \
  DCN_ATOMIC T atomicXor(T* a, T v) {                                                       \
    DCN_TRACE_ATOMIC(a);                                                                    \
    return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED);                                      \
  }                                                                                         \
  DCN_ATOMIC T atomicMin(T* a, T v) {                                                       \
    DCN_TRACE_ATOMIC(a);                                                                    \
    return dcn::atomic_update(a, [v](T old) { return old < v ? old : v; });                 \
  }                                                                                         \
  DCN_ATOMIC T atomicMax(T* a, T v) {                                                       \
    DCN_TRACE_ATOMIC(a);                                                                    \
    return dcn::atomic_update(a, [v](T old) { return old < v ? v : old; });                 \
  }                                                                                         \
  DCN_ATOMIC T atomicCAS(T* a, T compare, T v) {                                            \
    DCN_TRACE_ATOMIC(a);                                                                    \
    return dcn::compare_and_swap(a, compare, v);                                            \
  }
DCN_INTEGER_ATOMICS(int)
DCN_INTEGER_ATOMICS(unsigned)
DCN_INTEGER_ATOMICS(unsigned long long)
#undef DCN_INTEGER_ATOMICS
DCN_ATOMIC long long atomicMin(long long* a, long long v) {
  DCN_TRACE_ATOMIC(a);
  return dcn::atomic_update(a, [v](long long old) { return old < v ? old : v; });
}
DCN_ATOMIC long long atomicMax(long long* a, long long v) {
  DCN_TRACE_ATOMIC(a);
  return dcn::atomic_update(a, [v](long long old) { return old < v ? v : old; });
}
DCN_ATOMIC unsigned short atomicCAS(unsigned short* a, unsigned short compare, unsigned short v) {
  DCN_TRACE_ATOMIC(a);
  return dcn::compare_and_swap(a, compare, v);
}
DCN_ATOMIC unsigned atomicInc(unsigned* a, unsigned limit) {
  DCN_TRACE_ATOMIC(a);
  return dcn::atomic_update(a, [limit](unsigned old) { return old >= limit ? 0u : old + 1; });
}
DCN_ATOMIC unsigned atomicDec(unsigned* a, unsigned limit) {
  DCN_TRACE_ATOMIC(a);
  return dcn::atomic_update(
      a, [limit](unsigned old) { return (old == 0 || old > limit) ? limit : old - 1; });
}
DCN_ATOMIC float atomicExch(float* a, float v) {
  DCN_TRACE_ATOMIC(a);
  return dcn::atomic_update(a, [v](float) { return v; });
}
// One definition per type of the additions done by a CAS loop.
#define DCN_CAS_ADD(T, ADD)                                     \
  DCN_ATOMIC T atomicAdd(T* a, T v) {                           \
    DCN_TRACE_ATOMIC(a);                                        \
    return dcn::atomic_update(a, [v](T old) { return ADD; });   \
  }
DCN_CAS_ADD(float, old + v)
DCN_CAS_ADD(double, old + v)
DCN_CAS_ADD(__half, __hadd(old, v))
DCN_CAS_ADD(__half2, __hadd2(old, v))
DCN_CAS_ADD(__nv_bfloat16, __hadd(old, v))
DCN_CAS_ADD(__nv_bfloat162, __hadd2(old, v))
#undef DCN_CAS_ADD
// sm_90 vector atomics: atomic per component, as documented for the GPU; one
// (vector) atomic instruction for the counters.
DCN_ATOMIC float2 atomicAdd(float2* a, float2 v) {
  DCN_TRACE_ATOMIC(a);
  const auto add = [](float w) { return [w](float old) { return old + w; }; };
  return make_float2(dcn::atomic_update(&a->x, add(v.x)), dcn::atomic_update(&a->y, add(v.y)));
}
DCN_ATOMIC float4 atomicAdd(float4* a, float4 v) {
  DCN_TRACE_ATOMIC(a);
  const auto add = [](float w) { return [w](float old) { return old + w; }; };
  return make_float4(dcn::atomic_update(&a->x, add(v.x)), dcn::atomic_update(&a->y, add(v.y)),
                     dcn::atomic_update(&a->z, add(v.z)), dcn::atomic_update(&a->w, add(v.w)));
}

// ------------------------------------------- half / bfloat16 device-only math --
// cuda_fp16.h / cuda_bf16.h declare these for the device only. Each computes
// in float (double for fma, so that it rounds once) and rounds to the type.
namespace dcn {
inline float to_float(__half x) { return __half2float(x); }
inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> inline T from_float(float x);
template <> inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <class T> inline T from_double(double x) {
  if constexpr (std::is_same_v<T, __half>) return __double2half(x);
  else return __double2bfloat16(x);
}
}  // namespace dcn

#define DCN_LOW_PRECISION_MATH(T, T2)                                                          \
  inline T __hfma(T a, T b, T c) {                                                             \
    return dcn::from_double<T>(double(dcn::to_float(a)) * dcn::to_float(b) + dcn::to_float(c)); \
  }                                                                                            \
  inline T2 __hfma2(T2 a, T2 b, T2 c) {                                                        \
    T2 r;                                                                                      \
    r.x = __hfma(a.x, b.x, c.x);                                                               \
    r.y = __hfma(a.y, b.y, c.y);                                                               \
    return r;                                                                                  \
  }                                                                                            \
  inline T __hfma_relu(T a, T b, T c) {                                                        \
    T r = __hfma(a, b, c);                                                                     \
    return dcn::to_float(r) < 0.0f ? dcn::from_float<T>(0.0f) : r;                             \
  }                                                                                            \
  DCN_LOW_PRECISION_UNARY(T, T2, hsqrt, h2sqrt, sqrtf(v))                                      \
  DCN_LOW_PRECISION_UNARY(T, T2, hrsqrt, h2rsqrt, 1.0f / sqrtf(v))                             \
  DCN_LOW_PRECISION_UNARY(T, T2, hrcp, h2rcp, 1.0f / v)                                        \
  DCN_LOW_PRECISION_UNARY(T, T2, hexp, h2exp, expf(v))                                         \
  DCN_LOW_PRECISION_UNARY(T, T2, hexp2, h2exp2, exp2f(v))                                      \
  DCN_LOW_PRECISION_UNARY(T, T2, hexp10, h2exp10, exp10f(v))                                   \
  DCN_LOW_PRECISION_UNARY(T, T2, hlog, h2log, logf(v))                                         \
  DCN_LOW_PRECISION_UNARY(T, T2, hlog2, h2log2, log2f(v))                                      \
  DCN_LOW_PRECISION_UNARY(T, T2, hlog10, h2log10, log10f(v))                                   \
  DCN_LOW_PRECISION_UNARY(T, T2, hsin, h2sin, sinf(v))                                         \
  DCN_LOW_PRECISION_UNARY(T, T2, hcos, h2cos, cosf(v))                                         \
  DCN_LOW_PRECISION_UNARY(T, T2, htanh, h2tanh, tanhf(v))                                      \
  DCN_LOW_PRECISION_UNARY(T, T2, hfloor, h2floor, floorf(v))                                   \
  DCN_LOW_PRECISION_UNARY(T, T2, hceil, h2ceil, ceilf(v))                                      \
  DCN_LOW_PRECISION_UNARY(T, T2, htrunc, h2trunc, truncf(v))                                   \
  DCN_LOW_PRECISION_UNARY(T, T2, hrint, h2rint, nearbyintf(v))
#define DCN_LOW_PRECISION_UNARY(T, T2, name, name2, expr) \
  inline T name(T x) {                                    \
    float v = dcn::to_float(x);                           \
    return dcn::from_float<T>(expr);                      \
  }                                                       \
  inline T2 name2(T2 x) {                                 \
    T2 r;                                                 \
    r.x = name(x.x);                                      \
    r.y = name(x.y);                                      \
    return r;                                             \
  }
DCN_LOW_PRECISION_MATH(__half, __half2)
DCN_LOW_PRECISION_MATH(__nv_bfloat16, __nv_bfloat162)
#undef DCN_LOW_PRECISION_MATH
#undef DCN_LOW_PRECISION_UNARY

// ------------------------------------------------------------ collectives --
// Each one is a macro so that the runtime learns the source line it waits on.
namespace dcn {
template <class T>
inline T shuffle(int line, WarpOp op, unsigned mask, T var, int param, int width = warpSize) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles take values of at most 8 bytes");
  unsigned long long bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_collective(line, op, mask, bits, param, width);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}
inline unsigned vote(int line, WarpOp op, unsigned mask, int predicate) {
  return unsigned(warp_collective(line, op, mask, predicate != 0, 0, warpSize));
}
// __syncwarp() and __syncwarp(mask) alike: strict -std=c++17 keeps the comma of
// `, ##__VA_ARGS__` when the arguments are empty.
struct SyncwarpAt {
  int line;
  void operator()(unsigned mask = 0xffffffffu) const { (void)vote(line, WarpOp::kSyncwarp, mask, 0); }
};
}  // namespace dcn

#define __syncthreads() ::dcn::block_barrier(__LINE__, ::dcn::BarrierKind::kSync, 1)
#define __syncthreads_count(p) ::dcn::block_barrier(__LINE__, ::dcn::BarrierKind::kCount, (p))
#define __syncthreads_and(p) ::dcn::block_barrier(__LINE__, ::dcn::BarrierKind::kAnd, (p))
#define __syncthreads_or(p) ::dcn::block_barrier(__LINE__, ::dcn::BarrierKind::kOr, (p))
#define __syncwarp(...) ::dcn::SyncwarpAt{__LINE__}(__VA_ARGS__)
#define __shfl_sync(...) ::dcn::shuffle(__LINE__, ::dcn::WarpOp::kShfl, __VA_ARGS__)
#define __shfl_up_sync(...) ::dcn::shuffle(__LINE__, ::dcn::WarpOp::kShflUp, __VA_ARGS__)
#define __shfl_down_sync(...) ::dcn::shuffle(__LINE__, ::dcn::WarpOp::kShflDown, __VA_ARGS__)
#define __shfl_xor_sync(...) ::dcn::shuffle(__LINE__, ::dcn::WarpOp::kShflXor, __VA_ARGS__)
#define __ballot_sync(mask, p) ::dcn::vote(__LINE__, ::dcn::WarpOp::kBallot, (mask), (p))
#define __all_sync(mask, p) int(::dcn::vote(__LINE__, ::dcn::WarpOp::kAll, (mask), (p)))
#define __any_sync(mask, p) int(::dcn::vote(__LINE__, ::dcn::WarpOp::kAny, (mask), (p)))
#define __activemask() ::dcn::active_mask()

// ---------------------------------------------------------- shared memory --
namespace dcn {
// Shared memory starts as NaN bit patterns (0xFF bytes are NaN in float,
// double, half and bfloat16), so a read before any write shows in the output.
// The source transform calls this right after each static __shared__
// declaration: the first thread of a new block to get there poisons it. No
// thread can touch the array before reaching its declaration.
inline void poison_shared_once_per_block(void* array, std::size_t bytes,
                                         unsigned long long& poisoned_for_block) {
  if (poisoned_for_block != dcn_current->block_serial) {
    std::memset(array, 0xFF, bytes);
    poisoned_for_block = dcn_current->block_serial;
#if defined(DCN_TRACED)
    trace_shared(array, bytes);  // the racecheck follows the block's shared memory
#endif
  }
}
}  // namespace dcn
