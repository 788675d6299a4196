// What the channels-fastest RoI pools share: their block's tile of bins
// (BlockTile) and the staging transpose, in [B, R, S, P] ->
// out [B, P, S, R], through a 32 x 32 tile of shared memory so that both the
// loads (along P) and the stores (along R) are coalesced. NCHW -> NHWC is
// R = C, S = 1, P = H*W; the position-sensitive staging of
// deform_psroi_pool_channels_fastest.cu is R = output_dim, S = group_size^2;
// the way back (a gradient) swaps R and P. The element type may change on the
// way (a float32 gradient accumulator to the input's dtype).
//
// The flat block index covers (b, s, tile of R, tile of P), P's tiles fastest:
// all 32-bit, like the kernels; element offsets are long long.

#ifndef DCNBENCH_CHANNELS_LAST_CUH
#define DCNBENCH_CHANNELS_LAST_CUH

#include "scalar_conversions.cuh"

#ifndef TRANSPOSE_BLOCK_SIZE
#error "compile with -DTRANSPOSE_BLOCK_SIZE=<threads per block> (kernels/ops/deform_roi_pool.py sets it)"
#endif

namespace channels_last {

constexpr int TILE = 32;  // a warp's width
constexpr int ROWS_PER_PASS = TRANSPOSE_BLOCK_SIZE / TILE;
static_assert(TRANSPOSE_BLOCK_SIZE % TILE == 0 && ROWS_PER_PASS <= TILE,
              "the transpose's block is whole warps, at most one per tile row");

}  // namespace channels_last

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(TRANSPOSE_BLOCK_SIZE)
transpose_rows_and_columns(const in_t* __restrict__ in,  // [batch, rows, middle, columns]
                           out_t* __restrict__ out,      // [batch, columns, middle, rows]
                           int batch, int rows, int middle, int columns) {
    using channels_last::ROWS_PER_PASS;
    using channels_last::TILE;
    // +1: a column of the tile falls into 32 different banks.
    __shared__ in_t tile[TILE][TILE + 1];
    const int column_tiles = (columns + TILE - 1) / TILE;
    const int row_tiles = (rows + TILE - 1) / TILE;
    const int tile_column = blockIdx.x % column_tiles;
    const int rest = blockIdx.x / column_tiles;
    const int tile_row = rest % row_tiles;
    const int plane = rest / row_tiles;  // b * middle + s
    const int s = plane % middle, b = plane / middle;
    const int lane = threadIdx.x % TILE, pass = threadIdx.x / TILE;

    const int column = tile_column * TILE + lane;
    for (int i = pass; i < TILE; i += ROWS_PER_PASS) {
        const int row = tile_row * TILE + i;
        if (row < rows && column < columns)
            tile[i][lane] =
                in[((static_cast<long long>(b) * rows + row) * middle + s) * columns + column];
    }
    __syncthreads();
    const int row = tile_row * TILE + lane;
    for (int i = pass; i < TILE; i += ROWS_PER_PASS) {
        const int out_column = tile_column * TILE + i;
        if (row < rows && out_column < columns)
            out[((static_cast<long long>(b) * columns + out_column) * middle + s) * rows + row] =
                from_acc<out_t>(to_acc(tile[lane][i]));
    }
}

namespace channels_last {

// The block of a channels-fastest RoI pool (deform_roi_pool_channels_fastest.cu,
// deform_psroi_pool_channels_fastest.cu): RoI k (blockIdx.y), the channels
// [channel_begin, channel_begin + 32) of chunk `chunk`, the bins
// [bin_begin, bin_begin + bin_count); the flat blockIdx.x covers (channel
// chunk, tile of BIN_TILE bins), bin tiles fastest. Its warps take the bins in
// turn; the values of a [32][BIN_TILE + 1] shared-memory tile go to / come
// from global memory along the bins, where a [K, C, bins] tensor is
// contiguous (and so are consecutive channels' when the tile holds all bins).
template <int BLOCK, int BIN_TILE>
struct BlockTile {
    static constexpr int WARP = 32;
    static constexpr int WARPS = BLOCK / WARP;
    static_assert(BLOCK % WARP == 0, "the block is whole warps");

    int k, chunk, channel_begin, bin_begin, bin_count;

    __device__ __forceinline__ explicit BlockTile(int bins) {
        const int bin_tiles = (bins + BIN_TILE - 1) / BIN_TILE;
        k = blockIdx.y;
        chunk = blockIdx.x / bin_tiles;
        channel_begin = chunk * WARP;
        bin_begin = blockIdx.x % bin_tiles * BIN_TILE;
        bin_count = min(BIN_TILE, bins - bin_begin);
    }

    // out[c * bins + bin_begin + local] = tile[c][local] for the block's
    // `channels` channels; `out` points at its first channel's bin 0.
    template <typename accum_t, typename scalar_t>
    __device__ __forceinline__ void store(const accum_t (&tile)[WARP][BIN_TILE + 1],
                                          scalar_t* __restrict__ out, int channels,
                                          int bins) const {
#pragma unroll 1
        for (int i = threadIdx.x; i < channels * bin_count; i += BLOCK) {
            const int channel = i / bin_count, local = i % bin_count;
            out[static_cast<long long>(channel) * bins + bin_begin + local] =
                from_acc<scalar_t>(tile[channel][local]);
        }
    }

    // The way in: tile[c][local] = in[c * bins + bin_begin + local].
    template <typename accum_t, typename scalar_t>
    __device__ __forceinline__ void load(accum_t (&tile)[WARP][BIN_TILE + 1],
                                         const scalar_t* __restrict__ in, int channels,
                                         int bins) const {
#pragma unroll 1
        for (int i = threadIdx.x; i < channels * bin_count; i += BLOCK) {
            const int channel = i / bin_count, local = i % bin_count;
            tile[channel][local] = to_acc(in[static_cast<long long>(channel) * bins + bin_begin + local]);
        }
    }
};

}  // namespace channels_last

#endif  // DCNBENCH_CHANNELS_LAST_CUH
