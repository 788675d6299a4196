// Feature kernels for the CPU emulator's tests: each exercises one part of the
// supported CUDA subset and is checked against NumPy in test_features.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// Block reduction: warp shuffles, then one partial per warp through static
// shared memory, then the first warp reduces the partials.
__device__ float warp_sum(float v) {
  for (int offset = warpSize / 2; offset > 0; offset /= 2)
    v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

extern "C" __global__ void block_sum(const float* __restrict__ x, float* __restrict__ sums, int n) {
  __shared__ float warp_partials[32];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = warp_sum(i < n ? x[i] : 0.0f);
  const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < blockDim.x / warpSize ? warp_partials[lane] : 0.0f;
    v = warp_sum(v);
    if (lane == 0) sums[blockIdx.x] = v;
  }
}

// Shared-memory transpose with a padded tile, 2-D grid and block.
constexpr int TILE = 32;
constexpr int ROWS_PER_PASS = 8;

extern "C" __global__ void transpose(const float* in, float* out, int rows, int cols) {
  __shared__ float tile[TILE][TILE + 1];
  int x = blockIdx.x * TILE + threadIdx.x;
  int y = blockIdx.y * TILE + threadIdx.y;
  for (int j = 0; j < TILE; j += ROWS_PER_PASS)
    if (x < cols && y + j < rows) tile[threadIdx.y + j][threadIdx.x] = in[(y + j) * cols + x];
  __syncthreads();
  x = blockIdx.y * TILE + threadIdx.x;
  y = blockIdx.x * TILE + threadIdx.y;
  for (int j = 0; j < TILE; j += ROWS_PER_PASS)
    if (x < rows && y + j < cols) out[(y + j) * rows + x] = tile[threadIdx.x][threadIdx.y + j];
}

// Histogram: per-block counts in dynamic shared memory, merged with atomics.
extern "C" __global__ void histogram(const int* values, int n, unsigned* counts, int bins) {
  extern __shared__ unsigned block_counts[];
  for (int b = threadIdx.x; b < bins; b += blockDim.x) block_counts[b] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
    atomicAdd(&block_counts[values[i]], 1u);
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) atomicAdd(&counts[b], block_counts[b]);
}

// Templated kernel (instantiated through name_expressions): y = a*x + y in
// the storage type, accumulating in float like the op kernels do.
template <typename T> __device__ float to_float(T v) { return static_cast<float>(v); }
template <> __device__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ T from_float(float v) { return static_cast<T>(v); }
template <> __device__ __half from_float<__half>(float v) { return __float2half(v); }
template <> __device__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

template <typename T, int UNROLL>
__global__ void axpy(const T* x, T* y, float a, int n) {
  const int base = (blockIdx.x * blockDim.x + threadIdx.x) * UNROLL;
#pragma unroll
  for (int k = 0; k < UNROLL; ++k)
    if (base + k < n) y[base + k] = from_float<T>(fmaf(a, to_float(x[base + k]), to_float(y[base + k])));
}

// Native half / bfloat16 arithmetic and their atomics.
extern "C" __global__ void half_ops(const __half* a, const __half* b, __half* fma_out,
                                   __half* sqrt_out, __half* sum, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  fma_out[i] = __hfma(a[i], b[i], __float2half(1.0f)) * a[i] + b[i];
  sqrt_out[i] = hsqrt(__habs(a[i]));
  atomicAdd(sum, a[i]);
}

extern "C" __global__ void bfloat16_ops(const __nv_bfloat16* a, const __nv_bfloat162* pairs,
                                        __nv_bfloat16* out, __nv_bfloat162* pair_out,
                                        __nv_bfloat16* sum, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = a[i] * a[i] - __float2bfloat16(0.5f);
  pair_out[i] = __hmul2(pairs[i], pairs[i]);
  atomicAdd(sum, a[i]);
}

// 16-byte vector loads and stores through reinterpret_cast.
extern "C" __global__ void scale_float4(const float* __restrict__ x, float* __restrict__ y, float s,
                                        int n4) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n4) return;
  float4 v = __ldg(reinterpret_cast<const float4*>(x) + i);
  v.x *= s; v.y *= s; v.z *= s; v.w = __saturatef(v.w);
  reinterpret_cast<float4*>(y)[i] = v;
}

// 3-D grid and block: every thread writes its global coordinates.
extern "C" __global__ void coordinates(int* out, int nx, int ny, int nz) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y * blockDim.y + threadIdx.y;
  const int z = blockIdx.z * blockDim.z + threadIdx.z;
  if (x < nx && y < ny && z < nz) {
    int* cell = out + 3 * ((z * ny + y) * nx + x);
    cell[0] = x; cell[1] = y; cell[2] = z;
  }
}

// Votes, xor / up shuffles and __syncthreads_count on per-lane predicates.
extern "C" __global__ void warp_votes(const int* flags, unsigned* ballots, int* all_any,
                                      float* xor_sums, int* prefix, int* block_count) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % warpSize;
  const int p = flags[t];
  const unsigned ballot = __ballot_sync(0xffffffffu, p);
  const int all = __all_sync(0xffffffffu, p), any = __any_sync(0xffffffffu, p);
  float v = float(t);
  for (int m = 1; m < warpSize; m *= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  int scan = p;  // inclusive prefix count of the predicate across the warp
  for (int d = 1; d < warpSize; d *= 2) {
    const int up = __shfl_up_sync(0xffffffffu, scan, d);
    if (lane >= d) scan += up;
  }
  const int count = __syncthreads_count(p);
  if (lane == 0) {
    ballots[t / warpSize] = ballot;
    all_any[2 * (t / warpSize)] = all;
    all_any[2 * (t / warpSize) + 1] = any;
  }
  xor_sums[t] = v;
  prefix[t] = scan;
  if (threadIdx.x == 0) block_count[blockIdx.x] = count;
}

// Device assert: a failed one ends the launch with an error, not a crash.
extern "C" __global__ void checked_index(const int* index, int n) {
  assert(index[threadIdx.x] < n);
}
