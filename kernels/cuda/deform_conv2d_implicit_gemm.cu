// Deformable convolution (DCNv1 / DCNv2, HAS_MASK) as an implicit GEMM: the
// sampled columns go from the bilinear gather straight into shared-memory
// tiles of the GEMM with the weight, never through DRAM. Semantics:
// shared/ops-semantics.md (torchvision.ops.deform_conv2d), NCHW, B0 sampling
// (deform_conv2d_sampling.cuh). Design and counters: docs/kernels/deform_conv2d.md.
//
// Per weight group the convolution is the GEMM
//     out[co, q] = sum_r W[co, r] * col[r, q],   r = (channel, tap), q = (sample, pixel)
// with q running over every sample of the launch (one GEMM over n * H_out * W_out,
// so small maps still give many tiles). Three kernels, each one GEMM whose
// gathered operand is built tile by tile in shared memory:
//  - implicit_gemm_forward:      out = W . col (bias in the epilogue);
//  - implicit_gemm_backward_weight:  grad_W = grad_out . col^T, reduced over all q
//                                in one block per output tile (no per-sample partials);
//  - implicit_gemm_backward_sampling: grad_col = W^T . grad_out per tile, then, from
//                                the tile in shared memory, the scatter into
//                                grad_input and the offset / mask gradients
//                                (deform_conv2d.cu's col2im, fused).
//
// All three run over r in the weight's stored order ([C_out, C_in/groups, kh, kw]:
// taps fastest): the forward's reduction, grad_weight's and grad_sampling's rows,
// so a row of the weight read or of grad_weight stored is a contiguous run. The
// gathers (forward, grad_weight) sample from a per-block point table (each
// (tap, pixel) of an offset group located once).
//
// Tiles: blocks of 256 threads, 16-deep reduction steps; 128 output channels x
// 64 pixels (forward) or x 64 rows r = (channel, tap) (grad_weight), where every
// block of output channels gathers the columns again; 128 (channel, tap) rows
// (64 in double) x 64 pixels (grad_sampling).
// The product of two shared tiles (TileGemm) runs
//  - for __half / __nv_bfloat16 on tensor cores (nvcuda::wmma m16n16k16, float
//    accumulation): the tiles hold the dtype (a gathered column is rounded to it
//    once, as the im2col design's columns are), each warp owns rows / 4 x 32 outputs;
//  - for float with TF32 (the host's allow_tf32, template argument TF32) on
//    tensor cores too (m16n16k8, the float tiles rounded to TF32 in the fragments);
//  - otherwise, float and double, on SIMT cores: the tiles hold acc_t<scalar_t>,
//    each thread owns a (rows / 16) x 4 sub-tile (rows ty + 16 i, columns tx + 16 j:
//    the shared-memory reads are broadcasts and conflict-free).
// The finished tile is staged in shared memory as float (double), where the
// epilogue reads it with consecutive threads on consecutive pixels. All other
// math in acc_t<scalar_t>, one rounding on store.
//
// Index widths: as deform_conv2d.cu (planes and one sample's offsets fit in int,
// checked on the host; the output pixel count n * H_out * W_out too); offsets
// that multiply in the batch or the channel count are long long.

#include "deform_conv2d_sampling.cuh"
#include "deterministic_atomics.cuh"
#include "scalar_conversions.cuh"

#include <mma.h>

#ifndef IMPLICIT_GEMM_THREADS
#error "compile with -DIMPLICIT_GEMM_THREADS=<threads per block> (kernels/ops/deform_conv2d.py sets it)"
#endif

namespace {

constexpr int TILE_M = 64;  // rows of a 64-row output tile
// Output channels of a block of the kernels that gather the columns (forward,
// grad_weight): every block of output channels gathers them again.
constexpr int GATHER_TILE_M = 128;
// Rows ((channel, tap) pairs) of a grad_sampling block: its whole tile is staged
// for the epilogue, which in double fits 64 rows only.
template <typename real>
constexpr int sampling_rows() { return sizeof(real) == 8 ? 64 : 128; }
constexpr int TILE_N = 64;  // columns of a block's output tile
constexpr int TILE_K = 16;  // reduction depth of one shared-memory step
constexpr int THREADS = IMPLICIT_GEMM_THREADS;
static_assert(THREADS == 256, "the tile loaders and TileGemm assume 256 threads");
// The staged output tile holds STAGE_ROWS rows at a time (a 128-row tile in two
// halves: a whole one in double would not fit the 48 KiB of static shared memory).
constexpr int STAGE_ROWS = 64;
// Row stride of the staged output tile: 80 words put the two rows a SIMT warp
// writes 16 banks apart, and 320 bytes is the multiple of 16 wmma stores need.
constexpr int STAGE_STRIDE = TILE_N + 16;
// Threads per tile column in the gather, staging and epilogue loops; the
// sampling-gradient epilogue gives each of them some taps of the tile.
constexpr int SPLIT = THREADS / TILE_N;

// out[m][n] += sum_k a[k][m] * b[k][n] over the shared tiles of one reduction
// step, for the whole block; ROWS x TILE_N outputs. After the last step,
// stage(out, half) writes rows STAGE_ROWS * half ... + STAGE_ROWS - 1 of the
// result, row-major with row stride STAGE_STRIDE, to shared memory.
// SIMT: 16 x 16 threads of (ROWS / 16) x 4 outputs in registers.
template <typename scalar_t, int ROWS>
struct SimtGemm {
    using real = acc_t<scalar_t>;
    using tile_t = real;
    static constexpr int TILE_ROWS = ROWS;
    // A row stride of ROWS + 2 words puts the 16 x 2 (k, row) pairs a warp
    // stores with k fastest into 32 distinct banks.
    static constexpr int PAD = 2;
    static constexpr int SUB_M = ROWS / 16, SUB_N = 4;
    real acc[SUB_M][SUB_N] = {};

    __device__ __forceinline__ void multiply(const tile_t (&a)[TILE_K][ROWS + PAD],
                                             const tile_t (&b)[TILE_K][TILE_N + PAD]) {
        const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
        for (int k = 0; k < TILE_K; ++k) {
            real a_k[SUB_M], b_k[SUB_N];
#pragma unroll
            for (int i = 0; i < SUB_M; ++i) a_k[i] = a[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < SUB_N; ++j) b_k[j] = b[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < SUB_M; ++i)
#pragma unroll
                for (int j = 0; j < SUB_N; ++j) acc[i][j] += a_k[i] * b_k[j];
        }
    }

    // Rows ty + 16 i with i / 4 == half.
    __device__ __forceinline__ void stage(real* out, int half) const {
        const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
        constexpr int STAGED = STAGE_ROWS / 16;
        for (int i = 0; i < STAGED; ++i)
            for (int j = 0; j < SUB_N; ++j)
                out[(ty + 16 * i) * STAGE_STRIDE + tx + 16 * j] = acc[half * STAGED + i][j];
    }
};

// TF32 operands: CUDA leaves a tf32 fragment's float elements unrounded.
template <typename Fragment>
__device__ __forceinline__ void round_operand(Fragment&) {}
template <typename Layout>
__device__ __forceinline__ void round_operand(
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 8, nvcuda::wmma::precision::tf32,
                           Layout>& f) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = nvcuda::wmma::__float_to_tf32(f.x[i]);
}
template <typename Layout>
__device__ __forceinline__ void round_operand(
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 8, nvcuda::wmma::precision::tf32,
                           Layout>& f) {
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = nvcuda::wmma::__float_to_tf32(f.x[i]);
}

// Tensor cores: warp w owns rows ROWS / 4 * (w % 4) ... + ROWS / 4 - 1 and columns
// 32 (w / 4) ... + 31, (ROWS / 64) x 2 m16n16kSTEP_K float accumulators. a[k][m] is
// matrix_a (m x k) column-major. tile_t: what the tiles hold; element_t: the
// fragments' type (tile_t, or precision::tf32 over float tiles).
template <typename tile_type, typename element_t, int STEP_K, int ROWS>
struct WmmaGemm {
    using real = float;
    using tile_t = tile_type;
    static constexpr int TILE_ROWS = ROWS;
    // Row strides (72 / 136 halves, 68 / 132 floats) that are the multiple of 16
    // bytes wmma loads need.
    static constexpr int PAD = 16 / sizeof(tile_t);
    static constexpr int ROW_FRAGMENTS = ROWS / 64, COLUMN_FRAGMENTS = 2;
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, STEP_K, float>
        acc[ROW_FRAGMENTS][COLUMN_FRAGMENTS];

    __device__ __forceinline__ WmmaGemm() {
        for (int i = 0; i < ROW_FRAGMENTS; ++i)
            for (int f = 0; f < COLUMN_FRAGMENTS; ++f) nvcuda::wmma::fill_fragment(acc[i][f], 0.0f);
    }
    __device__ __forceinline__ int row(int i) const {
        return threadIdx.x / 32 % 4 * (ROWS / 4) + 16 * i;
    }
    __device__ __forceinline__ int column(int f) const {
        return threadIdx.x / 32 / 4 * 32 + 16 * f;
    }

    __device__ __forceinline__ void multiply(const tile_t (&a)[TILE_K][ROWS + PAD],
                                             const tile_t (&b)[TILE_K][TILE_N + PAD]) {
        using namespace nvcuda;
        for (int k = 0; k < TILE_K; k += STEP_K) {
            wmma::fragment<wmma::matrix_b, 16, 16, STEP_K, element_t, wmma::row_major>
                b_fragment[COLUMN_FRAGMENTS];
            for (int f = 0; f < COLUMN_FRAGMENTS; ++f) {
                wmma::load_matrix_sync(b_fragment[f], &b[k][column(f)], TILE_N + PAD);
                round_operand(b_fragment[f]);
            }
            for (int i = 0; i < ROW_FRAGMENTS; ++i) {
                wmma::fragment<wmma::matrix_a, 16, 16, STEP_K, element_t, wmma::col_major>
                    a_fragment;
                wmma::load_matrix_sync(a_fragment, &a[k][row(i)], ROWS + PAD);
                round_operand(a_fragment);
                for (int f = 0; f < COLUMN_FRAGMENTS; ++f)
                    wmma::mma_sync(acc[i][f], a_fragment, b_fragment[f], acc[i][f]);
            }
        }
    }

    // The fragments of rows STAGE_ROWS * half ... + STAGE_ROWS - 1.
    __device__ __forceinline__ void stage(real* out, int half) const {
        for (int i = 0; i < ROW_FRAGMENTS; ++i) {
            const int staged_row = row(i) - STAGE_ROWS * half;
            if (staged_row < 0 || staged_row >= STAGE_ROWS) continue;  // uniform in the warp
            for (int f = 0; f < COLUMN_FRAGMENTS; ++f)
                nvcuda::wmma::store_matrix_sync(out + staged_row * STAGE_STRIDE + column(f),
                                                acc[i][f], STAGE_STRIDE,
                                                nvcuda::wmma::mem_row_major);
        }
    }
};

template <typename scalar_t, bool TF32, int ROWS> struct GemmOf {
    using type = SimtGemm<scalar_t, ROWS>;
};
template <int ROWS> struct GemmOf<float, true, ROWS> {
    using type = WmmaGemm<float, nvcuda::wmma::precision::tf32, 8, ROWS>;
};
template <bool TF32, int ROWS> struct GemmOf<__half, TF32, ROWS> {
    using type = WmmaGemm<__half, __half, 16, ROWS>;
};
template <bool TF32, int ROWS> struct GemmOf<__nv_bfloat16, TF32, ROWS> {
    using type = WmmaGemm<__nv_bfloat16, __nv_bfloat16, 16, ROWS>;
};

// A block's shared memory: the two operand tiles of a step and EXTRA_BYTES more
// (the forward's point table), and over the same bytes (once the last step is
// multiplied) STAGED rows of the staged result tile.
template <typename Gemm, int EXTRA_BYTES = 0, int STAGED = STAGE_ROWS>
struct SharedTiles {
    using tile_t = typename Gemm::tile_t;
    using real = typename Gemm::real;
    static constexpr int ROWS = Gemm::TILE_ROWS;
    static constexpr int A_BYTES = TILE_K * (ROWS + Gemm::PAD) * sizeof(tile_t);
    static constexpr int TILE_BYTES = A_BYTES + TILE_K * (TILE_N + Gemm::PAD) * sizeof(tile_t);
    static constexpr int STAGE_BYTES = STAGED * STAGE_STRIDE * sizeof(real);
    static constexpr int BYTES = TILE_BYTES + EXTRA_BYTES > STAGE_BYTES
                                     ? TILE_BYTES + EXTRA_BYTES
                                     : STAGE_BYTES;
    unsigned char* bytes;

    __device__ __forceinline__ tile_t (&a())[TILE_K][ROWS + Gemm::PAD] {
        return *reinterpret_cast<tile_t(*)[TILE_K][ROWS + Gemm::PAD]>(bytes);
    }
    __device__ __forceinline__ tile_t (&b())[TILE_K][TILE_N + Gemm::PAD] {
        return *reinterpret_cast<tile_t(*)[TILE_K][TILE_N + Gemm::PAD]>(bytes + A_BYTES);
    }
    __device__ __forceinline__ unsigned char* extra() { return bytes + TILE_BYTES; }
    __device__ __forceinline__ real* staged() { return reinterpret_cast<real*>(bytes); }
};

struct Conv {
    int channels, height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, groups, offset_groups, out_h, out_w, out_channels, samples;
    __device__ int taps() const { return kernel_h * kernel_w; }
    __device__ int pixels() const { return out_h * out_w; }
    __device__ int columns() const { return samples * out_h * out_w; }  // q's range
    __device__ int group_channels() const { return channels / groups; }
    __device__ int group_out() const { return out_channels / groups; }
    __device__ int offset_group_of(int channel) const {
        return channel / (channels / offset_groups);
    }
};

// Output pixel q = n * H_out * W_out + p of the GEMM's column dimension.
struct Pixel {
    bool valid;          // q < samples * H_out * W_out
    int n, p;            // sample, pixel within the sample
    int base_y, base_x;  // undeformed position of tap (0, 0)
};

__device__ __forceinline__ Pixel pixel_of(const Conv& cv, int q) {
    Pixel px;
    px.valid = q < cv.columns();
    if (!px.valid) q = 0;
    px.n = q / cv.pixels();
    px.p = q % cv.pixels();
    px.base_y = px.p / cv.out_w * cv.stride_h - cv.pad_h;
    px.base_x = px.p % cv.out_w * cv.stride_w - cv.pad_w;
    return px;
}

// Where (offset group, tap) samples at a pixel, and its mask (1 without HAS_MASK).
template <typename real>
struct Point {
    Sample<real> s;
    real mask;
};

template <typename scalar_t, bool HAS_MASK>
__device__ __forceinline__ Point<acc_t<scalar_t>> locate_point(const Conv& cv,
                                                               const scalar_t* __restrict__ offset,
                                                               const scalar_t* __restrict__ mask,
                                                               const Pixel& px, int group, int tap) {
    using real = acc_t<scalar_t>;
    const int pixels = cv.pixels();
    const int group_tap = group * cv.taps() + tap;
    const scalar_t* offset_yx = offset + static_cast<long long>(px.n) * 2 * cv.offset_groups *
                                             cv.taps() * pixels +
                                2 * group_tap * pixels + px.p;
    Point<real> point{};
    point.s = locate(px.base_y + tap / cv.kernel_w * cv.dilation_h,
                     px.base_x + tap % cv.kernel_w * cv.dilation_w, to_acc(offset_yx[0]),
                     to_acc(offset_yx[pixels]), cv.height, cv.width);
    point.mask = HAS_MASK && point.s.in_range
                     ? to_acc(mask[static_cast<long long>(px.n) * cv.offset_groups * cv.taps() *
                                       pixels +
                                   group_tap * pixels + px.p])
                     : real(1);
    return point;
}

// The gathers load the four corners unconditionally, every lane of a warp taking
// part in each load as in the GPU's four predicated loads; a corner outside the
// map (weight 0) reads this one instead, which the point loads anyway: its first
// corner inside the map (one is, in range), or the plane's first element.
template <typename real>
__device__ __forceinline__ int first_corner_inside(const Sample<real>& s) {
    if (!s.in_range) return 0;
    for (int q = 0; q < 4; ++q)
        if (s.corner[q] >= 0) return s.corner[q];
    return 0;
}

// sum of weight * corner value over the corners of weight != 0 (a corner of
// weight 0 adds nothing, even an Inf or NaN): B0's sum, corners 0 ... 3 in turn.
template <typename real>
__device__ __forceinline__ real add_corner(real value, real weight, real corner_value) {
    return value + (weight != 0 ? weight * corner_value : real(0));
}

// The sampling points of up to TAPS taps of one offset group at a block's TILE_N
// pixels (Sample's weights, all 0 out of range; its corners; the mask), located
// once and read by the gathers of every channel of the offset group.
template <typename scalar_t>
struct PointTable {
    using real = acc_t<scalar_t>;
    // A 3 x 3 kernel in one chunk; 5 taps in double, where the 128-row operand
    // tiles already take 25 of the 48 KiB of static shared memory.
    static constexpr int TAPS = sizeof(real) == 8 ? 5 : 9;
    int corner[4][TAPS][TILE_N];
    real weight[4][TAPS][TILE_N];
    real mask[TAPS][TILE_N];

    // A corner outside the map, or every corner out of range, is stored with
    // weight 0 and first_corner_inside's address: column()'s loads run
    // unconditionally.
    __device__ __forceinline__ void set(int e, int n, const Point<real>& point) {
        const Sample<real>& s = point.s;
        const int inside = first_corner_inside(s);
        for (int q = 0; q < 4; ++q) {
            const bool loaded = s.in_range && s.corner[q] >= 0;
            corner[q][e][n] = loaded ? s.corner[q] : inside;
            weight[q][e][n] = loaded ? s.weight[q] : real(0);
        }
        mask[e][n] = point.mask;
    }

    // Locates taps tap0 ... tap0 + chunk - 1 of offset_group at px, the pixel of
    // this thread's column n = threadIdx.x % TILE_N, the SPLIT threads of a column
    // taking the taps in turn. The caller synchronizes before the table is read.
    template <bool HAS_MASK>
    __device__ __forceinline__ void locate(const Conv& cv, const scalar_t* __restrict__ offset,
                                           const scalar_t* __restrict__ mask, const Pixel& px,
                                           int offset_group, int tap0, int chunk) {
        const int n = threadIdx.x % TILE_N;
        for (int e = threadIdx.x / TILE_N; e < chunk; e += SPLIT)
            set(e, n, locate_point<scalar_t, HAS_MASK>(cv, offset, mask, px, offset_group,
                                                       tap0 + e));
    }

    // mask * B0(plane, point of entry e at pixel n): one element of the columns.
    __device__ __forceinline__ real column(int e, int n, const scalar_t* __restrict__ plane) const {
        real value = 0;
#pragma unroll
        for (int q = 0; q < 4; ++q)
            value = add_corner(value, weight[q][e][n], to_acc(plane[corner[q][e][n]]));
        return mask[e][n] * value;
    }
};

}  // namespace

// output[n, co, p] = bias[co] + sum_{c, tap} weight[co, c, tap] * mask * B0(input[n, c], ...)
// grid (ceil(n * H_out * W_out / 64), ceil((C_out / groups) / 128), groups): a block
// computes 128 output channels x 64 output pixels of one weight group.
//
// The reduction runs in the weight's stored order, r = (channel, tap) with the
// taps fastest, one offset group's channels at a time (and in chunks of
// PointTable::TAPS taps when the kernel has more): an A-tile row of a step is a
// contiguous run of the weight, and the gather reads its sampling point from the
// block's point table instead of locating it.
template <typename scalar_t, bool HAS_MASK, bool TF32 = false>
__global__ void __launch_bounds__(IMPLICIT_GEMM_THREADS)
implicit_gemm_forward(const scalar_t* __restrict__ input,   // [n, C, H, W]
                      const scalar_t* __restrict__ offset,  // [n, 2 * G * kh * kw, H_out, W_out]
                      const scalar_t* __restrict__ mask,    // [n, G * kh * kw, H_out, W_out]; unread without HAS_MASK
                      const scalar_t* __restrict__ weight,  // [C_out, C / groups, kh, kw]
                      const scalar_t* __restrict__ bias,    // [C_out] or null
                      scalar_t* __restrict__ output,        // [n, C_out, H_out, W_out]
                      int channels, int height, int width, int kernel_h, int kernel_w,
                      int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h,
                      int dilation_w, int groups, int offset_groups, int out_h, int out_w,
                      int out_channels, int samples) {
    using Gemm = typename GemmOf<scalar_t, TF32, GATHER_TILE_M>::type;
    using tile_t = typename Gemm::tile_t;
    using real = acc_t<scalar_t>;
    using Table = PointTable<scalar_t>;
    const Conv cv{channels, height,     width,      kernel_h, kernel_w,      stride_h,
                  stride_w, pad_h,      pad_w,      dilation_h, dilation_w,  groups,
                  offset_groups, out_h, out_w,      out_channels, samples};
    using Shared = SharedTiles<Gemm, sizeof(Table)>;
    __shared__ __align__(32) unsigned char shared[Shared::BYTES];
    Shared tiles{shared};
    auto& a_tile = tiles.a();  // weight: [k][out channel]
    auto& b_tile = tiles.b();  // columns: [k][pixel]
    Table& table = *reinterpret_cast<Table*>(tiles.extra());
    const int taps = cv.taps(), group_channels = cv.group_channels(), group_out = cv.group_out();
    const int group = blockIdx.z;
    const int m0 = blockIdx.y * GATHER_TILE_M, q0 = blockIdx.x * TILE_N;
    const int t = threadIdx.x;
    // One pixel (column n) per thread for the point table, the gather and the epilogue.
    const int n = t % TILE_N;
    const Pixel px = pixel_of(cv, q0 + n);
    const int first_channel = group * group_channels;
    const long long plane = static_cast<long long>(cv.height) * cv.width;
    const scalar_t* group_input =
        input + (static_cast<long long>(px.n) * cv.channels + first_channel) * plane;
    const scalar_t* group_weight = weight + static_cast<long long>(group) * group_out *
                                                group_channels * taps;
    const int offset_group_channels = cv.channels / cv.offset_groups;

    Gemm gemm;
    // [c_begin, c_end): the weight group's channels of one offset group.
    for (int c_begin = 0, c_end; c_begin < group_channels; c_begin = c_end) {
        const int offset_group = cv.offset_group_of(first_channel + c_begin);
        c_end = min(group_channels, (offset_group + 1) * offset_group_channels - first_channel);
        for (int tap0 = 0; tap0 < taps; tap0 += Table::TAPS) {
            const int chunk = min(Table::TAPS, taps - tap0);
            // No barrier before: the last step's gathers read the table before its
            // first __syncthreads().
            table.template locate<HAS_MASK>(cv, offset, mask, px, offset_group, tap0, chunk);
            __syncthreads();
            const int depth = (c_end - c_begin) * chunk;  // r = (c - c_begin) * chunk + tap - tap0
            for (int r0 = 0; r0 < depth; r0 += TILE_K) {
                // a_tile[k][m] = weight[group's m0 + m, c_begin + r / chunk, tap0 + r % chunk]
                for (int pass = 0; pass < GATHER_TILE_M / 16; ++pass) {
                    const int k = t % TILE_K, m = t / TILE_K + 16 * pass, r = r0 + k;
                    a_tile[k][m] = from_acc<tile_t>(
                        m0 + m < group_out && r < depth
                            ? to_acc(group_weight[(static_cast<long long>(m0 + m) *
                                                       group_channels +
                                                   c_begin + r / chunk) * taps +
                                                  tap0 + r % chunk])
                            : real(0));
                }
                // b_tile[k][n] = the column of (c_begin + r / chunk, tap0 + r % chunk) at q0 + n
                for (int pass = 0; pass < TILE_K / SPLIT; ++pass) {
                    const int k = t / TILE_N + SPLIT * pass, r = r0 + k;
                    b_tile[k][n] = from_acc<tile_t>(
                        px.valid && r < depth
                            ? table.column(r % chunk, n,
                                           group_input + (c_begin + r / chunk) * plane)
                            : real(0));
                }
                __syncthreads();
                gemm.multiply(a_tile, b_tile);
                __syncthreads();
            }
        }
    }
    for (int half = 0; half < GATHER_TILE_M / STAGE_ROWS; ++half) {
        gemm.stage(tiles.staged(), half);
        __syncthreads();
        for (int pass = 0; px.valid && pass < STAGE_ROWS / SPLIT; ++pass) {
            const int m = t / TILE_N + SPLIT * pass;  // row of the staged half
            const int row = m0 + STAGE_ROWS * half + m;
            if (row >= group_out) break;
            const int co = group * group_out + row;
            const real value = tiles.staged()[m * STAGE_STRIDE + n] +
                               (bias != nullptr ? to_acc(bias[co]) : real(0));
            output[(static_cast<long long>(px.n) * cv.out_channels + co) * cv.pixels() + px.p] =
                from_acc<scalar_t>(value);
        }
        __syncthreads();  // the next half is staged over this one
    }
}

// grad_weight[co, c, tap] = sum_q grad_output[co, q] * column[(c, tap), q] over every
// output pixel q of every sample, one block per output tile: no partial products.
// A block computes 128 output channels x 64 rows r = (channel, tap), taps fastest
// as the weight stores them (so a row of the tile is a contiguous run of
// grad_weight): the taps of one chunk of min(kh * kw, PointTable::TAPS) for
// 64 / chunk channels. A step's columns (16 pixels x the rows) come from the
// block's point table, located for 64 pixels (four steps) at a time, per offset
// group of the block's channels.
// grid (channel blocks * tap chunks, ceil((C_out / groups) / 128), groups).
template <typename scalar_t, bool HAS_MASK, bool TF32 = false>
__global__ void __launch_bounds__(IMPLICIT_GEMM_THREADS)
implicit_gemm_backward_weight(const scalar_t* __restrict__ input,        // [n, C, H, W]
                              const scalar_t* __restrict__ offset,       // [n, 2 * G * kh * kw, H_out, W_out]
                              const scalar_t* __restrict__ mask,         // [n, G * kh * kw, H_out, W_out]; unread without HAS_MASK
                              const scalar_t* __restrict__ grad_output,  // [n, C_out, H_out, W_out]
                              scalar_t* __restrict__ grad_weight,        // [C_out, C / groups, kh, kw]
                              int channels, int height, int width, int kernel_h, int kernel_w,
                              int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h,
                              int dilation_w, int groups, int offset_groups, int out_h,
                              int out_w, int out_channels, int samples) {
    using Gemm = typename GemmOf<scalar_t, TF32, GATHER_TILE_M>::type;
    using tile_t = typename Gemm::tile_t;
    using real = acc_t<scalar_t>;
    using Table = PointTable<scalar_t>;
    const Conv cv{channels, height,     width,      kernel_h, kernel_w,      stride_h,
                  stride_w, pad_h,      pad_w,      dilation_h, dilation_w,  groups,
                  offset_groups, out_h, out_w,      out_channels, samples};
    using Shared = SharedTiles<Gemm, sizeof(Table)>;
    __shared__ __align__(32) unsigned char shared[Shared::BYTES];
    Shared tiles{shared};
    auto& a_tile = tiles.a();  // grad_output: [q][out channel]
    auto& b_tile = tiles.b();  // columns: [q][row]
    Table& table = *reinterpret_cast<Table*>(tiles.extra());
    const int taps = cv.taps(), group_channels = cv.group_channels(), group_out = cv.group_out();
    const int chunk_taps = min(taps, Table::TAPS);
    const int block_channels = TILE_N / chunk_taps;
    const int channel_blocks = (group_channels + block_channels - 1) / block_channels;
    const int c0 = blockIdx.x % channel_blocks * block_channels;
    const int tap0 = blockIdx.x / channel_blocks * chunk_taps;
    const int chunk = min(chunk_taps, taps - tap0);  // row r = (c - c0) * chunk + tap - tap0
    const int c_last = min(c0 + block_channels, group_channels);
    const int rows = (c_last - c0) * chunk;
    const int group = blockIdx.z;
    const int m0 = blockIdx.y * GATHER_TILE_M;
    const int t = threadIdx.x;
    const int columns = cv.columns(), pixels = cv.pixels();
    const int first_channel = group * group_channels;
    const long long plane = static_cast<long long>(cv.height) * cv.width;
    const int offset_group_channels = cv.channels / cv.offset_groups;
    // Both loads of a step: reduction index k = t % TILE_K (one pixel per thread),
    // rows t / TILE_K + 16 * pass.
    const int k = t % TILE_K;

    Gemm gemm;
    // [c_begin, c_end): the block's channels of one offset group (all of them
    // unless the block straddles offset groups; the other rows are 0 meanwhile).
    for (int c_begin = c0, c_end; c_begin < c_last; c_begin = c_end) {
        const int offset_group = cv.offset_group_of(first_channel + c_begin);
        c_end = min(c_last, (offset_group + 1) * offset_group_channels - first_channel);
        for (int q_table = 0; q_table < columns; q_table += TILE_N) {
            // No barrier before: the last step's gathers read the table before its
            // first __syncthreads().
            table.template locate<HAS_MASK>(cv, offset, mask, pixel_of(cv, q_table + t % TILE_N),
                                            offset_group, tap0, chunk);
            __syncthreads();
            for (int q0 = q_table; q0 < min(columns, q_table + TILE_N); q0 += TILE_K) {
                const Pixel px = pixel_of(cv, q0 + k);
                for (int pass = 0; pass < GATHER_TILE_M / 16; ++pass) {
                    const int m = t / TILE_K + 16 * pass;
                    a_tile[k][m] = from_acc<tile_t>(
                        px.valid && m0 + m < group_out
                            ? to_acc(grad_output[(static_cast<long long>(px.n) * cv.out_channels +
                                                  group * group_out + m0 + m) * pixels + px.p])
                            : real(0));
                }
                // b_tile[k][r] = the column of (c0 + r / chunk, tap0 + r % chunk) at q0 + k
                const scalar_t* sample_input =
                    input + (static_cast<long long>(px.n) * cv.channels + first_channel) * plane;
                for (int pass = 0; pass < TILE_N / 16; ++pass) {
                    const int r = t / TILE_K + 16 * pass, c = c0 + r / chunk;
                    b_tile[k][r] = from_acc<tile_t>(
                        px.valid && r < rows && c >= c_begin && c < c_end
                            ? table.column(r % chunk, q0 - q_table + k, sample_input + c * plane)
                            : real(0));
                }
                __syncthreads();
                gemm.multiply(a_tile, b_tile);
                __syncthreads();
            }
        }
    }
    // Consecutive threads on consecutive rows r: a warp stores 32 consecutive
    // elements of grad_weight when the chunk is every tap.
    const int r = t % TILE_N, c = c0 + r / chunk, tap = tap0 + r % chunk;
    for (int half = 0; half < GATHER_TILE_M / STAGE_ROWS; ++half) {
        gemm.stage(tiles.staged(), half);
        __syncthreads();
        for (int pass = 0; r < rows && pass < STAGE_ROWS / SPLIT; ++pass) {
            const int m = t / TILE_N + SPLIT * pass;  // row of the staged half
            const int row = m0 + STAGE_ROWS * half + m;
            if (row >= group_out) break;
            grad_weight[((static_cast<long long>(group) * group_out + row) * group_channels + c) *
                            taps + tap] = from_acc<scalar_t>(tiles.staged()[m * STAGE_STRIDE + r]);
        }
        __syncthreads();  // the next half is staged over this one
    }
}

// grad_col[(c, tap), q] = sum_co weight[co, c, tap] * grad_output[co, q] for a tile of
// 128 (64 in double) rows r = (channel, tap), taps fastest, as the weight stores
// them (so an A-tile row is a contiguous run of the weight), x 64 output pixels,
// staged in shared memory. A block's rows are the taps of one chunk of
// min(kh * kw, rows) taps for rows / chunk channels. Then, as deform_conv2d.cu's
// col2im, per (channel, tap, pixel):
//  - grad_col * mask * bilinear weight scattered into grad_input (float32 atomics,
//    or with grad_input_fixed the fixed-point ones of deterministic_atomics.cuh;
//    both null: no scatter);
//  - d/dy, d/dx (times the mask) and d/dmask summed over the block's channels of
//    one offset group in registers and stored once into the thread's own partial
//    sums [slices, n, ...]. The 4 threads of a pixel take the chunk's taps in turn
//    (tap s, s + 4, ...); with fewer than 4 taps, 4 / taps of them share a tap,
//    each with a part of the channels: slice = (group * channel blocks + channel
//    block) * parts + part. The host zero-fills the slices (a slice covers only
//    the offset groups of its channels) and sums them.
// grid (ceil(n * H_out * W_out / 64), channel blocks * tap chunks, groups).
template <typename scalar_t, bool HAS_MASK, bool TF32 = false>
__global__ void __launch_bounds__(IMPLICIT_GEMM_THREADS)
implicit_gemm_backward_sampling(const scalar_t* __restrict__ input,        // [n, C, H, W]
                                const scalar_t* __restrict__ offset,       // [n, 2 * G * kh * kw, H_out, W_out]
                                const scalar_t* __restrict__ mask,         // [n, G * kh * kw, H_out, W_out]; unread without HAS_MASK
                                const scalar_t* __restrict__ weight,       // [C_out, C / groups, kh, kw]
                                const scalar_t* __restrict__ grad_output,  // [n, C_out, H_out, W_out]
                                acc_t<scalar_t>* __restrict__ grad_input,  // [n, C, H, W], accumulated; or null
                                long long* __restrict__ grad_input_fixed,  // [n, C, H, W], fixed point; or null
                                double fixed_scale, int* __restrict__ fixed_status,
                                acc_t<scalar_t>* __restrict__ grad_offset_partial,  // [slices, n, 2 * G * kh * kw, H_out * W_out]
                                acc_t<scalar_t>* __restrict__ grad_mask_partial,    // [slices, n, G * kh * kw, H_out * W_out]; unwritten without HAS_MASK
                                int channels, int height, int width, int kernel_h, int kernel_w,
                                int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h,
                                int dilation_w, int groups, int offset_groups, int out_h,
                                int out_w, int out_channels, int samples) {
    using real = acc_t<scalar_t>;
    constexpr int ROWS = sampling_rows<real>();
    using Gemm = typename GemmOf<scalar_t, TF32, ROWS>::type;
    using tile_t = typename Gemm::tile_t;
    const Conv cv{channels, height,     width,      kernel_h, kernel_w,      stride_h,
                  stride_w, pad_h,      pad_w,      dilation_h, dilation_w,  groups,
                  offset_groups, out_h, out_w,      out_channels, samples};
    using Shared = SharedTiles<Gemm, 0, ROWS>;
    __shared__ __align__(32) unsigned char shared[Shared::BYTES];
    Shared tiles{shared};
    auto& a_tile = tiles.a();  // weight: [out channel][row]
    auto& b_tile = tiles.b();  // grad_output: [out channel][pixel]
    const int taps = cv.taps(), group_channels = cv.group_channels(), group_out = cv.group_out();
    const int pixels = cv.pixels();
    const int chunk_taps = min(taps, ROWS);
    const int block_channels = ROWS / chunk_taps;
    const int channel_blocks = (group_channels + block_channels - 1) / block_channels;
    const int channel_block = blockIdx.y % channel_blocks;
    const int tap0 = blockIdx.y / channel_blocks * chunk_taps;
    const int chunk = min(chunk_taps, taps - tap0);  // row r = (c - c0) * chunk + tap - tap0
    const int c0 = channel_block * block_channels;
    const int rows = min(block_channels, group_channels - c0) * chunk;
    const int group = blockIdx.z;
    const int q0 = blockIdx.x * TILE_N;
    const int t = threadIdx.x;
    // One pixel per thread for the grad_output loads and the epilogue.
    const int n = t % TILE_N;
    const Pixel px = pixel_of(cv, q0 + n);
    const int split = t / TILE_N;
    const scalar_t* group_weight = weight + static_cast<long long>(group) * group_out *
                                                group_channels * taps;

    Gemm gemm;
    for (int k0 = 0; k0 < group_out; k0 += TILE_K) {
        // a_tile[k][r] = weight[k0 + k, c0 + r / chunk, tap0 + r % chunk]
        for (int pass = 0; pass < TILE_K * ROWS / THREADS; ++pass) {
            const int r = t % ROWS, k = t / ROWS + THREADS / ROWS * pass;
            a_tile[k][r] = from_acc<tile_t>(
                k0 + k < group_out && r < rows
                    ? to_acc(group_weight[(static_cast<long long>(k0 + k) * group_channels + c0 +
                                           r / chunk) * taps + tap0 + r % chunk])
                    : real(0));
        }
        for (int pass = 0; pass < TILE_K / SPLIT; ++pass) {
            const int k = split + SPLIT * pass;
            b_tile[k][n] = from_acc<tile_t>(
                px.valid && k0 + k < group_out
                    ? to_acc(grad_output[(static_cast<long long>(px.n) * cv.out_channels +
                                          group * group_out + k0 + k) * pixels + px.p])
                    : real(0));
        }
        __syncthreads();
        gemm.multiply(a_tile, b_tile);
        __syncthreads();
    }
    for (int half = 0; half < ROWS / STAGE_ROWS; ++half)
        gemm.stage(tiles.staged() + half * STAGE_ROWS * STAGE_STRIDE, half);
    __syncthreads();
    if (!px.valid) return;
    const real* grad_col = tiles.staged();  // [row][pixel], row stride STAGE_STRIDE

    const ScatterAdd<real> grad_input_target{grad_input, grad_input_fixed, fixed_scale,
                                             fixed_status};
    const bool scatter = grad_input_target.enabled();  // uniform across the launch
    const long long plane = static_cast<long long>(height) * width;
    // This thread's taps (tap0 + first_tap, + SPLIT, ...; one tap when the chunk
    // has fewer than SPLIT) and channels [first, last) of the block's.
    const int last_chunk = taps - (taps - 1) / chunk_taps * chunk_taps;
    const int slice_parts = max(1, SPLIT / last_chunk);  // the slice layout's: the most parts
    const int parts = max(1, SPLIT / chunk);
    const int part = split % parts, first_tap = split / parts;
    const int part_channels = (rows / chunk + parts - 1) / parts;
    const int first = part * part_channels;
    const int last = min(first + part_channels, rows / chunk);
    const long long slice =
        (static_cast<long long>(group) * channel_blocks + channel_block) * slice_parts + part;
    const long long sample_offsets = 2LL * offset_groups * taps * pixels;
    const long long sample_masks = static_cast<long long>(offset_groups) * taps * pixels;
    real* offset_partial = grad_offset_partial + (slice * samples + px.n) * sample_offsets + px.p;
    real* mask_partial =
        HAS_MASK ? grad_mask_partial + (slice * samples + px.n) * sample_masks + px.p : nullptr;

#pragma unroll 1
    for (int tap_in_chunk = first_tap; tap_in_chunk < chunk; tap_in_chunk += SPLIT) {
        const int tap = tap0 + tap_in_chunk;
        int point_group = -1;
        Point<real> point{};
        real grad_y = 0, grad_x = 0, grad_m = 0;
        // Stores the sums of the offset group just finished: this thread's own slots.
        auto flush = [&]() {
            if (point_group < 0) return;
            const int group_tap = point_group * taps + tap;
            offset_partial[2 * group_tap * pixels] = point.mask * grad_y;
            offset_partial[(2 * group_tap + 1) * pixels] = point.mask * grad_x;
            if (HAS_MASK) mask_partial[group_tap * pixels] = grad_m;
        };
#pragma unroll 1
        for (int m = first; m < last; ++m) {
            const int channel = group * group_channels + c0 + m;
            const int offset_group = cv.offset_group_of(channel);
            if (offset_group != point_group) {
                flush();
                point = locate_point<scalar_t, HAS_MASK>(cv, offset, mask, px, offset_group, tap);
                point_group = offset_group;
                grad_y = grad_x = grad_m = 0;
            }
            const Sample<real>& s = point.s;
            if (!s.in_range) continue;  // B0 = 0 around the point: no gradient
            const long long first_element =
                (static_cast<long long>(px.n) * channels + channel) * plane;
            const scalar_t* in = input + first_element;
            const ScatterAdd<real> grad_in = grad_input_target.shifted(first_element);
            const real g = grad_col[(m * chunk + tap_in_chunk) * STAGE_STRIDE + n];
            const real masked_g = point.mask * g;
            const int inside = first_corner_inside(s);
            real v[4];
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                // Unconditional, as PointTable's; a corner outside the map has weight 0.
                const real corner_value = to_acc(in[s.corner[q] >= 0 ? s.corner[q] : inside]);
                v[q] = s.corner[q] >= 0 ? corner_value : real(0);
                if (scatter && s.weight[q] != 0 && masked_g != 0)
                    grad_in.add(s.corner[q], s.weight[q] * masked_g);
            }
            const real hy = 1 - s.ly, hx = 1 - s.lx;
            grad_y += g * (hx * (v[2] - v[0]) + s.lx * (v[3] - v[1]));
            grad_x += g * (hy * (v[1] - v[0]) + s.ly * (v[3] - v[2]));
            if (HAS_MASK)
                grad_m += g * (s.weight[0] * v[0] + s.weight[1] * v[1] + s.weight[2] * v[2] +
                               s.weight[3] * v[3]);
        }
        flush();
    }
}
