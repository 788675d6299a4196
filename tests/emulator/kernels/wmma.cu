// Tensor-core (nvcuda::wmma) test kernels: compiled by the CPU emulator for the
// known-answer tests (tests/emulator/test_wmma.py) and by NVRTC for sm_80 and
// sm_90 (tests/test_build_check.py), so the same source is valid CUDA.
#include <mma.h>

using namespace nvcuda;

template <typename T>
__device__ T scaled(T value, float alpha) {
  return T(float(value) * alpha);
}
template <>
__device__ double scaled<double>(double value, float alpha) {
  return value * double(alpha);
}

template <typename Layout> struct IsRowMajor { static constexpr bool value = false; };
template <> struct IsRowMajor<wmma::row_major> { static constexpr bool value = true; };

template <typename Fragment>
__device__ void round_to_tf32(Fragment& f) {
  for (int i = 0; i < f.num_elements; i++) f.x[i] = wmma::__float_to_tf32(f.x[i]);
}

// D = alpha * (A B + C), one warp per M x N tile of D. A is rows x depth, B
// depth x cols, C and D rows x cols, with leading dimensions lda, ldb, ldc (in
// elements) and the layouts of the template. `Input` is the fragments' element
// type (precision::tf32 for float memory), `Memory` the arrays' element type.
template <int M, int N, int K, typename Input, typename Memory, typename Accumulator,
          typename LayoutA, typename LayoutB, bool kRowMajorC, bool kRoundTf32>
__global__ void wmma_gemm(const Memory* __restrict__ a, const Memory* __restrict__ b,
                          const Accumulator* __restrict__ c, Accumulator* __restrict__ d,
                          int tiles_n, int depth, int lda, int ldb, int ldc, float alpha) {
  constexpr bool kRowMajorA = IsRowMajor<LayoutA>::value;
  constexpr bool kRowMajorB = IsRowMajor<LayoutB>::value;
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
  const int row = (warp / tiles_n) * M, col = (warp % tiles_n) * N;
  const wmma::layout_t layout_c = kRowMajorC ? wmma::mem_row_major : wmma::mem_col_major;
  const long long offset_c = kRowMajorC ? (long long)row * ldc + col : (long long)col * ldc + row;

  wmma::fragment<wmma::accumulator, M, N, K, Accumulator> accumulator;
  wmma::load_matrix_sync(accumulator, c + offset_c, ldc, layout_c);
  for (int p = 0; p < depth; p += K) {
    wmma::fragment<wmma::matrix_a, M, N, K, Input, LayoutA> fa;
    wmma::fragment<wmma::matrix_b, M, N, K, Input, LayoutB> fb;
    wmma::load_matrix_sync(fa, a + (kRowMajorA ? (long long)row * lda + p : (long long)p * lda + row),
                           lda);
    wmma::load_matrix_sync(fb, b + (kRowMajorB ? (long long)p * ldb + col : (long long)col * ldb + p),
                           ldb);
    if constexpr (kRoundTf32) {
      round_to_tf32(fa);
      round_to_tf32(fb);
    }
    wmma::mma_sync(accumulator, fa, fb, accumulator);
  }
  for (int i = 0; i < accumulator.num_elements; i++)
    accumulator.x[i] = scaled(accumulator.x[i], alpha);
  wmma::store_matrix_sync(d + offset_c, accumulator, ldc, layout_c);
}

// Each lane fills its accumulator with lane * 64 + i (fill_fragment, then
// x[i] += i) and stores it, row-major 16 x 16: `owner` shows which lane's x[i]
// each element is. It also loads A (16 x 16 __half, row-major) and, per lane,
// writes 1 to `replicated` where x[i + 8] repeats x[i] for every i < 8.
extern "C" __global__ void wmma_fragment_layout(float* owner, int* num_elements, const __half* a,
                                                int* replicated) {
  const int lane = threadIdx.x % 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> accumulator;
  wmma::fill_fragment(accumulator, float(lane * 64));
  for (int i = 0; i < accumulator.num_elements; i++) accumulator.x[i] += float(i);
  wmma::store_matrix_sync(owner, accumulator, 16, wmma::mem_row_major);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, a, 16);
  bool repeats = true;
  for (int i = 0; i < 8; i++) repeats = repeats && __half2float(fa.x[i]) == __half2float(fa.x[i + 8]);
  replicated[lane] = repeats;
  if (lane == 0) {
    num_elements[0] = accumulator.num_elements;
    num_elements[1] = fa.num_elements;
    num_elements[2] = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32,
                                     wmma::row_major>::num_elements;
    num_elements[3] = wmma::fragment<wmma::accumulator, 8, 8, 4, double>::num_elements;
  }
}

// Planted misuse: lanes of the upper half of each warp skip the load (a deadlock
// on the GPU); with `split_pointer`, they all load but pass another pointer.
extern "C" __global__ void wmma_divergent_load(const __half* a, float* d, int split_pointer) {
  const int lane = threadIdx.x % 32;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> accumulator;
  wmma::fill_fragment(accumulator, 0.0f);
  if (split_pointer) {
    wmma::load_matrix_sync(fa, a + (lane < 16 ? 0 : 256), 16);
  } else if (lane < 16) {
    wmma::load_matrix_sync(fa, a, 16);
  }
  wmma::store_matrix_sync(d, accumulator, 16, wmma::mem_row_major);
}

// Warp 0 copies a 16 x 16 tile of A into shared memory; warp 1 multiplies it by
// B (D = A B, one wmma step). With `barrier` 0 the __syncthreads() that orders
// the copy before warp 1's load_matrix_sync is missing: a race.
extern "C" __global__ void wmma_staged(const __half* a, const __half* b, float* d, int barrier) {
  __shared__ __align__(32) __half tile[256];
  if (threadIdx.x < 32)
    for (int i = threadIdx.x; i < 256; i += 32) tile[i] = a[i];
  if (barrier) __syncthreads();
  if (threadIdx.x >= 32) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> accumulator;
    using wmma::load_matrix_sync;  // CUDA's names, found as NVRTC finds them
    using namespace nvcuda::wmma;
    fill_fragment(accumulator, 0.0f);
    load_matrix_sync(fa, tile, 16);
    load_matrix_sync(fb, b, 16);
    mma_sync(accumulator, fa, fb, accumulator);
    store_matrix_sync(d, accumulator, 16, mem_row_major);
  }
}

// One warp transposes C through a shared tile: stored row-major, loaded back
// column-major (wmma operations synchronise the warp: ordered), stored again,
// then read element by element by other lanes than wrote them, which needs the
// __syncwarp() that `sync` 0 leaves out: a race.
extern "C" __global__ void wmma_warp_epilogue(const float* c, float* d, int sync) {
  __shared__ __align__(32) float tile[256];
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> accumulator;
  wmma::load_matrix_sync(accumulator, c, 16, wmma::mem_row_major);
  wmma::store_matrix_sync(tile, accumulator, 16, wmma::mem_row_major);
  wmma::load_matrix_sync(accumulator, tile, 16, wmma::mem_col_major);
  wmma::store_matrix_sync(tile, accumulator, 16, wmma::mem_row_major);
  if (sync) __syncwarp();
  for (int i = threadIdx.x; i < 256; i += 32) d[i] = tile[i];
}
