// Channel vectors for the kernels that give a thread several channels of one
// pixel (dcnv3_vectorized.cu, ms_deform_attn.cu): 16-byte loads and stores of
// VEC channels converted to the accumulation type, scatter-adds of a vector
// (float atomics, or the fixed-point ones of deterministic_atomics.cuh), and
// sums over the lanes of a warp that share an item.
#pragma once

#include "deterministic_atomics.cuh"
#include "scalar_conversions.cuh"

constexpr unsigned FULL_WARP = 0xffffffffu;

// 16-byte vectors move as four 32-bit words, split and packed with bit
// operations (a local array reinterpreted as uint4 lands in local memory).
__device__ __forceinline__ unsigned bits_of(float v) { return __float_as_uint(v); }
__device__ __forceinline__ unsigned bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ unsigned bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

template <typename T> __device__ __forceinline__ T from_bits(unsigned bits);
template <> __device__ __forceinline__ float from_bits<float>(unsigned bits) {
    return __uint_as_float(bits);
}
template <> __device__ __forceinline__ __half from_bits<__half>(unsigned bits) {
    return __ushort_as_half(static_cast<unsigned short>(bits));
}
template <> __device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(unsigned bits) {
    return __ushort_as_bfloat16(static_cast<unsigned short>(bits));
}

// real = acc_t<scalar_t> (double for float64, whose VEC is 1: the scalar loop).
template <typename scalar_t, int VEC, typename real>
__device__ __forceinline__ void load_vector(const scalar_t* from, real (&to)[VEC]) {
    if constexpr (VEC * sizeof(scalar_t) == 16) {
        constexpr int PER_WORD = 4 / sizeof(scalar_t);
        const uint4 raw = *reinterpret_cast<const uint4*>(from);
        const unsigned word[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int k = 0; k < VEC; ++k)
            to[k] = to_float(
                from_bits<scalar_t>(word[k / PER_WORD] >> (16 * (k % PER_WORD))));
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) to[k] = to_acc(from[k]);
    }
}

template <typename scalar_t, int VEC, typename real>
__device__ __forceinline__ void store_vector(scalar_t* to, const real (&from)[VEC]) {
    if constexpr (VEC * sizeof(scalar_t) == 16) {
        constexpr int PER_WORD = 4 / sizeof(scalar_t);
        unsigned word[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int k = 0; k < VEC; ++k)
            word[k / PER_WORD] |= bits_of(from_float<scalar_t>(from[k]))
                                  << (16 * (k % PER_WORD));
        *reinterpret_cast<uint4*>(to) = make_uint4(word[0], word[1], word[2], word[3]);
    } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) to[k] = from_acc<scalar_t>(from[k]);
    }
}

// to[at + k] += w * grad[k] for the VEC channels of a vector. Float32
// atomics on sm_90 use its 16-byte vector atomics: a quarter of the atomic
// instructions (aligned: the buffer is a fresh allocation and the vector's
// first channel index is a multiple of VEC). Fixed point has no vector
// atomic: one per channel.
template <int VEC, typename real>
__device__ __forceinline__ void scatter_vector(ScatterAdd<real> to, long long at, real w,
                                               const real (&grad)[VEC]) {
#if __CUDA_ARCH__ >= 900
    constexpr bool VECTOR_ATOMICS = VEC % 4 == 0 && sizeof(real) == 4;
#else
    constexpr bool VECTOR_ATOMICS = false;
#endif
    if constexpr (VECTOR_ATOMICS) {
        if (to.fixed == nullptr) {
#pragma unroll
            for (int k = 0; k < VEC; k += 4) {
                DCNBENCH_COUNT_ATOMIC(0);
                atomicAdd(reinterpret_cast<float4*>(to.values + at + k),
                          make_float4(w * grad[k], w * grad[k + 1], w * grad[k + 2],
                                      w * grad[k + 3]));
            }
            return;
        }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) to.add(at + k, w * grad[k]);
}

// Lanes of one warp that share an item of `vectors` vectors: the next power of
// two, at most 32 (so that an xor-shuffle butterfly stays within the warp).
__device__ __forceinline__ int lanes_for(int vectors) {
    int lanes = 1;
    while (lanes < vectors && lanes < 32) lanes *= 2;
    return lanes;
}

template <typename real>
__device__ __forceinline__ real sum_over_lanes(real value, int lanes) {
    for (int mask = lanes / 2; mask > 0; mask /= 2)
        value += __shfl_xor_sync(FULL_WARP, value, mask);
    return value;
}
