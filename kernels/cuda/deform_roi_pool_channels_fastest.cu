// The channels-fastest design of roi_align, deform_roi_pool and
// modulated_deform_roi_pool (docs/kernels/roi_pool.md, "Channels fastest"):
// the same operators as deform_roi_pool.cu, whose bin geometry and sampling
// rule B1 (bin_geometry, locate) this file includes rather than copies, so the
// two designs cannot drift apart.
//
// The lanes of a warp are 32 consecutive channels of one bin: they share the
// bin's geometry, and their corner gathers read the features from an NHWC
// staging of the input (transpose_rows_and_columns, a separate pass whose
// traffic the counters see), where the 32 channels of a pixel are contiguous:
// one coalesced request per corner instead of one cache line per lane.
//
// A block owns (RoI k, 32 channels, a tile of up to ROI_POOL_BIN_TILE bins:
// channels_last::BlockTile), its warps taking the tile's bins in turn. Forward: the bins' values collect
// in a shared-memory tile [channel][bin] and are stored once the block is
// done, along the bins, where the output [K, C, pooled_h, pooled_w] is
// contiguous. Backward: grad_output comes in the same way (coalesced loads
// into the tile), the warp scatters grad_input with lanes over channels into
// an NHWC accumulator (coalesced atomics; the host transposes it back), and
// reduces the offset / mask gradients over its 32 channels by shuffles: one
// partial sum per (RoI, channel chunk, bin), written by lane 0, the host sums
// the chunks (the pw-fastest design's slices).
//
// SAMPLING = 1 or 2: sampling_ratio as a compile-time constant (a row's
// samples unroll); 0: any other value, the adaptive grid included (runtime).

#include "deform_roi_pool.cu"
#include "channels_last.cuh"

#ifndef ROI_POOL_BIN_TILE
#error "compile with -DROI_POOL_BIN_TILE=<bins per block> (kernels/ops/deform_roi_pool.py sets it)"
#endif

namespace {

using Tile = channels_last::BlockTile<ROI_POOL_BLOCK_SIZE, ROI_POOL_BIN_TILE>;
constexpr int WARP = Tile::WARP;
constexpr int WARPS = Tile::WARPS;

// visit(sample) for each sample of the bin (in_range or not), row by row:
// rows of SAMPLING samples unrolled when specialised (the rows are not: with
// all 2 x 2 samples in flight the float32 instantiations spilled at 64
// registers), else the geometry's grid in loops that do not unroll (unrolling
// a runtime trip count cost registers and spills for no fewer loads).
template <int SAMPLING, typename accum_t, typename Visit>
__device__ __forceinline__ void for_each_sample(const BinGeometry<accum_t>& g, int height,
                                                int width, Visit&& visit) {
    const auto at = [&](int iy, int ix) {
        return locate(g.first_y + (static_cast<accum_t>(iy) + accum_t(0.5)) * g.step_y,
                      g.first_x + (static_cast<accum_t>(ix) + accum_t(0.5)) * g.step_x, height,
                      width);
    };
    if constexpr (SAMPLING > 0) {
#pragma unroll 1
        for (int iy = 0; iy < SAMPLING; ++iy)
#pragma unroll
            for (int ix = 0; ix < SAMPLING; ++ix) visit(at(iy, ix));
    } else {
#pragma unroll 1
        for (int iy = 0; iy < g.grid_h; ++iy)
#pragma unroll 1
            for (int ix = 0; ix < g.grid_w; ++ix) visit(at(iy, ix));
    }
}

// Resident blocks per SM the kernels ask ptxas for: the forward at most 64
// registers (50 % occupancy), the backward 85 (at 64 its float offset-and-mask
// instantiation spilled); 128 for double (docs/kernels/roi_pool.md).
template <typename scalar_t>
constexpr int FORWARD_MIN_BLOCKS_CF = 4;
template <>
constexpr int FORWARD_MIN_BLOCKS_CF<double> = 2;
template <typename scalar_t>
constexpr int BACKWARD_MIN_BLOCKS_CF = 3;
template <>
constexpr int BACKWARD_MIN_BLOCKS_CF<double> = 2;

template <typename accum_t>
__device__ __forceinline__ accum_t warp_sum(accum_t value) {
#pragma unroll
    for (int step = WARP / 2; step > 0; step /= 2)
        value += __shfl_xor_sync(0xffffffffu, value, step);
    return value;
}

}  // namespace

// output[k, c, ph, pw] as deform_roi_pool_forward computes it, from
// input_nhwc[n, y, x, c] = input[n, c, y, x]. Every element is written.
template <typename scalar_t, bool HAS_OFFSET, bool HAS_MASK, int SAMPLING>
__global__ void __launch_bounds__(ROI_POOL_BLOCK_SIZE, FORWARD_MIN_BLOCKS_CF<scalar_t>)
deform_roi_pool_channels_fastest_forward(
        const scalar_t* __restrict__ input_nhwc,   // [N, H, W, C]
        const acc_t<scalar_t>* __restrict__ rois,  // [K, 5]
        const scalar_t* __restrict__ offset,       // [K, 2, pooled_h, pooled_w]; unread without HAS_OFFSET
        const scalar_t* __restrict__ mask,         // [K, 1, pooled_h, pooled_w]; unread without HAS_MASK
        scalar_t* __restrict__ output,             // [K, C, pooled_h, pooled_w]
        int batch, int channels, int height, int width, int pooled_h, int pooled_w,
        acc_t<scalar_t> spatial_scale, int sampling_ratio, acc_t<scalar_t> gamma, int aligned) {
    using accum_t = acc_t<scalar_t>;
    // +1: a warp writing one bin of its 32 channels hits 32 banks.
    __shared__ accum_t tile[WARP][ROI_POOL_BIN_TILE + 1];
    const int bins = pooled_h * pooled_w;
    const Tile t(bins);
    const int lane = threadIdx.x % WARP;
    const int c = t.channel_begin + lane;
    const bool live = c < channels;
#pragma unroll 1
    for (int local = threadIdx.x / WARP; local < t.bin_count; local += WARPS) {
        const int bin = t.bin_begin + local;
        const BinIndex b{t.k, 0, bin / pooled_w, bin % pooled_w};
        const BinGeometry<accum_t> g = bin_geometry<scalar_t, HAS_OFFSET>(
            rois, offset, b, batch, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma,
            aligned != 0);
        accum_t sum = 0;
        if (g.n >= 0 && live) {
            const scalar_t* image =
                input_nhwc + static_cast<long long>(g.n) * height * width * channels + c;
            for_each_sample<SAMPLING>(g, height, width, [&](const Sample<accum_t>& s) {
                if (!s.in_range) return;
                for (int q = 0; q < 4; ++q)
                    sum += s.weight[q] * to_acc(image[static_cast<long long>(s.corner(q)) * channels]);
            });
        }
        accum_t value = sum * g.inv_count;
        if (HAS_MASK) value *= to_acc(mask[static_cast<long long>(t.k) * bins + bin]);
        tile[lane][local] = value;
    }
    __syncthreads();
    t.store(tile, output + (static_cast<long long>(t.k) * channels + t.channel_begin) * bins,
            min(WARP, channels - t.channel_begin), bins);
}

// Backward of deform_roi_pool_channels_fastest_forward, the gradients of
// deform_roi_pool_backward:
//  - grad_input_nhwc[n, y, x, c] += grad_output * mask * weight / count at each
//    corner (acc_t atomics, or fixed-point ones into grad_input_fixed, NHWC as
//    well; zero-filled by the host, both null: no scatter);
//  - grad_offset_partial[k, chunk, 0 / 1, ph, pw], grad_mask_partial[k, chunk,
//    0, ph, pw]: the sums over the chunk's 32 channels, as
//    deform_roi_pool_backward's slices; null: not computed (and input_nhwc,
//    then unread, may be null).
template <typename scalar_t, bool HAS_OFFSET, bool HAS_MASK, int SAMPLING>
__global__ void __launch_bounds__(ROI_POOL_BLOCK_SIZE, BACKWARD_MIN_BLOCKS_CF<scalar_t>)
deform_roi_pool_channels_fastest_backward(
        const scalar_t* __restrict__ input_nhwc,        // [N, H, W, C]; or null
        const acc_t<scalar_t>* __restrict__ rois,       // [K, 5]
        const scalar_t* __restrict__ offset,            // [K, 2, pooled_h, pooled_w]; unread without HAS_OFFSET
        const scalar_t* __restrict__ mask,              // [K, 1, pooled_h, pooled_w]; unread without HAS_MASK
        const scalar_t* __restrict__ grad_output,       // [K, C, pooled_h, pooled_w]
        acc_t<scalar_t>* __restrict__ grad_input_nhwc,  // [N, H, W, C], accumulated; or null
        long long* __restrict__ grad_input_fixed,       // [N, H, W, C], fixed point; or null
        double fixed_scale, int* __restrict__ fixed_status,
        acc_t<scalar_t>* __restrict__ grad_offset_partial,  // [K, chunks, 2, pooled_h, pooled_w]; or null
        acc_t<scalar_t>* __restrict__ grad_mask_partial,    // [K, chunks, 1, pooled_h, pooled_w]; or null
        int batch, int channels, int height, int width, int pooled_h, int pooled_w,
        acc_t<scalar_t> spatial_scale, int sampling_ratio, acc_t<scalar_t> gamma, int aligned) {
    using accum_t = acc_t<scalar_t>;
    __shared__ accum_t tile[WARP][ROI_POOL_BIN_TILE + 1];
    const int bins = pooled_h * pooled_w;
    const Tile t(bins);
    const int chunks = (channels + WARP - 1) / WARP;
    t.load(tile, grad_output + (static_cast<long long>(t.k) * channels + t.channel_begin) * bins,
           min(WARP, channels - t.channel_begin), bins);
    __syncthreads();

    const ScatterAdd<accum_t> grad_in{grad_input_nhwc, grad_input_fixed, fixed_scale,
                                      fixed_status};
    // Uniform across the launch.
    const bool scatter = grad_in.enabled();
    const bool want_offset = HAS_OFFSET && grad_offset_partial != nullptr;
    const bool want_mask = HAS_MASK && grad_mask_partial != nullptr;
    const bool read_values = want_offset || want_mask;
    const int lane = threadIdx.x % WARP;
    const int c = t.channel_begin + lane;
    const bool live = c < channels;
#pragma unroll 1
    for (int local = threadIdx.x / WARP; local < t.bin_count; local += WARPS) {
        const int bin = t.bin_begin + local;
        const BinIndex b{t.k, 0, bin / pooled_w, bin % pooled_w};
        const BinGeometry<accum_t> g = bin_geometry<scalar_t, HAS_OFFSET>(
            rois, offset, b, batch, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma,
            aligned != 0);
        const accum_t m =
            HAS_MASK ? to_acc(mask[static_cast<long long>(t.k) * bins + bin]) : accum_t(1);
        // Dead lanes (past the last channel) carry 0: no scatter, nothing to the sums.
        const accum_t go = live ? tile[lane][local] : accum_t(0);
        const accum_t scaled = go * m * g.inv_count;
        accum_t grad_y = 0, grad_x = 0, grad_m = 0;
        if (g.n >= 0 && live) {
            const long long image = static_cast<long long>(g.n) * height * width * channels + c;
            for_each_sample<SAMPLING>(g, height, width, [&](const Sample<accum_t>& s) {
                if (!s.in_range) return;
                if (scatter && scaled != accum_t(0))
                    for (int q = 0; q < 4; ++q)
                        if (s.weight[q] != accum_t(0))
                            grad_in.add(image + static_cast<long long>(s.corner(q)) * channels,
                                        s.weight[q] * scaled);
                if (!read_values) return;
                const accum_t hy = accum_t(1) - s.ly, hx = accum_t(1) - s.lx;
                accum_t v[4];
                for (int q = 0; q < 4; ++q)
                    v[q] = to_acc(input_nhwc[image + static_cast<long long>(s.corner(q)) * channels]);
                if (want_offset) {
                    if (s.live_y) grad_y += go * (hx * (v[2] - v[0]) + s.lx * (v[3] - v[1]));
                    if (s.live_x) grad_x += go * (hy * (v[1] - v[0]) + s.ly * (v[3] - v[2]));
                }
                if (want_mask)
                    grad_m += go * (s.weight[0] * v[0] + s.weight[1] * v[1] + s.weight[2] * v[2] +
                                    s.weight[3] * v[3]);
            });
        }
        // Every lane of the warp takes part in the shuffles (uniform branches).
        const long long partial = static_cast<long long>(t.k) * chunks + t.chunk;  // [k, chunk]
        if (want_offset) {
            grad_x = warp_sum(grad_x);
            grad_y = warp_sum(grad_y);
            if (lane == 0) {
                accum_t* out = grad_offset_partial + partial * 2 * bins + bin;
                const accum_t scale = m * g.inv_count * gamma;
                out[0] = grad_x * scale * g.roi_w;
                out[bins] = grad_y * scale * g.roi_h;
            }
        }
        if (want_mask) {
            grad_m = warp_sum(grad_m);
            if (lane == 0) grad_mask_partial[partial * bins + bin] = grad_m * g.inv_count;
        }
    }
}
