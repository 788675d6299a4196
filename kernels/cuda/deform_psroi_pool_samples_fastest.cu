// The samples-fastest design of deform_psroi_pool (docs/kernels/roi_pool.md,
// "The samples-fastest design"): the operator of deform_psroi_pool.cu, whose
// bin geometry and sampling rule B2 (bin_geometry, input_channel, counted,
// locate) this file includes rather than copies.
//
// The lanes of a warp run over the samples of ONE output element (k, ctop,
// ph, pw): `lanes` of them (a power of two, at most 32: sample_per_part^2 = 16
// gives 16 lanes, two elements a warp), each taking samples lane, lane +
// lanes, ... of the bin, row-major. The samples of a bin are neighbouring
// points of one input plane, so their corner gathers share sectors whatever
// the trans; with per-class trans (Deformable R-FCN: every output channel its
// own class) lanes over channels would gather from 32 unrelated places. The
// bin's sum and count (forward) and its trans gradient (backward) are reduced
// over the lanes with xor shuffles; the element's first lane writes.
//
// Backward: the same mapping. Every lane counts its samples and the count is
// reduced first (B2's divisor); then each lane scatters its samples'
// grad_output / count * weight into grad_input (acc_t atomics, or the
// fixed-point ones of deterministic_atomics.cuh under the determinism flag)
// and sums its d out / d trans, reduced over the lanes and written once per
// (k, ctop, bin) into grad_trans_partial[k, ctop, 0 / 1, ph, pw]: the first
// design's partial sums with one channel a slice, which the host sums over the
// class's channels and the bins of each part cell.
//
// Launch: blockIdx.y the RoI within the chunk, blockIdx.x * (block / lanes) +
// threadIdx.x / lanes the element within the RoI, pw fastest (the output's
// order). Every lane reaches the shuffles: lanes of an element past the end
// are dead, not returned.

#include "deform_psroi_pool.cu"
#include "channel_vectors.cuh"

namespace {

// The element (k, ctop, ph, pw) a group of lanes pools, and the lane's index in it.
template <typename accum_t>
struct Element {
    int item;   // ctop * bins + ph * pooled_size + pw within the RoI
    int lane;   // 0 .. lanes - 1
    bool live;  // item < output_dim * bins
    int ctop, ph, pw, class_id;

    __device__ __forceinline__ Element(const Shape<accum_t>& s, int lanes) {
        const int bins = s.pooled_size * s.pooled_size;
        item = blockIdx.x * (PSROI_POOL_BLOCK_SIZE / lanes) + threadIdx.x / lanes;
        lane = threadIdx.x % lanes;
        live = item < s.output_dim * bins;
        ctop = item / bins;
        ph = item % bins / s.pooled_size;
        pw = item % s.pooled_size;
        class_id = live ? ctop / (s.output_dim / s.num_classes) : 0;
    }
};

// Sample `sample` (row-major) of the bin: its (y, x).
template <typename accum_t>
__device__ __forceinline__ void sample_position(const BinGeometry<accum_t>& g, int sample,
                                                int sample_per_part, accum_t& y, accum_t& x) {
    y = g.first_y + static_cast<accum_t>(sample / sample_per_part) * g.sub_h;
    x = g.first_x + static_cast<accum_t>(sample % sample_per_part) * g.sub_w;
}

}  // namespace

// output[k, ctop, ph, pw] as deform_psroi_pool_forward computes it (the sum
// in another order). `lanes`: lanes per element, a power of two <= 32.
template <typename scalar_t, bool HAS_TRANS>
__global__ void __launch_bounds__(PSROI_POOL_BLOCK_SIZE)
deform_psroi_pool_samples_fastest_forward(
        const scalar_t* __restrict__ input,        // [N, output_dim * group_size^2, H, W]
        const acc_t<scalar_t>* __restrict__ rois,  // [K, 5]
        const scalar_t* __restrict__ trans,        // [K, 2 * num_classes, part_size, part_size]; unread without HAS_TRANS
        scalar_t* __restrict__ output,             // [K, output_dim, pooled_size, pooled_size]
        int batch, int channels, int height, int width, int output_dim, int group_size,
        int pooled_size, int part_size, int sample_per_part, int num_classes,
        acc_t<scalar_t> spatial_scale, acc_t<scalar_t> trans_std, int lanes) {
    using accum_t = acc_t<scalar_t>;
    const Shape<accum_t> s{batch,       channels,   height,      width,
                           output_dim,  group_size, pooled_size, part_size,
                           sample_per_part, num_classes, spatial_scale, trans_std};
    const Element<accum_t> e(s, lanes);
    const int k = blockIdx.y;
    accum_t sum = accum_t(0);
    int count = 0;
    if (e.live) {
        const BinGeometry<accum_t> g =
            bin_geometry<scalar_t, HAS_TRANS>(rois, trans, s, k, e.class_id, e.ph, e.pw);
        if (g.n >= 0) {
            const scalar_t* plane =
                input + (static_cast<long long>(g.n) * channels + input_channel(s, e.ctop, e.ph, e.pw)) *
                            (static_cast<long long>(height) * width);
            const int samples = sample_per_part * sample_per_part;
#pragma unroll 1
            for (int sample = e.lane; sample < samples; sample += lanes) {
                accum_t y, x;
                sample_position(g, sample, sample_per_part, y, x);
                if (!counted(y, x, s)) continue;
                const Sample<accum_t> p = locate(y, x, s);
                for (int q = 0; q < 4; ++q)
                    if (p.weight[q] != accum_t(0)) sum += p.weight[q] * to_acc(plane[p.corner[q]]);
                ++count;
            }
        }
    }
    sum = sum_over_lanes(sum, lanes);
    count = sum_over_lanes(count, lanes);
    if (e.live && e.lane == 0)
        output[static_cast<long long>(k) * output_dim * pooled_size * pooled_size + e.item] =
            from_acc<scalar_t>(count > 0 ? sum / static_cast<accum_t>(count) : accum_t(0));
}

// Backward of deform_psroi_pool_samples_fastest_forward, the gradients of
// deform_psroi_pool_backward:
//  - grad_input[n, channel] += grad_output / count * weight at each corner
//    (acc_t atomics, or fixed-point ones into grad_input_fixed; both null: no
//    scatter);
//  - grad_trans_partial[k, ctop, 0 / 1, ph, pw] = trans_std * roi_w / roi_h /
//    count * grad_output * d B2 / d x / d y summed over the samples, written
//    once; null: not computed (then no input value is read).
template <typename scalar_t, bool HAS_TRANS>
__global__ void __launch_bounds__(PSROI_POOL_BLOCK_SIZE, BACKWARD_MIN_BLOCKS<scalar_t>)
deform_psroi_pool_samples_fastest_backward(
        const scalar_t* __restrict__ input,        // [N, output_dim * group_size^2, H, W]
        const acc_t<scalar_t>* __restrict__ rois,  // [K, 5]
        const scalar_t* __restrict__ trans,        // [K, 2 * num_classes, part_size, part_size]; unread without HAS_TRANS
        const scalar_t* __restrict__ grad_output,  // [K, output_dim, pooled_size, pooled_size]
        acc_t<scalar_t>* __restrict__ grad_input,  // [N, output_dim * group_size^2, H, W], accumulated; or null
        long long* __restrict__ grad_input_fixed,  // the same elements, fixed point; or null
        double fixed_scale, int* __restrict__ fixed_status,
        acc_t<scalar_t>* __restrict__ grad_trans_partial,  // [K, output_dim, 2, pooled_size, pooled_size]; or null
        int batch, int channels, int height, int width, int output_dim, int group_size,
        int pooled_size, int part_size, int sample_per_part, int num_classes,
        acc_t<scalar_t> spatial_scale, acc_t<scalar_t> trans_std, int lanes) {
    using accum_t = acc_t<scalar_t>;
    const Shape<accum_t> s{batch,       channels,   height,      width,
                           output_dim,  group_size, pooled_size, part_size,
                           sample_per_part, num_classes, spatial_scale, trans_std};
    const Element<accum_t> e(s, lanes);
    const int k = blockIdx.y;
    const int bins = pooled_size * pooled_size;
    const int samples = sample_per_part * sample_per_part;
    const ScatterAdd<accum_t> grad_in{grad_input, grad_input_fixed, fixed_scale, fixed_status};
    const bool scatter = grad_in.enabled();  // uniform across the launch
    const bool want_trans = HAS_TRANS && grad_trans_partial != nullptr;

    BinGeometry<accum_t> g{};
    int count = 0;
    if (e.live) {
        g = bin_geometry<scalar_t, HAS_TRANS>(rois, trans, s, k, e.class_id, e.ph, e.pw);
        if (g.n >= 0) {
#pragma unroll 1
            for (int sample = e.lane; sample < samples; sample += lanes) {
                accum_t y, x;
                sample_position(g, sample, sample_per_part, y, x);
                count += counted(y, x, s);
            }
        }
    }
    count = sum_over_lanes(count, lanes);
    accum_t grad_y = accum_t(0), grad_x = accum_t(0);
    if (count > 0) {  // implies live and g.n >= 0
        const accum_t inv_count = accum_t(1) / static_cast<accum_t>(count);
        const accum_t go = to_acc(grad_output[static_cast<long long>(k) * output_dim * bins + e.item]);
        const accum_t scaled = go * inv_count;
        const long long plane_begin =
            (static_cast<long long>(g.n) * channels + input_channel(s, e.ctop, e.ph, e.pw)) *
            (static_cast<long long>(height) * width);
        const scalar_t* plane = input + plane_begin;
        const ScatterAdd<accum_t> grad_plane = grad_in.shifted(plane_begin);
#pragma unroll 1
        for (int sample = e.lane; sample < samples; sample += lanes) {
            accum_t y, x;
            sample_position(g, sample, sample_per_part, y, x);
            if (!counted(y, x, s)) continue;
            const Sample<accum_t> p = locate(y, x, s);
            if (scatter && scaled != accum_t(0))
                for (int q = 0; q < 4; ++q)
                    if (p.weight[q] != accum_t(0)) grad_plane.add(p.corner[q], p.weight[q] * scaled);
            if (!want_trans) continue;
            const accum_t hy = accum_t(1) - p.ly, hx = accum_t(1) - p.lx;
            accum_t v[4];
            for (int q = 0; q < 4; ++q) v[q] = to_acc(plane[p.corner[q]]);
            // A clamped coordinate is an integer: its floor and ceil corners
            // coincide and its slope comes out 0, as it should.
            grad_y += go * (hx * (v[2] - v[0]) + p.lx * (v[3] - v[1]));
            grad_x += go * (hy * (v[1] - v[0]) + p.ly * (v[3] - v[2]));
        }
        grad_y *= inv_count;
        grad_x *= inv_count;
    }
    if (!want_trans) return;  // uniform across the launch: no lane is left in a shuffle
    grad_y = sum_over_lanes(grad_y, lanes);
    grad_x = sum_over_lanes(grad_x, lanes);
    if (e.live && e.lane == 0) {
        accum_t* out = grad_trans_partial + (static_cast<long long>(k) * output_dim + e.ctop) * 2 * bins +
                       e.ph * pooled_size + e.pw;
        out[0] = grad_x * trans_std * g.roi_w;
        out[bins] = grad_y * trans_std * g.roi_h;
    }
}
