// float32 <-> the storage types the kernels take (float, __half,
// __nv_bfloat16). Every kernel loads a value, converts it to float32, computes
// in float32 and rounds once (to nearest even) when it stores. double: below.
#ifndef DCNBENCH_SCALAR_CONVERSIONS_CUH
#define DCNBENCH_SCALAR_CONVERSIONS_CUH

#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// float64 kernels (so that users can run torch.autograd.gradcheck on them)
// compute in double instead: acc_t<T> is the type a kernel of storage type T
// computes in, to_acc / from_acc convert to and from it (from_acc rounds once,
// to nearest even), floor_of / max_of / exp_of (min_of / ceil_of / round_of)
// are the math at that type.
template <typename T> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };
template <typename T> using acc_t = typename AccumulateType<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> v) { return from_float<T>(v); }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

__device__ __forceinline__ float floor_of(float v) { return floorf(v); }
__device__ __forceinline__ double floor_of(double v) { return floor(v); }
__device__ __forceinline__ float max_of(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_of(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float exp_of(float v) { return expf(v); }
__device__ __forceinline__ double exp_of(double v) { return exp(v); }
__device__ __forceinline__ float min_of(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ double min_of(double a, double b) { return fmin(a, b); }
__device__ __forceinline__ float ceil_of(float v) { return ceilf(v); }
__device__ __forceinline__ double ceil_of(double v) { return ceil(v); }
// C's round: halves away from zero.
__device__ __forceinline__ float round_of(float v) { return roundf(v); }
__device__ __forceinline__ double round_of(double v) { return round(v); }

#endif  // DCNBENCH_SCALAR_CONVERSIONS_CUH
