// RoI pooling kernels: roi_align, deform_roi_pool (DCNv1, HAS_OFFSET) and
// modulated_deform_roi_pool (DCNv2, HAS_OFFSET and HAS_MASK): one forward and
// one backward template serve all three. Semantics: shared/ops-semantics.md
// ("RoI pooling, NCHW"; mmcv's DeformRoIPool; torchvision's roi_align without
// offset, `aligned` a runtime flag), sampling rule B1.
//
// Forward: one thread per output element (k, c, ph, pw), pw fastest, the
// order of the output: stores are coalesced, and the threads of a warp read
// neighbouring bins of the same input plane, so their gathers share cache
// lines. (The alternative, channel fastest, shares the bin's geometry across a
// warp but turns every gather of the warp into a different plane: 32 cache
// lines per load instead of a few.)
//
// Backward: one thread per (k, channel slice, ph, pw), pw fastest. A thread
// walks the bin's samples once; for each sample it locates the four corners
// once and loops over its slice's channels:
//  - scatters grad_output·mask·weight/count into grad_input (atomics: bins of
//    overlapping RoIs, and the samples of one bin, hit the same pixels;
//    acc_t<scalar_t> ones, or under torch.use_deterministic_algorithms(True) the
//    order-independent fixed-point ones of deterministic_atomics.cuh);
//  - reduces over the slice's channels the offset and mask gradients, which
//    every channel of a bin shares, and writes them ONCE into the slice's
//    partial sums (no atomics); the host sums the slices (one slice: a copy).
// The host chooses one channel per thread when no offset or mask gradient is
// wanted (all parallelism, nothing to reduce), else enough slices to fill
// the GPU (kernels/ops/deform_roi_pool.py).
//
// All math is in acc_t<scalar_t>: float32 for float, half and bfloat16,
// float64 for double (for torch.autograd.gradcheck); rois are in that type
// too whatever the input's dtype (the host converts them: half coordinates
// would round RoIs of a large image by whole pixels, and autocast hands
// float32 boxes to half features). A batch index outside [0, N) gives a
// zero bin (the host rejects such rois before the launch; the check here
// only keeps a bad index from ever becoming an address). Likewise the
// adaptive grid is clamped to ROI_POOL_MAX_SAMPLES samples a side (the host
// rejects larger grids), so that a huge RoI can neither overflow int nor run
// a loop of 2^31 samples.
//
// Index widths: a plane (H*W) and C*pooled_h*pooled_w fit in int (checked on
// the host); anything that multiplies in the RoI, the batch index or the
// channel with a plane is long long.

#include "deterministic_atomics.cuh"
#include "scalar_conversions.cuh"

#ifndef ROI_POOL_BLOCK_SIZE
#error "compile with -DROI_POOL_BLOCK_SIZE=<threads per block> (kernels/ops/deform_roi_pool.py sets it)"
#endif
#ifndef ROI_POOL_MAX_SAMPLES
#error "compile with -DROI_POOL_MAX_SAMPLES=<samples> (kernels/ops/deform_roi_pool.py sets it)"
#endif

namespace {

// The output bin (k, ph, pw) a thread works on, and the slice of channels
// (one channel in the forward). blockIdx.y is the RoI within the launch's
// chunk of RoIs (the host launches chunks of at most 65535, gridDim.y's
// limit; pointers start at the chunk's first RoI), the flat x index runs over
// (slice, ph, pw) of that RoI, pw fastest: all 32-bit (64-bit divisions are
// calls to a slow subroutine that also costs a stack frame).
struct BinIndex {
    int k, slice, ph, pw;
};

__device__ __forceinline__ bool decode(BinIndex& b, int slices, int pooled_h, int pooled_w) {
    const int item = blockIdx.x * ROI_POOL_BLOCK_SIZE + threadIdx.x;
    if (item >= slices * pooled_h * pooled_w) return false;
    b.k = blockIdx.y;
    b.pw = item % pooled_w;
    const int rest = item / pooled_w;
    b.ph = rest % pooled_h;
    b.slice = rest / pooled_h;
    return true;
}

// Where the samples of one bin lie. Sample (iy, ix) is at
//   y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h, x likewise,
// with start moved by the offset; start_y = y1 * spatial_scale - 0.5 when
// aligned, y1 * spatial_scale with roi_h clamped below at 1 when not
// (torchvision's legacy rule). An empty grid (sampling_ratio <= 0 and a zero
// or negative RoI: ceil <= 0) has no samples and the bin is 0; the divisor is
// max(grid_h * grid_w, 1), as in mmcv and torchvision.
template <typename accum_t>
struct BinGeometry {
    int n;                    // batch index; -1 when out of range (the bin is 0)
    accum_t first_y, first_x;   // start + ph * bin (+ offset): the bin's corner
    accum_t step_y, step_x;     // bin / grid: spacing of the samples
    int grid_h, grid_w;
    accum_t inv_count;          // 1 / max(grid_h * grid_w, 1)
    accum_t roi_h, roi_w;       // of the un-moved RoI: d start / d offset = gamma * roi
};

// ceil(bin) samples, clamped to [0, ROI_POOL_MAX_SAMPLES] before the
// conversion (a float beyond int's range does not convert).
template <typename accum_t>
__device__ __forceinline__ int adaptive_grid(accum_t bin) {
    return static_cast<int>(
        min_of(max_of(ceil_of(bin), accum_t(0)), static_cast<accum_t>(ROI_POOL_MAX_SAMPLES)));
}

template <typename scalar_t, bool HAS_OFFSET, typename accum_t = acc_t<scalar_t>>
__device__ __forceinline__ BinGeometry<accum_t> bin_geometry(const accum_t* __restrict__ rois,
                                                           const scalar_t* __restrict__ offset,
                                                           const BinIndex& b, int batch,
                                                           int pooled_h, int pooled_w,
                                                           accum_t spatial_scale,
                                                           int sampling_ratio, accum_t gamma,
                                                           bool aligned) {
    BinGeometry<accum_t> g;
    const accum_t* roi = rois + static_cast<long long>(b.k) * 5;
    const accum_t batch_index = roi[0];
    // Written as "inside" so that a NaN index is outside too.
    g.n = batch_index >= accum_t(0) && batch_index < static_cast<accum_t>(batch)
              ? static_cast<int>(batch_index)
              : -1;
    const accum_t shift = aligned ? accum_t(0.5) : accum_t(0);
    const accum_t start_x = roi[1] * spatial_scale - shift;
    const accum_t start_y = roi[2] * spatial_scale - shift;
    g.roi_w = roi[3] * spatial_scale - shift - start_x;
    g.roi_h = roi[4] * spatial_scale - shift - start_y;
    if (!aligned) {
        g.roi_w = max_of(g.roi_w, accum_t(1));
        g.roi_h = max_of(g.roi_h, accum_t(1));
    }
    const accum_t bin_h = g.roi_h / static_cast<accum_t>(pooled_h);
    const accum_t bin_w = g.roi_w / static_cast<accum_t>(pooled_w);
    g.grid_h = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(bin_h);
    g.grid_w = sampling_ratio > 0 ? sampling_ratio : adaptive_grid(bin_w);
    g.inv_count = accum_t(1) / static_cast<accum_t>(max(g.grid_h * g.grid_w, 1));
    g.step_y = bin_h / static_cast<accum_t>(max(g.grid_h, 1));
    g.step_x = bin_w / static_cast<accum_t>(max(g.grid_w, 1));
    g.first_y = start_y + static_cast<accum_t>(b.ph) * bin_h;
    g.first_x = start_x + static_cast<accum_t>(b.pw) * bin_w;
    if (HAS_OFFSET) {
        const int bins = pooled_h * pooled_w;
        const scalar_t* off =
            offset + static_cast<long long>(b.k) * 2 * bins + b.ph * pooled_w + b.pw;
        g.first_x += gamma * g.roi_w * to_acc(off[0]);
        g.first_y += gamma * g.roi_h * to_acc(off[bins]);
    }
    return g;
}

// One sample by rule B1.
template <typename accum_t>
struct Sample {
    bool in_range;        // false: B1 gives 0 (y < -1, y > H, x < -1 or x > W)
    bool live_y, live_x;  // false where the clamp at 0 holds the coordinate: d/dy (d/dx) is 0
    accum_t ly, lx;         // fractional parts after the clamp
    int low;              // y_low * W + x_low
    int step_x, step_y;   // x_high - x_low (0 or 1), (y_high - y_low) * W
    accum_t weight[4];      // bilinear weights of the corners, in corner() order

    // (y_low, x_low), (y_low, x_high), (y_high, x_low), (y_high, x_high):
    // three ints instead of four keep the backward under 64 registers.
    __device__ __forceinline__ int corner(int q) const {
        return low + (q & 1 ? step_x : 0) + (q & 2 ? step_y : 0);
    }
};

template <typename accum_t>
__device__ __forceinline__ Sample<accum_t> locate(accum_t y, accum_t x, int height, int width) {
    Sample<accum_t> s;
    // Written as "inside" so that a NaN coordinate (a NaN offset) lands outside.
    s.in_range = y >= accum_t(-1) && y <= static_cast<accum_t>(height) && x >= accum_t(-1) &&
                 x <= static_cast<accum_t>(width);
    if (!s.in_range) return s;
    // The clamp's slope is taken as 0 at the kink itself, as autograd of
    // clamp (the float64 reference) does.
    s.live_y = y > accum_t(0);
    s.live_x = x > accum_t(0);
    y = max_of(y, accum_t(0));
    x = max_of(x, accum_t(0));
    int y_low = static_cast<int>(y), x_low = static_cast<int>(x);
    s.step_y = width;
    s.step_x = 1;
    if (y_low >= height - 1) {
        y_low = height - 1;
        y = static_cast<accum_t>(y_low);
        s.step_y = 0;  // y_high = y_low: the slope comes out 0 by itself
    }
    if (x_low >= width - 1) {
        x_low = width - 1;
        x = static_cast<accum_t>(x_low);
        s.step_x = 0;
    }
    s.ly = y - static_cast<accum_t>(y_low);
    s.lx = x - static_cast<accum_t>(x_low);
    const accum_t hy = accum_t(1) - s.ly, hx = accum_t(1) - s.lx;
    s.low = y_low * width + x_low;
    s.weight[0] = hy * hx;
    s.weight[1] = hy * s.lx;
    s.weight[2] = s.ly * hx;
    s.weight[3] = s.ly * s.lx;
    return s;
}

// Resident blocks per SM the kernels ask ptxas for (see the kernels).
template <typename scalar_t>
constexpr int FORWARD_MIN_BLOCKS = 6;
template <>
constexpr int FORWARD_MIN_BLOCKS<double> = 2;
template <typename scalar_t>
constexpr int BACKWARD_MIN_BLOCKS = 3;
template <>
constexpr int BACKWARD_MIN_BLOCKS<double> = 2;

}  // namespace

// output[k, c, ph, pw] = mask[k, 0, ph, pw] * (sum over the bin's samples of
// B1(input[n, c], y, x)) / max(grid_h * grid_w, 1), n = rois[k, 0].
// Every element is written. __launch_bounds__ asks for 6 resident blocks
// (at most 40 registers, 75 % occupancy: what ptxas chooses from the block
// size alone, while a bound of 1 block let it take 42-47 registers), 2 for
// double (with fewer the double instantiations spilled).
template <typename scalar_t, bool HAS_OFFSET, bool HAS_MASK>
__global__ void __launch_bounds__(ROI_POOL_BLOCK_SIZE, FORWARD_MIN_BLOCKS<scalar_t>)
deform_roi_pool_forward(const scalar_t* __restrict__ input,   // [N, C, H, W]
                        const acc_t<scalar_t>* __restrict__ rois,  // [K, 5]
                        const scalar_t* __restrict__ offset,  // [K, 2, pooled_h, pooled_w]; unread without HAS_OFFSET
                        const scalar_t* __restrict__ mask,    // [K, 1, pooled_h, pooled_w]; unread without HAS_MASK
                        scalar_t* __restrict__ output,        // [K, C, pooled_h, pooled_w]
                        int batch, int channels, int height, int width, int pooled_h,
                        int pooled_w, acc_t<scalar_t> spatial_scale, int sampling_ratio,
                        acc_t<scalar_t> gamma, int aligned) {
    using accum_t = acc_t<scalar_t>;
    BinIndex b;
    if (!decode(b, channels, pooled_h, pooled_w)) return;
    const BinGeometry<accum_t> g = bin_geometry<scalar_t, HAS_OFFSET>(
        rois, offset, b, batch, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma,
        aligned != 0);
    accum_t sum = 0;
    if (g.n >= 0) {
        const scalar_t* plane = input + (static_cast<long long>(g.n) * channels + b.slice) *
                                            (static_cast<long long>(height) * width);
        // Not unrolled: the grid is usually 2x2 or smaller, and unrolling
        // its loops costs registers (occupancy) for no fewer loads.
#pragma unroll 1
        for (int iy = 0; iy < g.grid_h; ++iy) {
            const accum_t y = g.first_y + (static_cast<accum_t>(iy) + accum_t(0.5)) * g.step_y;
#pragma unroll 1
            for (int ix = 0; ix < g.grid_w; ++ix) {
                const accum_t x = g.first_x + (static_cast<accum_t>(ix) + accum_t(0.5)) * g.step_x;
                const Sample<accum_t> s = locate(y, x, height, width);
                if (!s.in_range) continue;
                for (int q = 0; q < 4; ++q) sum += s.weight[q] * to_acc(plane[s.corner(q)]);
            }
        }
    }
    accum_t value = sum * g.inv_count;
    if (HAS_MASK)
        value *= to_acc(mask[static_cast<long long>(b.k) * pooled_h * pooled_w +
                               b.ph * pooled_w + b.pw]);
    output[(static_cast<long long>(b.k) * channels + b.slice) * (pooled_h * pooled_w) +
           b.ph * pooled_w + b.pw] = from_acc<scalar_t>(value);
}

// Backward of deform_roi_pool_forward for the channels [slice * per_thread,
// (slice + 1) * per_thread) of bin (k, ph, pw):
//  - grad_input[n, c] += grad_output * mask * weight / count at each corner
//    (acc_t atomics into grad_input, or fixed-point ones into
//    grad_input_fixed; zero-filled by the host, both null when not wanted: the
//    scatter is skipped). A sample adds at most once to a pixel of a channel
//    (coinciding corners have weight 0), so a grad_input element receives at
//    most K * pooled_h * pooled_w * grid_h * grid_w values;
//  - grad_offset_partial[k, slice, 0 / 1, ph, pw] = gamma * roi_w / roi_h * mask / count
//      * sum_c grad_output * d B1 / d x / d y (summed over samples),
//    grad_mask_partial[k, slice, 0, ph, pw] = sum_c grad_output * unmasked value;
//    written once each, or not at all when null (then no input value is read).
// B1's derivative is exact: 0 where the clamp at 0 holds a coordinate
// (y in [-1, 0]), which mmcv's kernel does not zero (it blends rows 0 and 1
// there); above H - 1 both rows are H - 1 and the slope is 0 anyway.
// __launch_bounds__ asks for 3 resident blocks (at most 85 registers): with
// the block size alone, ptxas held some instantiations at 64 registers and
// spilled a few bytes instead; 2 for double (at most 128: at 85 the double
// instantiations spilled).
template <typename scalar_t, bool HAS_OFFSET, bool HAS_MASK>
__global__ void __launch_bounds__(ROI_POOL_BLOCK_SIZE, BACKWARD_MIN_BLOCKS<scalar_t>)
deform_roi_pool_backward(const scalar_t* __restrict__ input,        // [N, C, H, W]
                         const acc_t<scalar_t>* __restrict__ rois,  // [K, 5]
                         const scalar_t* __restrict__ offset,       // [K, 2, pooled_h, pooled_w]; unread without HAS_OFFSET
                         const scalar_t* __restrict__ mask,         // [K, 1, pooled_h, pooled_w]; unread without HAS_MASK
                         const scalar_t* __restrict__ grad_output,  // [K, C, pooled_h, pooled_w]
                         acc_t<scalar_t>* __restrict__ grad_input,  // [N, C, H, W], accumulated; or null
                         long long* __restrict__ grad_input_fixed,  // [N, C, H, W], fixed point; or null
                         double fixed_scale, int* __restrict__ fixed_status,
                         acc_t<scalar_t>* __restrict__ grad_offset_partial,  // [K, slices, 2, pooled_h, pooled_w]; or null
                         acc_t<scalar_t>* __restrict__ grad_mask_partial,    // [K, slices, 1, pooled_h, pooled_w]; or null
                         int batch, int channels, int height, int width, int pooled_h,
                         int pooled_w, acc_t<scalar_t> spatial_scale, int sampling_ratio,
                         acc_t<scalar_t> gamma, int aligned, int channels_per_thread,
                         int slices) {
    using accum_t = acc_t<scalar_t>;
    BinIndex b;
    if (!decode(b, slices, pooled_h, pooled_w)) return;
    const BinGeometry<accum_t> g = bin_geometry<scalar_t, HAS_OFFSET>(
        rois, offset, b, batch, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma,
        aligned != 0);
    const int bins = pooled_h * pooled_w;
    const int bin = b.ph * pooled_w + b.pw;
    const accum_t m = HAS_MASK ? to_acc(mask[static_cast<long long>(b.k) * bins + bin]) : accum_t(1);
    const ScatterAdd<accum_t> grad_in{grad_input, grad_input_fixed, fixed_scale, fixed_status};
    // Uniform across the launch.
    const bool scatter = grad_in.enabled();
    const bool want_offset = HAS_OFFSET && grad_offset_partial != nullptr;
    const bool want_mask = HAS_MASK && grad_mask_partial != nullptr;
    const bool read_values = want_offset || want_mask;

    const int channel_begin = b.slice * channels_per_thread;
    const int channel_end = min(channel_begin + channels_per_thread, channels);
    accum_t grad_y = 0, grad_x = 0, grad_m = 0;
    if (g.n >= 0) {
        const long long plane = static_cast<long long>(height) * width;
        const long long first_plane = static_cast<long long>(g.n) * channels + channel_begin;
        const scalar_t* grad_out_first =
            grad_output + (static_cast<long long>(b.k) * channels + channel_begin) * bins + bin;
        const accum_t scale = m * g.inv_count;
#pragma unroll 1
        for (int iy = 0; iy < g.grid_h; ++iy) {
            const accum_t y = g.first_y + (static_cast<accum_t>(iy) + accum_t(0.5)) * g.step_y;
#pragma unroll 1
            for (int ix = 0; ix < g.grid_w; ++ix) {
                const accum_t x = g.first_x + (static_cast<accum_t>(ix) + accum_t(0.5)) * g.step_x;
                const Sample<accum_t> s = locate(y, x, height, width);
                if (!s.in_range) continue;
                const accum_t hy = accum_t(1) - s.ly, hx = accum_t(1) - s.lx;
                // One running plane offset serves input and grad_input (fewer
                // live registers than a pointer each).
                long long at = first_plane * plane;
                const scalar_t* grad_out = grad_out_first;
#pragma unroll 1
                for (int c = channel_begin; c < channel_end; ++c, at += plane, grad_out += bins) {
                    const accum_t go = to_acc(*grad_out);
                    const accum_t scaled = go * scale;
                    if (scatter && scaled != accum_t(0))
                        for (int q = 0; q < 4; ++q)
                            if (s.weight[q] != accum_t(0))
                                grad_in.add(at + s.corner(q), s.weight[q] * scaled);
                    if (read_values) {
                        accum_t v[4];
                        for (int q = 0; q < 4; ++q) v[q] = to_acc(input[at + s.corner(q)]);
                        if (want_offset) {
                            if (s.live_y) grad_y += go * (hx * (v[2] - v[0]) + s.lx * (v[3] - v[1]));
                            if (s.live_x) grad_x += go * (hy * (v[1] - v[0]) + s.ly * (v[3] - v[2]));
                        }
                        if (want_mask)
                            grad_m += go * (s.weight[0] * v[0] + s.weight[1] * v[1] +
                                            s.weight[2] * v[2] + s.weight[3] * v[3]);
                    }
                }
            }
        }
    }
    const long long partial = static_cast<long long>(b.k) * slices + b.slice;  // [k, slice]
    if (want_offset) {
        accum_t* out = grad_offset_partial + partial * 2 * bins + bin;
        const accum_t scale = m * g.inv_count * gamma;
        out[0] = grad_x * scale * g.roi_w;
        out[bins] = grad_y * scale * g.roi_h;
    }
    if (want_mask) grad_mask_partial[partial * bins + bin] = grad_m * g.inv_count;
}
