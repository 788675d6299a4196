// Deformable position-sensitive RoI pooling (R-FCN; the original Deformable
// ConvNets semantics): deform_psroi_pool, forward and backward; HAS_TRANS =
// false is no_trans. Semantics: shared/ops-semantics.md ("RoI pooling, NCHW"),
// sampling rule B2.
//
// Forward: one thread per output element (k, ctop, ph, pw), pw fastest, the
// order of the output: coalesced stores, and neighbouring threads read
// neighbouring bins (of the group_size x group_size position-sensitive
// planes, which for pooled_size == group_size are different planes of the
// same RoI window; with pooled_size > group_size, runs of bins share one).
//
// Backward: one thread per (k, class, channel slice, ph, pw), pw fastest. The
// output channels of one class share the bin's trans, so its samples: a
// thread counts the bin's samples (B2's divisor), then walks them once,
// locating the corners once per sample, and loops over its slice's output
// channels:
//  - scatters grad_output / count * weight into grad_input (atomics:
//    overlapping RoIs and samples meet on the same pixels; acc_t ones, or
//    under torch.use_deterministic_algorithms(True) the order-independent
//    fixed-point ones of deterministic_atomics.cuh);
//  - reduces d out / d trans over the slice's channels and writes it ONCE into
//    the slice's partial sums [K, num_classes, slices, 2, pooled, pooled];
//    the host sums the slices and then the bins that share a part cell
//    (part_size < pooled_size), so no gradient element takes an atomic.
// One channel per thread when trans needs no gradient.
//
// All math is in acc_t<scalar_t> (float32; float64 for double), rois
// too whatever the input's dtype (see deform_roi_pool.cu). A batch index outside [0, N)
// gives a zero bin (the host rejects such rois; this only keeps a bad index
// from becoming an address).
//
// Launch: blockIdx.y is the RoI within the launch's chunk of RoIs (the host
// launches chunks of at most 65535, gridDim.y's limit; pointers start at the
// chunk's first RoI); the flat x index covers one RoI's work, pw fastest.
// Index widths: a plane (H*W) and output_dim*pooled_size^2 fit in int
// (checked on the host); anything that multiplies in the RoI, the batch index
// or a channel with a plane is long long.

#include "deterministic_atomics.cuh"
#include "scalar_conversions.cuh"

#ifndef PSROI_POOL_BLOCK_SIZE
#error "compile with -DPSROI_POOL_BLOCK_SIZE=<threads per block> (kernels/ops/deform_psroi_pool.py sets it)"
#endif

namespace {

// The sizes and parameters of one call (the kernels take them as separate
// value parameters, as every launch path passes plain scalars).
template <typename accum_t>
struct Shape {
    int batch, channels, height, width;
    int output_dim, group_size, pooled_size, part_size, sample_per_part, num_classes;
    accum_t spatial_scale, trans_std;
};

// Where the samples of bin (k, ph, pw) of class class_id lie: sample (ih, iw)
// is at (first_y + ih * sub_h, first_x + iw * sub_w).
template <typename accum_t>
struct BinGeometry {
    int n;                  // batch index; -1 when out of range (the bin is 0)
    accum_t first_y, first_x; // hstart, wstart (moved by trans)
    accum_t sub_h, sub_w;     // bin / sample_per_part
    accum_t roi_h, roi_w;     // d start / d trans = trans_std * roi
    int part_h, part_w;     // the trans cell of the bin
};

template <typename scalar_t, bool HAS_TRANS, typename accum_t = acc_t<scalar_t>>
__device__ __forceinline__ BinGeometry<accum_t> bin_geometry(const accum_t* __restrict__ rois,
                                                           const scalar_t* __restrict__ trans,
                                                           const Shape<accum_t>& s, int k,
                                                           int class_id, int ph, int pw) {
    BinGeometry<accum_t> g;
    const accum_t* roi = rois + static_cast<long long>(k) * 5;
    const accum_t batch_index = roi[0];
    // Written as "inside" so that a NaN index is outside too.
    g.n = batch_index >= accum_t(0) && batch_index < static_cast<accum_t>(s.batch)
              ? static_cast<int>(batch_index)
              : -1;
    // round_of: C's round, halves away from zero, as the contract says.
    const accum_t start_x = round_of(roi[1]) * s.spatial_scale - accum_t(0.5);
    const accum_t start_y = round_of(roi[2]) * s.spatial_scale - accum_t(0.5);
    const accum_t end_x = (round_of(roi[3]) + accum_t(1)) * s.spatial_scale - accum_t(0.5);
    const accum_t end_y = (round_of(roi[4]) + accum_t(1)) * s.spatial_scale - accum_t(0.5);
    g.roi_w = max_of(end_x - start_x, accum_t(0.1));
    g.roi_h = max_of(end_y - start_y, accum_t(0.1));
    const accum_t bin_w = g.roi_w / static_cast<accum_t>(s.pooled_size);
    const accum_t bin_h = g.roi_h / static_cast<accum_t>(s.pooled_size);
    g.sub_w = bin_w / static_cast<accum_t>(s.sample_per_part);
    g.sub_h = bin_h / static_cast<accum_t>(s.sample_per_part);
    // floor(ph / pooled_size * part_size) in exact integer arithmetic.
    g.part_h = ph * s.part_size / s.pooled_size;
    g.part_w = pw * s.part_size / s.pooled_size;
    accum_t trans_x = accum_t(0), trans_y = accum_t(0);
    if (HAS_TRANS) {
        const int cells = s.part_size * s.part_size;
        const scalar_t* t = trans + (static_cast<long long>(k) * 2 * s.num_classes + 2 * class_id) *
                                        cells + g.part_h * s.part_size + g.part_w;
        trans_x = to_acc(t[0]) * s.trans_std;
        trans_y = to_acc(t[cells]) * s.trans_std;
    }
    g.first_x = static_cast<accum_t>(pw) * bin_w + start_x + trans_x * g.roi_w;
    g.first_y = static_cast<accum_t>(ph) * bin_h + start_y + trans_y * g.roi_h;
    return g;
}

// The input channel of output channel ctop at bin (ph, pw).
template <typename accum_t>
__device__ __forceinline__ int input_channel(const Shape<accum_t>& s, int ctop, int ph, int pw) {
    const int gh = min(max(ph * s.group_size / s.pooled_size, 0), s.group_size - 1);
    const int gw = min(max(pw * s.group_size / s.pooled_size, 0), s.group_size - 1);
    return (ctop * s.group_size + gh) * s.group_size + gw;
}

// B2: a sample outside [-0.5, size - 0.5] is skipped and not counted.
template <typename accum_t>
__device__ __forceinline__ bool counted(accum_t y, accum_t x, const Shape<accum_t>& s) {
    // Written as "inside" so that a NaN coordinate (a NaN trans) is skipped.
    return y >= -accum_t(0.5) && y <= static_cast<accum_t>(s.height) - accum_t(0.5) && x >= -accum_t(0.5) &&
           x <= static_cast<accum_t>(s.width) - accum_t(0.5);
}

template <typename accum_t>
struct Sample {
    accum_t ly, lx;         // y - floor(y), x - floor(x) after the clamp
    int corner[4];        // (floor y, floor x), (floor y, ceil x), (ceil y, floor x), (ceil y, ceil x)
    accum_t weight[4];
};

// A counted sample: clamp to [0, size - 1], blend floor / ceil corners.
template <typename accum_t>
__device__ __forceinline__ Sample<accum_t> locate(accum_t y, accum_t x, const Shape<accum_t>& s) {
    Sample<accum_t> p;
    const accum_t max_y = static_cast<accum_t>(s.height - 1), max_x = static_cast<accum_t>(s.width - 1);
    y = min_of(max_of(y, accum_t(0)), max_y);
    x = min_of(max_of(x, accum_t(0)), max_x);
    const accum_t y_low = floor_of(y), x_low = floor_of(x);
    const int y0 = static_cast<int>(y_low), x0 = static_cast<int>(x_low);
    const int y1 = static_cast<int>(ceil_of(y)), x1 = static_cast<int>(ceil_of(x));
    p.ly = y - y_low;
    p.lx = x - x_low;
    const accum_t hy = accum_t(1) - p.ly, hx = accum_t(1) - p.lx;
    p.corner[0] = y0 * s.width + x0;
    p.corner[1] = y0 * s.width + x1;
    p.corner[2] = y1 * s.width + x0;
    p.corner[3] = y1 * s.width + x1;
    p.weight[0] = hy * hx;
    p.weight[1] = hy * p.lx;
    p.weight[2] = p.ly * hx;
    p.weight[3] = p.ly * p.lx;
    return p;
}

// Resident blocks per SM the backward asks ptxas for (see the kernel).
template <typename scalar_t>
constexpr int BACKWARD_MIN_BLOCKS = 3;
template <>
constexpr int BACKWARD_MIN_BLOCKS<double> = 1;

}  // namespace

// output[k, ctop, ph, pw] = mean over the bin's counted samples of
// B2(input[n, (ctop * group_size + gh) * group_size + gw], y, x); 0 when none
// is counted. Every element is written.
template <typename scalar_t, bool HAS_TRANS>
__global__ void __launch_bounds__(PSROI_POOL_BLOCK_SIZE)
deform_psroi_pool_forward(const scalar_t* __restrict__ input,  // [N, output_dim * group_size^2, H, W]
                          const acc_t<scalar_t>* __restrict__ rois,  // [K, 5]
                          const scalar_t* __restrict__ trans,  // [K, 2 * num_classes, part_size, part_size]; unread without HAS_TRANS
                          scalar_t* __restrict__ output,       // [K, output_dim, pooled_size, pooled_size]
                          int batch, int channels, int height, int width, int output_dim,
                          int group_size, int pooled_size, int part_size, int sample_per_part,
                          int num_classes, acc_t<scalar_t> spatial_scale,
                          acc_t<scalar_t> trans_std) {
    using accum_t = acc_t<scalar_t>;
    const Shape<accum_t> s{batch,       channels,  height,          width,
                  output_dim,  group_size, pooled_size,    part_size,
                  sample_per_part, num_classes, spatial_scale, trans_std};
    const int bins = pooled_size * pooled_size;
    const int item = blockIdx.x * PSROI_POOL_BLOCK_SIZE + threadIdx.x;
    if (item >= output_dim * bins) return;
    const int k = blockIdx.y;
    const int ctop = item / bins;
    const int ph = item % bins / pooled_size, pw = item % pooled_size;
    const int class_id = ctop / (s.output_dim / s.num_classes);
    const BinGeometry<accum_t> g = bin_geometry<scalar_t, HAS_TRANS>(rois, trans, s, k, class_id, ph, pw);
    accum_t sum = accum_t(0);
    int count = 0;
    if (g.n >= 0) {
        const scalar_t* plane =
            input + (static_cast<long long>(g.n) * s.channels + input_channel(s, ctop, ph, pw)) *
                        (static_cast<long long>(s.height) * s.width);
        for (int ih = 0; ih < s.sample_per_part; ++ih) {
            const accum_t y = g.first_y + static_cast<accum_t>(ih) * g.sub_h;
            for (int iw = 0; iw < s.sample_per_part; ++iw) {
                const accum_t x = g.first_x + static_cast<accum_t>(iw) * g.sub_w;
                if (!counted(y, x, s)) continue;
                const Sample<accum_t> p = locate(y, x, s);
                for (int q = 0; q < 4; ++q)
                    if (p.weight[q] != accum_t(0)) sum += p.weight[q] * to_acc(plane[p.corner[q]]);
                ++count;
            }
        }
    }
    output[static_cast<long long>(k) * output_dim * bins + item] =
        from_acc<scalar_t>(count > 0 ? sum / static_cast<accum_t>(count) : accum_t(0));
}

// Backward of deform_psroi_pool_forward for output channels
// class_id * channels_per_class + [slice * per_thread, (slice + 1) * per_thread)
// of bin (k, ph, pw):
//  - grad_input[n, channel] += grad_output / count * weight at each corner
//    (acc_t atomics into grad_input, or fixed-point ones into
//    grad_input_fixed; zero-filled by the host, both null: no scatter). A
//    sample adds at most once to a pixel (coinciding corners have weight 0),
//    so an element receives at most K * pooled_size^2 * sample_per_part^2 values;
//  - grad_trans_partial[k, class_id, slice, 0 / 1, ph, pw] =
//      trans_std * roi_w / roi_h / count * sum_ctop grad_output * d B2 / d x / d y
//    summed over samples, written once, or not at all when null (then no
//    input value is read).
// __launch_bounds__ asks for 3 resident blocks (at most 85 registers; with
// the block size alone the no_trans instantiations spilled on sm_80), none
// for double (at 85 registers or fewer those spilled).
template <typename scalar_t, bool HAS_TRANS>
__global__ void __launch_bounds__(PSROI_POOL_BLOCK_SIZE, BACKWARD_MIN_BLOCKS<scalar_t>)
deform_psroi_pool_backward(const scalar_t* __restrict__ input,        // [N, output_dim * group_size^2, H, W]
                           const acc_t<scalar_t>* __restrict__ rois,  // [K, 5]
                           const scalar_t* __restrict__ trans,        // [K, 2 * num_classes, part_size, part_size]; unread without HAS_TRANS
                           const scalar_t* __restrict__ grad_output,  // [K, output_dim, pooled_size, pooled_size]
                           acc_t<scalar_t>* __restrict__ grad_input,  // [N, output_dim * group_size^2, H, W], accumulated; or null
                           long long* __restrict__ grad_input_fixed,  // the same elements, fixed point; or null
                           double fixed_scale, int* __restrict__ fixed_status,
                           acc_t<scalar_t>* __restrict__ grad_trans_partial,  // [K, num_classes, slices, 2, pooled_size, pooled_size]; or null
                           int batch, int channels, int height, int width, int output_dim,
                           int group_size, int pooled_size, int part_size, int sample_per_part,
                           int num_classes, acc_t<scalar_t> spatial_scale,
                           acc_t<scalar_t> trans_std, int channels_per_thread, int slices) {
    using accum_t = acc_t<scalar_t>;
    const Shape<accum_t> s{batch,       channels,  height,          width,
                  output_dim,  group_size, pooled_size,    part_size,
                  sample_per_part, num_classes, spatial_scale, trans_std};
    const int bins = pooled_size * pooled_size;
    const int item = blockIdx.x * PSROI_POOL_BLOCK_SIZE + threadIdx.x;
    if (item >= num_classes * slices * bins) return;
    const int k = blockIdx.y;
    const int bin = item % bins;
    const int ph = bin / pooled_size, pw = bin % pooled_size;
    const int class_slice = item / bins;  // class_id * slices + slice
    const int slice = class_slice % slices;
    const int class_id = class_slice / slices;
    const BinGeometry<accum_t> g = bin_geometry<scalar_t, HAS_TRANS>(rois, trans, s, k, class_id, ph, pw);
    const ScatterAdd<accum_t> grad_input_target{grad_input, grad_input_fixed, fixed_scale,
                                              fixed_status};
    const bool scatter = grad_input_target.enabled();  // uniform across the launch
    const bool want_trans = HAS_TRANS && grad_trans_partial != nullptr;

    const int channels_per_class = s.output_dim / s.num_classes;
    const int ctop_begin = class_id * channels_per_class + slice * channels_per_thread;
    const int ctop_end =
        min(ctop_begin + channels_per_thread, (class_id + 1) * channels_per_class);
    accum_t grad_y = accum_t(0), grad_x = accum_t(0);
    int count = 0;
    if (g.n >= 0) {
        for (int ih = 0; ih < s.sample_per_part; ++ih)
            for (int iw = 0; iw < s.sample_per_part; ++iw)
                count += counted(g.first_y + static_cast<accum_t>(ih) * g.sub_h,
                                 g.first_x + static_cast<accum_t>(iw) * g.sub_w, s);
    }
    if (count > 0) {
        const accum_t inv_count = accum_t(1) / static_cast<accum_t>(count);
        const long long plane = static_cast<long long>(s.height) * s.width;
        const long long sample_planes = static_cast<long long>(g.n) * s.channels;
        // Consecutive output channels are group_size^2 input channels apart.
        const long long channel_step = static_cast<long long>(s.group_size) * s.group_size * plane;
        const long long first_plane = sample_planes + input_channel(s, ctop_begin, ph, pw);
        const scalar_t* grad_out_first =
            grad_output + (static_cast<long long>(k) * s.output_dim + ctop_begin) * bins + bin;
        for (int ih = 0; ih < s.sample_per_part; ++ih) {
            const accum_t y = g.first_y + static_cast<accum_t>(ih) * g.sub_h;
            for (int iw = 0; iw < s.sample_per_part; ++iw) {
                const accum_t x = g.first_x + static_cast<accum_t>(iw) * g.sub_w;
                if (!counted(y, x, s)) continue;
                const Sample<accum_t> p = locate(y, x, s);
                const accum_t hy = accum_t(1) - p.ly, hx = accum_t(1) - p.lx;
                const scalar_t* in = input + first_plane * plane;
                ScatterAdd<accum_t> grad_in = grad_input_target.shifted(first_plane * plane);
                const scalar_t* grad_out = grad_out_first;
#pragma unroll 1
                for (int ctop = ctop_begin; ctop < ctop_end; ++ctop, grad_out += bins) {
                    const accum_t go = to_acc(*grad_out);
                    if (scatter) {
                        const accum_t scaled = go * inv_count;
                        if (scaled != accum_t(0))
                            for (int q = 0; q < 4; ++q)
                                if (p.weight[q] != accum_t(0))
                                    grad_in.add(p.corner[q], p.weight[q] * scaled);
                        grad_in = grad_in.shifted(channel_step);
                    }
                    if (want_trans) {
                        accum_t v[4];
                        for (int q = 0; q < 4; ++q) v[q] = to_acc(in[p.corner[q]]);
                        in += channel_step;
                        // A clamped coordinate is an integer: its floor and ceil
                        // corners coincide and its slope comes out 0, as it should.
                        grad_y += go * (hx * (v[2] - v[0]) + p.lx * (v[3] - v[1]));
                        grad_x += go * (hy * (v[1] - v[0]) + p.ly * (v[3] - v[2]));
                    }
                }
            }
        }
        grad_y *= inv_count;
        grad_x *= inv_count;
    }
    if (want_trans) {
        accum_t* out = grad_trans_partial +
                     (static_cast<long long>(k) * num_classes * slices + class_slice) * 2 * bins +
                     bin;
        out[0] = grad_x * s.trans_std * g.roi_w;
        out[bins] = grad_y * s.trans_std * g.roi_h;
    }
}
