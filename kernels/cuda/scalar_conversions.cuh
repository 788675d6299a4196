// float32 <-> the storage types the kernels take (float, __half,
// __nv_bfloat16). Every kernel loads a value, converts it to float32, computes
// in float32 and rounds once (to nearest even) when it stores.
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

// float64, for torch.autograd.gradcheck: a kernel instantiated for double
// computes in double. compute_t<T> is the type a kernel computes in for the
// storage type T (float for the three above); to_compute / from_compute
// convert a loaded value and a value to store (to_float / from_float for
// those, the identity for double).
template <typename T> struct ComputeType { using type = float; };
template <> struct ComputeType<double> { using type = double; };
template <typename T> using compute_t = typename ComputeType<T>::type;

template <typename T> __device__ __forceinline__ compute_t<T> to_compute(T v) { return to_float(v); }
template <> __device__ __forceinline__ double to_compute<double>(double v) { return v; }
template <typename T> __device__ __forceinline__ T from_compute(compute_t<T> v) {
    return from_float<T>(v);
}
template <> __device__ __forceinline__ double from_compute<double>(double v) { return v; }

#endif  // DCNBENCH_SCALAR_CONVERSIONS_CUH
