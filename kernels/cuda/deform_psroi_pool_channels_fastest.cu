// The channels-fastest design of deform_psroi_pool (docs/kernels/roi_pool.md,
// "The channels-fastest design"): the operator of deform_psroi_pool.cu, whose
// bin geometry and sampling rule B2 (bin_geometry, counted, locate) this file
// includes rather than copies.
//
// The lanes of a warp are 32 consecutive output channels (ctop) of one bin.
// Output channel ctop at bin (ph, pw) reads input channel
// (ctop * group_size + gh) * group_size + gw: for a fixed bin, consecutive
// ctop are group_size^2 planes apart. The staging therefore puts the output
// channels innermost: staged[n, y, x, gh * group_size + gw, ctop]
// (transpose_rows_and_columns of [N, output_dim, group_size^2, H*W]), where a
// bin's lanes read 32 neighbouring values of one pixel. Lanes of one class
// share its trans cell, so its sample positions; lanes of different classes
// (num_classes > 1) sample at their own positions and gather apart.
//
// Blocks and tiles as in deform_roi_pool_channels_fastest.cu. Backward:
// grad_input accumulates in the staged layout (the host transposes it back);
// grad_trans: each lane writes its output channel's sums into
// grad_trans_partial[k, 0 / 1, ph, pw, ctop] (coalesced along ctop), the host
// sums the channels of each class, then the bins of each part cell.

#include "deform_psroi_pool.cu"
#include "channels_last.cuh"

#ifndef PSROI_POOL_BIN_TILE
#error "compile with -DPSROI_POOL_BIN_TILE=<bins per block> (kernels/ops/deform_psroi_pool.py sets it)"
#endif

namespace {

using Tile = channels_last::BlockTile<PSROI_POOL_BLOCK_SIZE, PSROI_POOL_BIN_TILE>;

// Where output channel ctop of bin (ph, pw) reads: the staged pixel's
// (group cell, ctop) offset.
template <typename accum_t>
__device__ __forceinline__ int staged_channel(const Shape<accum_t>& s, int ctop, int ph, int pw) {
    const int gh = min(max(ph * s.group_size / s.pooled_size, 0), s.group_size - 1);
    const int gw = min(max(pw * s.group_size / s.pooled_size, 0), s.group_size - 1);
    return (gh * s.group_size + gw) * s.output_dim + ctop;
}

}  // namespace

// output[k, ctop, ph, pw] as deform_psroi_pool_forward computes it, from
// staged[n, y, x, g, ctop] = input[n, ctop * group_size^2 + g, y, x].
template <typename scalar_t, bool HAS_TRANS>
__global__ void __launch_bounds__(PSROI_POOL_BLOCK_SIZE)
deform_psroi_pool_channels_fastest_forward(
        const scalar_t* __restrict__ staged,       // [N, H, W, group_size^2, output_dim]
        const acc_t<scalar_t>* __restrict__ rois,  // [K, 5]
        const scalar_t* __restrict__ trans,        // [K, 2 * num_classes, part_size, part_size]; unread without HAS_TRANS
        scalar_t* __restrict__ output,             // [K, output_dim, pooled_size, pooled_size]
        int batch, int channels, int height, int width, int output_dim, int group_size,
        int pooled_size, int part_size, int sample_per_part, int num_classes,
        acc_t<scalar_t> spatial_scale, acc_t<scalar_t> trans_std) {
    using accum_t = acc_t<scalar_t>;
    const Shape<accum_t> s{batch,       channels,   height,      width,
                           output_dim,  group_size, pooled_size, part_size,
                           sample_per_part, num_classes, spatial_scale, trans_std};
    __shared__ accum_t tile[Tile::WARP][PSROI_POOL_BIN_TILE + 1];
    const int bins = pooled_size * pooled_size;
    const Tile t(bins);
    const int lane = threadIdx.x % Tile::WARP;
    const int ctop = t.channel_begin + lane;
    const bool live = ctop < output_dim;
    const int class_id = live ? ctop / (output_dim / num_classes) : 0;
    const long long pixel_stride = static_cast<long long>(group_size) * group_size * output_dim;
#pragma unroll 1
    for (int local = threadIdx.x / Tile::WARP; local < t.bin_count; local += Tile::WARPS) {
        const int bin = t.bin_begin + local;
        const int ph = bin / pooled_size, pw = bin % pooled_size;
        accum_t sum = accum_t(0);
        int count = 0;
        if (live) {
            const BinGeometry<accum_t> g =
                bin_geometry<scalar_t, HAS_TRANS>(rois, trans, s, t.k, class_id, ph, pw);
            if (g.n >= 0) {
                const scalar_t* image = staged +
                                        static_cast<long long>(g.n) * height * width * pixel_stride +
                                        staged_channel(s, ctop, ph, pw);
#pragma unroll 1
                for (int ih = 0; ih < sample_per_part; ++ih) {
                    const accum_t y = g.first_y + static_cast<accum_t>(ih) * g.sub_h;
#pragma unroll 1
                    for (int iw = 0; iw < sample_per_part; ++iw) {
                        const accum_t x = g.first_x + static_cast<accum_t>(iw) * g.sub_w;
                        if (!counted(y, x, s)) continue;
                        const Sample<accum_t> p = locate(y, x, s);
                        for (int q = 0; q < 4; ++q)
                            if (p.weight[q] != accum_t(0))
                                sum += p.weight[q] * to_acc(image[p.corner[q] * pixel_stride]);
                        ++count;
                    }
                }
            }
        }
        tile[lane][local] = count > 0 ? sum / static_cast<accum_t>(count) : accum_t(0);
    }
    __syncthreads();
    t.store(tile, output + (static_cast<long long>(t.k) * output_dim + t.channel_begin) * bins,
            min(Tile::WARP, output_dim - t.channel_begin), bins);
}

// Backward of deform_psroi_pool_channels_fastest_forward, the gradients of
// deform_psroi_pool_backward:
//  - grad_staged[n, y, x, g, ctop] += grad_output / count * weight at each
//    corner (acc_t atomics, or fixed-point ones into grad_staged_fixed; both
//    null: no scatter);
//  - grad_trans_partial[k, 0 / 1, ph, pw, ctop] = trans_std * roi_w / roi_h /
//    count * grad_output * d B2 / d x / d y, summed over the samples; null: not
//    computed (and staged, then unread, may be null).
template <typename scalar_t, bool HAS_TRANS>
__global__ void __launch_bounds__(PSROI_POOL_BLOCK_SIZE, BACKWARD_MIN_BLOCKS<scalar_t>)
deform_psroi_pool_channels_fastest_backward(
        const scalar_t* __restrict__ staged,          // [N, H, W, group_size^2, output_dim]; or null
        const acc_t<scalar_t>* __restrict__ rois,     // [K, 5]
        const scalar_t* __restrict__ trans,           // [K, 2 * num_classes, part_size, part_size]; unread without HAS_TRANS
        const scalar_t* __restrict__ grad_output,     // [K, output_dim, pooled_size, pooled_size]
        acc_t<scalar_t>* __restrict__ grad_staged,    // [N, H, W, group_size^2, output_dim], accumulated; or null
        long long* __restrict__ grad_staged_fixed,    // the same elements, fixed point; or null
        double fixed_scale, int* __restrict__ fixed_status,
        acc_t<scalar_t>* __restrict__ grad_trans_partial,  // [K, 2, pooled_size, pooled_size, output_dim]; or null
        int batch, int channels, int height, int width, int output_dim, int group_size,
        int pooled_size, int part_size, int sample_per_part, int num_classes,
        acc_t<scalar_t> spatial_scale, acc_t<scalar_t> trans_std) {
    using accum_t = acc_t<scalar_t>;
    const Shape<accum_t> s{batch,       channels,   height,      width,
                           output_dim,  group_size, pooled_size, part_size,
                           sample_per_part, num_classes, spatial_scale, trans_std};
    __shared__ accum_t tile[Tile::WARP][PSROI_POOL_BIN_TILE + 1];
    const int bins = pooled_size * pooled_size;
    const Tile t(bins);
    t.load(tile, grad_output + (static_cast<long long>(t.k) * output_dim + t.channel_begin) * bins,
           min(Tile::WARP, output_dim - t.channel_begin), bins);
    __syncthreads();

    const ScatterAdd<accum_t> grad_in{grad_staged, grad_staged_fixed, fixed_scale, fixed_status};
    const bool scatter = grad_in.enabled();  // uniform across the launch
    const bool want_trans = HAS_TRANS && grad_trans_partial != nullptr;
    const int lane = threadIdx.x % Tile::WARP;
    const int ctop = t.channel_begin + lane;
    const bool live = ctop < output_dim;
    const int class_id = live ? ctop / (output_dim / num_classes) : 0;
    const long long pixel_stride = static_cast<long long>(group_size) * group_size * output_dim;
#pragma unroll 1
    for (int local = threadIdx.x / Tile::WARP; local < t.bin_count; local += Tile::WARPS) {
        const int bin = t.bin_begin + local;
        const int ph = bin / pooled_size, pw = bin % pooled_size;
        accum_t grad_y = accum_t(0), grad_x = accum_t(0);
        accum_t roi_h = accum_t(0), roi_w = accum_t(0);
        if (live) {
            const BinGeometry<accum_t> g =
                bin_geometry<scalar_t, HAS_TRANS>(rois, trans, s, t.k, class_id, ph, pw);
            roi_h = g.roi_h;
            roi_w = g.roi_w;
            int count = 0;
            if (g.n >= 0) {
#pragma unroll 1
                for (int ih = 0; ih < sample_per_part; ++ih)
#pragma unroll 1
                    for (int iw = 0; iw < sample_per_part; ++iw)
                        count += counted(g.first_y + static_cast<accum_t>(ih) * g.sub_h,
                                         g.first_x + static_cast<accum_t>(iw) * g.sub_w, s);
            }
            if (count > 0) {
                const accum_t inv_count = accum_t(1) / static_cast<accum_t>(count);
                const accum_t go = tile[lane][local];
                const accum_t scaled = go * inv_count;
                const long long image = static_cast<long long>(g.n) * height * width * pixel_stride +
                                        staged_channel(s, ctop, ph, pw);
#pragma unroll 1
                for (int ih = 0; ih < sample_per_part; ++ih) {
                    const accum_t y = g.first_y + static_cast<accum_t>(ih) * g.sub_h;
#pragma unroll 1
                    for (int iw = 0; iw < sample_per_part; ++iw) {
                        const accum_t x = g.first_x + static_cast<accum_t>(iw) * g.sub_w;
                        if (!counted(y, x, s)) continue;
                        const Sample<accum_t> p = locate(y, x, s);
                        if (scatter && scaled != accum_t(0))
                            for (int q = 0; q < 4; ++q)
                                if (p.weight[q] != accum_t(0))
                                    grad_in.add(image + p.corner[q] * pixel_stride,
                                                p.weight[q] * scaled);
                        if (!want_trans) continue;
                        const accum_t hy = accum_t(1) - p.ly, hx = accum_t(1) - p.lx;
                        accum_t v[4];
                        for (int q = 0; q < 4; ++q) v[q] = to_acc(staged[image + p.corner[q] * pixel_stride]);
                        // A clamped coordinate is an integer: its floor and ceil
                        // corners coincide and its slope comes out 0, as it should.
                        grad_y += go * (hx * (v[2] - v[0]) + p.lx * (v[3] - v[1]));
                        grad_x += go * (hy * (v[1] - v[0]) + p.ly * (v[3] - v[2]));
                    }
                }
                grad_y *= inv_count;
                grad_x *= inv_count;
            }
        }
        if (want_trans && live) {
            accum_t* out = grad_trans_partial +
                           (static_cast<long long>(t.k) * 2 * bins + bin) * output_dim + ctop;
            out[0] = grad_x * trans_std * roi_w;
            out[static_cast<long long>(bins) * output_dim] = grad_y * trans_std * roi_h;
        }
    }
}
