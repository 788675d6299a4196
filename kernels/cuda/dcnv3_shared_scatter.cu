// DCNv3 / DCNv4 backward, the shared-scatter design (the forward is the
// vectorized design's). Semantics: shared/ops-semantics.md; layouts and
// sampling: dcnv3_common.cuh; design and counters: docs/kernels/dcnv3.md.
//
// Why: the vectorized backward issues one global atomic per (output pixel,
// tap, corner, vector), so its grad_input traffic is about 36 atomic sectors
// per output pixel and group (D = 16, float32) for a tensor that needs 2.
// Here a block owns one (image, group) and a tile of tile_h x tile_w output
// pixels, and keeps the grad_input of the input region those pixels' taps
// reach -- region_h x region_w pixels of the group's D channels, the
// undeformed taps' window plus `halo` pixels on each side, clamped into the
// image -- in shared memory. Every corner inside the region is a shared
// atomic; a corner outside it (an offset larger than the halo) falls back to
// the global atomic the vectorized design issues. After a barrier the
// region is added to grad_input once, coalesced (consecutive threads,
// consecutive 16 bytes of a pixel's D channels), an all-zero vector skipped.
// Regions of neighbouring tiles overlap by the halo, so the flush stays an
// atomic add.
//
// The shared tile keeps grad_input's arithmetic: float32 (double for float64)
// shared atomics, or, with grad_input_fixed, the fixed-point int64 sums of
// deterministic_atomics.cuh (integer adds: the partial sums, and so the
// result, do not depend on the order; the flush adds them as integers).
// region_h = region_w = 0 (the host found no tile that fits the shared
// memory: a large D) sends every corner to the global atomics.
//
// Within the tile the work is the vectorized backward's: an item is one
// output pixel, L = min(next power of two of D / VEC, 32) lanes own it, a
// block runs DCNV3_BLOCK_SIZE / L items at a time over the tile's pixels; per
// tap each lane forms the four channel sums, an xor-shuffle butterfly gives
// the totals, lane 0 writes grad_offset / grad_mask once. Lanes of items past
// the tile or the map run the tap loop without loading anything, so every
// shuffle sees the whole warp and every thread reaches both barriers.

#include "channel_vectors.cuh"
#include "dcnv3_common.cuh"

#ifndef DCNV3_BLOCK_SIZE
#error "compile with -DDCNV3_BLOCK_SIZE=<threads per block> (kernels/ops/dcnv3.py sets it)"
#endif

namespace {

// A block's share: image n, group, the tile's first output pixel and the
// input pixel at the region's (0, 0). Blocks run group fastest, then the
// tiles of a row, then rows, then images.
struct Tile {
    long long n;
    int group, ho0, wo0, origin_y, origin_x;
};

__device__ __forceinline__ Tile tile_of(const dcnv3::Geometry& g, int tile_h, int tile_w,
                                        int region_h, int region_w, int halo) {
    const int tiles_x = (g.out_w + tile_w - 1) / tile_w;
    const int tiles_y = (g.out_h + tile_h - 1) / tile_h;
    long long block = blockIdx.x;
    Tile t;
    t.group = static_cast<int>(block % g.group);
    block /= g.group;
    t.wo0 = static_cast<int>(block % tiles_x) * tile_w;
    block /= tiles_x;
    t.ho0 = static_cast<int>(block % tiles_y) * tile_h;
    t.n = block / tiles_y;
    // The undeformed taps of the tile start at ho0 * stride - pad; the region
    // starts `halo` before and stays inside the image.
    t.origin_y = min(max(t.ho0 * g.stride_h - g.pad_h - halo, 0), max(g.height - region_h, 0));
    t.origin_x = min(max(t.wo0 * g.stride_w - g.pad_w - halo, 0), max(g.width - region_w, 0));
    return t;
}

// Adds the region's sums (`sums`, [region_h, region_w, D]) to grad_input
// (`to`, shifted to the block's image and group), VEC channels per thread and
// step, consecutive threads on consecutive vectors; all-zero vectors skipped.
template <int VEC, typename real>
__device__ __forceinline__ void flush_region(const real* sums, const ScatterAdd<real>& to,
                                             const dcnv3::Geometry& g, const Tile& t,
                                             int region_h, int region_w) {
    const int D = g.group_channels;
    const int per_pixel = D / VEC;
    const int vectors = region_h * region_w * per_pixel;
    for (int v = threadIdx.x; v < vectors; v += DCNV3_BLOCK_SIZE) {
        const int pixel = v / per_pixel, channel = v % per_pixel * VEC;
        real value[VEC];
        bool any = false;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            value[k] = sums[pixel * D + channel + k];
            any |= value[k] != 0;
        }
        if (!any) continue;
        const long long at = (static_cast<long long>(t.origin_y + pixel / region_w) * g.width +
                              t.origin_x + pixel % region_w) *
                                 g.channels() +
                             channel;
        scatter_vector<VEC>(to, at, static_cast<real>(1), value);
    }
}

// The same for the fixed-point sums: one integer add per channel.
__device__ __forceinline__ void flush_fixed_region(const long long* sums, long long* to,
                                                   int* status, const dcnv3::Geometry& g,
                                                   const Tile& t, int region_h, int region_w) {
    const int D = g.group_channels;
    const int elements = region_h * region_w * D;
    for (int e = threadIdx.x; e < elements; e += DCNV3_BLOCK_SIZE) {
        if (sums[e] == 0) continue;
        const int pixel = e / D;
        const long long at = (static_cast<long long>(t.origin_y + pixel / region_w) * g.width +
                              t.origin_x + pixel % region_w) *
                                 g.channels() +
                             e % D;
        fixed_point_add_sum(to + at, sums[e], status);
    }
}

// dcnv3::add_vector_tap_gradient's scatter: a corner inside the region to its
// shared sums, one outside to grad_input's atomics.
template <int VEC, typename real>
struct RegionScatter {
    ScatterAdd<real> region, global;
    int origin_y, origin_x, region_h, region_w, group_channels;
    __device__ __forceinline__ void operator()(const dcnv3::Sample<real>& s, int q, long long at,
                                               int vector, real w,
                                               const real (&grad)[VEC]) const {
        const int ry = s.y0 + (q >> 1) - origin_y;
        const int rx = s.x0 + (q & 1) - origin_x;
        if (ry >= 0 && ry < region_h && rx >= 0 && rx < region_w) {
            const int local = (ry * region_w + rx) * group_channels + vector * VEC;
#pragma unroll
            for (int k = 0; k < VEC; ++k) region.add(local + k, w * grad[k]);
        } else {
            scatter_vector<VEC>(global, at, w, grad);
        }
    }
};

}  // namespace

// Gradients of dcnv3_vectorized_forward; the arguments of
// dcnv3_vectorized_backward, then the tile: tile_h x tile_w output pixels per
// block, a region_h x region_w shared grad_input region (dynamic shared
// memory: region_h * region_w * D elements of acc_t<scalar_t>, or of int64
// with grad_input_fixed) starting `halo` pixels before the tile's taps.
// At least 3 blocks per SM (<= 85 registers) for the 16-byte vectors, as the
// vectorized backward; 2 for the scalar path (VEC = 1, float64 included),
// which spilled at 80 registers (the fallback and the flush are on top of the
// vectorized backward's work).
template <typename scalar_t, int MODULATION, int VEC>
__global__ void __launch_bounds__(DCNV3_BLOCK_SIZE, VEC == 1 ? 2 : 3)
dcnv3_shared_scatter_backward(const scalar_t* __restrict__ input,        // [N, H, W, G*D]
                              const scalar_t* __restrict__ offset,
                              const scalar_t* __restrict__ mask,
                              const scalar_t* __restrict__ grad_output,  // [N, H_out, W_out, G*D]
                              acc_t<scalar_t>* __restrict__ grad_input,  // [N, H, W, G*D] or null
                              long long* __restrict__ grad_input_fixed,  // the same in fixed point, or null
                              double fixed_scale, int* __restrict__ fixed_status,
                              acc_t<scalar_t>* grad_offset,
                              acc_t<scalar_t>* grad_mask,
                              int tile_h, int tile_w, int region_h, int region_w, int halo,
                              DCNV3_GEOMETRY_PARAMS) {
    using real = acc_t<scalar_t>;
    const dcnv3::Geometry g = DCNV3_GEOMETRY;
    const dcnv3::Layout<MODULATION> layout(g);
    const Tile t = tile_of(g, tile_h, tile_w, region_h, region_w, halo);
    const int P = g.taps();
    const int C = g.channels();
    const long long channel0 =
        t.n * g.height * static_cast<long long>(g.width) * C + t.group * g.group_channels;
    const scalar_t* in = input + channel0;
    const ScatterAdd<real> grad_in =
        ScatterAdd<real>{grad_input, grad_input_fixed, fixed_scale, fixed_status}.shifted(
            channel0);
    const bool scatter = grad_in.enabled();  // uniform across the launch
    const bool fixed = grad_in.fixed != nullptr;
    // The region's grad_input, [region_h, region_w, D], in grad_in's arithmetic.
    extern __shared__ long long region_sums[];
    real* const region_values = reinterpret_cast<real*>(region_sums);
    const ScatterAdd<real> region{fixed ? nullptr : region_values,
                                  fixed ? region_sums : nullptr, fixed_scale, fixed_status};
    const int region_elements = scatter ? region_h * region_w * g.group_channels : 0;
    for (int e = threadIdx.x; e < region_elements; e += DCNV3_BLOCK_SIZE) {
        if (fixed)
            region_sums[e] = 0;
        else
            region_values[e] = 0;
    }
    __syncthreads();

    const int vectors = g.group_channels / VEC;
    const int lanes = lanes_for(vectors);
    const int lane = threadIdx.x % lanes;
    const int tile_pixels = tile_h * tile_w;
    for (int first = 0; first < tile_pixels; first += DCNV3_BLOCK_SIZE / lanes) {
        const int i = first + static_cast<int>(threadIdx.x) / lanes;
        const int ho = t.ho0 + i / tile_w, wo = t.wo0 + i % tile_w;
        const bool active = i < tile_pixels && ho < g.out_h && wo < g.out_w;
        const long long pixel = active ? (t.n * g.out_h + ho) * g.out_w + wo : 0;
        const scalar_t* grad_out = grad_output + pixel * C + t.group * g.group_channels;
        const dcnv3::Softmax<real> softmax =
            active ? dcnv3::softmax_of<MODULATION>(mask, layout.mask_index(pixel, t.group, 0), P)
                   : dcnv3::Softmax<real>{0.f, 1.f};
        for (int p = 0; p < P; ++p) {
            real d_x = 0.f, d_y = 0.f, d_m = 0.f, m = 0.f;
            const long long o = layout.offset_index(pixel, t.group, p);
            if (active) {
                const dcnv3::Sample<real> s =
                    dcnv3::locate(g, dcnv3::tap_of(g, ho, wo, p), to_acc(offset[o]),
                                  to_acc(offset[o + 1]));
                m = dcnv3::modulation<MODULATION>(
                    to_acc(mask[layout.mask_index(pixel, t.group, p)]), softmax);
                if (s.in_range)
                    dcnv3::add_vector_tap_gradient<scalar_t, VEC>(
                        s, m, in, grad_out, C, lane, lanes, vectors, scatter,
                        RegionScatter<VEC, real>{region, grad_in, t.origin_y, t.origin_x,
                                                 region_h, region_w, g.group_channels},
                        d_x, d_y, d_m);
            }
            d_x = sum_over_lanes(d_x, lanes);
            d_y = sum_over_lanes(d_y, lanes);
            d_m = sum_over_lanes(d_m, lanes);
            if (active && lane == 0) {
                const real scale = m * g.offset_scale;
                grad_offset[o] = scale * d_x;
                grad_offset[o + 1] = scale * d_y;
                grad_mask[layout.mask_index(pixel, t.group, p)] = d_m;
            }
        }
        if (active && lane == 0)
            dcnv3::finish_mask_gradient<MODULATION>(
                grad_mask, mask, layout.mask_index(pixel, t.group, 0), P, softmax);
    }

    __syncthreads();
    if (!scatter) return;
    if (fixed)
        flush_fixed_region(region_sums, grad_in.fixed, fixed_status, g, t, region_h, region_w);
    else if (g.group_channels % 4 == 0)
        flush_region<4>(region_values, grad_in, g, t, region_h, region_w);
    else
        flush_region<1>(region_values, grad_in, g, t, region_h, region_w);
}
