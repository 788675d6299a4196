// Deformable convolution kernels: DCNv1 (deform_conv2d) and DCNv2
// (modulated_deform_conv2d, HAS_MASK = true). Semantics: shared/ops-semantics.md
// (torchvision.ops.deform_conv2d), NCHW, B0 sampling.
//
// The convolution is split the usual way: a deformable im2col builds columns
// [n, C_in * kh * kw, H_out * W_out], a cuBLAS GEMM with the weight does the
// rest (kernels/ops/deform_conv2d.py). The backward runs the GEMM with the
// transposed weight to get grad_columns, then ONE fused kernel
// (deform_col2im) scatters grad_input and reduces grad_offset / grad_mask, so
// grad_columns is read once and every sampling position is located once.
//
// Work decomposition, shared by both kernels: one thread per
// (sample n, offset group g, channel slice s, tap k, output pixel p), p fastest.
// A thread locates its sampling point and bilinear weights once and loops over
// the channels of its slice, which all share that point (they are in the same
// offset group). Consecutive threads take consecutive output pixels, so every
// column / grad_column / offset / mask access is coalesced and the input
// gathers of a warp hit neighbouring addresses of the same channel plane. The
// host picks the number of slices from the device's resident thread count:
// one slice when the (n, g, k, p) items alone fill the GPU, more when they
// don't (small batch or feature map), never fewer than a few channels a thread.
//
// All math is float32 whatever scalar_t is (double for the float64
// instantiations, acc_t<scalar_t>): values are loaded, converted, blended and
// rounded once on store.
//
// Index widths: a channel plane (H*W) and one sample's offset tensor
// (2*G*kh*kw*H_out*W_out) fit in int (checked on the host); anything that
// multiplies in the batch or the channel count (input, column and
// grad_input offsets) is long long.

#include "deform_conv2d_sampling.cuh"
#include "deterministic_atomics.cuh"
#include "scalar_conversions.cuh"

#ifndef DEFORM_CONV_BLOCK_SIZE
#error "compile with -DDEFORM_CONV_BLOCK_SIZE=<threads per block> (kernels/ops/deform_conv2d.py sets it)"
#endif

namespace {

// One thread's share of the work, decoded from its position in the launch:
// blockIdx.y is the sample within the chunk, the flat x index runs over
// (offset group, channel slice, tap, pixel), pixel fastest.
struct WorkItem {
    int n, group, tap, pixel, slice;
    int channel_begin, channel_end;  // the slice's input channels
    int base_y, base_x;              // undeformed sampling position of the tap
};

__device__ __forceinline__ bool decode_work_item(WorkItem& w, int channels, int kernel_h,
                                                 int kernel_w, int stride_h, int stride_w,
                                                 int pad_h, int pad_w, int dilation_h,
                                                 int dilation_w, int offset_groups, int out_h,
                                                 int out_w, int channels_per_thread,
                                                 int channel_slices) {
    const int pixels = out_h * out_w;
    const int taps = kernel_h * kernel_w;
    const int items = offset_groups * channel_slices * taps * pixels;
    const int item = blockIdx.x * DEFORM_CONV_BLOCK_SIZE + threadIdx.x;
    if (item >= items) return false;
    w.n = blockIdx.y;
    w.pixel = item % pixels;
    int rest = item / pixels;
    w.tap = rest % taps;
    rest /= taps;
    w.slice = rest % channel_slices;
    w.group = rest / channel_slices;
    const int group_channels = channels / offset_groups;
    w.channel_begin = w.group * group_channels + w.slice * channels_per_thread;
    w.channel_end = min(w.channel_begin + channels_per_thread, (w.group + 1) * group_channels);
    const int ho = w.pixel / out_w, wo = w.pixel % out_w;
    const int i = w.tap / kernel_w, j = w.tap % kernel_w;
    w.base_y = ho * stride_h - pad_h + i * dilation_h;
    w.base_x = wo * stride_w - pad_w + j * dilation_w;
    return true;
}

}  // namespace

// columns[n, c * kh * kw + k, p] = mask * B0(input[n, c], y, x) for tap k of
// output pixel p (mask = 1 without HAS_MASK). Every element is written.
// Pointers start at the chunk's first sample; gridDim.y = samples in the chunk.
template <typename scalar_t, bool HAS_MASK>
__global__ void __launch_bounds__(DEFORM_CONV_BLOCK_SIZE)
deform_im2col(const scalar_t* __restrict__ input,   // [n, C, H, W]
              const scalar_t* __restrict__ offset,  // [n, 2 * G * kh * kw, H_out, W_out]
              const scalar_t* __restrict__ mask,    // [n, G * kh * kw, H_out, W_out]; unread without HAS_MASK
              scalar_t* __restrict__ columns,       // [n, C * kh * kw, H_out * W_out]
              int channels, int height, int width, int kernel_h, int kernel_w, int stride_h,
              int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w,
              int offset_groups, int out_h, int out_w, int channels_per_thread,
              int channel_slices) {
    using real = acc_t<scalar_t>;
    WorkItem w;
    if (!decode_work_item(w, channels, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                          dilation_h, dilation_w, offset_groups, out_h, out_w,
                          channels_per_thread, channel_slices))
        return;
    const int pixels = out_h * out_w;
    const int taps = kernel_h * kernel_w;
    const int group_tap = w.group * taps + w.tap;
    const int sample_offsets = 2 * offset_groups * taps * pixels;
    const scalar_t* offset_yx = offset + static_cast<long long>(w.n) * sample_offsets +
                                2 * group_tap * pixels + w.pixel;
    Sample<real> s = locate(w.base_y, w.base_x, to_acc(offset_yx[0]), to_acc(offset_yx[pixels]),
                            height, width);
    if (HAS_MASK && s.in_range) {
        const real m = to_acc(mask[static_cast<long long>(w.n) * (offset_groups * taps * pixels) +
                                      group_tap * pixels + w.pixel]);
        for (int q = 0; q < 4; ++q) s.weight[q] *= m;
    }

    const long long plane = static_cast<long long>(height) * width;
    const long long column_step = static_cast<long long>(taps) * pixels;
    const scalar_t* in = input + (static_cast<long long>(w.n) * channels + w.channel_begin) * plane;
    scalar_t* col = columns +
                    (static_cast<long long>(w.n) * channels + w.channel_begin) * column_step +
                    static_cast<long long>(w.tap) * pixels + w.pixel;
    if (!s.in_range) {
        for (int c = w.channel_begin; c < w.channel_end; ++c, col += column_step)
            *col = from_acc<scalar_t>(0.f);
        return;
    }
    // A corner with weight 0 (outside, zero mask, or an integer coordinate)
    // is not loaded: integer offsets cost one gather per channel, not four.
#pragma unroll 4
    for (int c = w.channel_begin; c < w.channel_end; ++c, in += plane, col += column_step) {
        real value = 0.f;
        for (int q = 0; q < 4; ++q)
            if (s.weight[q] != 0.f) value += s.weight[q] * to_acc(in[s.corner[q]]);
        *col = from_acc<scalar_t>(value);
    }
}

// Backward of deform_im2col, fused: for each (n, g, slice, k, p) item
//  - scatters grad_columns * mask * bilinear weight into grad_input (atomics:
//    several taps and pixels sample the same input pixel; float32 ones into
//    grad_input, or with grad_input_fixed the order-independent fixed-point
//    ones of deterministic_atomics.cuh);
//  - reduces over the slice's channels
//      d out / d dy = mask * sum_c grad_col * d B0 / d y   (dx likewise),
//      d out / d mask = sum_c grad_col * B0
//    and writes them once into this slice's partial sums (no atomics); the
//    host sums the slices (one slice: a plain copy).
// grad_input (or grad_input_fixed) is zero-filled by the host; both null when
// the input needs no gradient (the scatter is skipped). Pointers start at the chunk's first
// sample, grad_*_partial at slice 0: [slices, n, ...] with n = gridDim.y.
template <typename scalar_t, bool HAS_MASK>
__global__ void __launch_bounds__(DEFORM_CONV_BLOCK_SIZE)
deform_col2im(const scalar_t* __restrict__ input,         // [n, C, H, W]
              const scalar_t* __restrict__ offset,        // [n, 2 * G * kh * kw, H_out, W_out]
              const scalar_t* __restrict__ mask,          // [n, G * kh * kw, H_out, W_out]; unread without HAS_MASK
              const scalar_t* __restrict__ grad_columns,  // [n, C * kh * kw, H_out * W_out]
              acc_t<scalar_t>* __restrict__ grad_input,   // [n, C, H, W], accumulated; or null
              long long* __restrict__ grad_input_fixed,   // [n, C, H, W], fixed point; or null
              double fixed_scale, int* __restrict__ fixed_status,
              acc_t<scalar_t>* __restrict__ grad_offset_partial,  // [slices, n, 2 * G * kh * kw, H_out * W_out]
              acc_t<scalar_t>* __restrict__ grad_mask_partial,    // [slices, n, G * kh * kw, H_out * W_out]; unwritten without HAS_MASK
              int channels, int height, int width, int kernel_h, int kernel_w, int stride_h,
              int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w,
              int offset_groups, int out_h, int out_w, int channels_per_thread,
              int channel_slices) {
    WorkItem w;
    if (!decode_work_item(w, channels, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                          dilation_h, dilation_w, offset_groups, out_h, out_w,
                          channels_per_thread, channel_slices))
        return;
    using real = acc_t<scalar_t>;
    const int pixels = out_h * out_w;
    const int taps = kernel_h * kernel_w;
    const int group_tap = w.group * taps + w.tap;
    const int sample_offsets = 2 * offset_groups * taps * pixels;
    const int sample_masks = offset_groups * taps * pixels;
    const scalar_t* offset_yx = offset + static_cast<long long>(w.n) * sample_offsets +
                                2 * group_tap * pixels + w.pixel;
    const Sample<real> s = locate(w.base_y, w.base_x, to_acc(offset_yx[0]),
                                  to_acc(offset_yx[pixels]), height, width);
    const long long mask_index =
        static_cast<long long>(w.n) * sample_masks + group_tap * pixels + w.pixel;
    const real m = HAS_MASK ? to_acc(mask[mask_index]) : real(1);

    // Outside (B0 = 0 around the point) every gradient of this item is 0.
    real grad_y = 0.f, grad_x = 0.f, grad_m = 0.f;
    if (s.in_range) {
        const long long plane = static_cast<long long>(height) * width;
        const long long column_step = static_cast<long long>(taps) * pixels;
        const long long first_plane = static_cast<long long>(w.n) * channels + w.channel_begin;
        const scalar_t* in = input + first_plane * plane;
        const ScatterAdd<real> grad_input_target{grad_input, grad_input_fixed, fixed_scale,
                                                 fixed_status};
        const bool scatter = grad_input_target.enabled();  // uniform across the launch
        ScatterAdd<real> grad_in = grad_input_target.shifted(first_plane * plane);
        const scalar_t* grad_col = grad_columns + first_plane * column_step +
                                   static_cast<long long>(w.tap) * pixels + w.pixel;
        const real hy = 1.f - s.ly, hx = 1.f - s.lx;
        // Not unrolled: keeps the kernel at <= 64 registers (4 blocks of 256 per
        // SM); the grad_columns load and the four gathers of one iteration are
        // independent already.
#pragma unroll 1
        for (int c = w.channel_begin; c < w.channel_end;
             ++c, in += plane, grad_col += column_step) {
            const real g = to_acc(*grad_col);
            const real masked_g = m * g;
            real v[4];
            for (int q = 0; q < 4; ++q) {
                v[q] = s.corner[q] >= 0 ? to_acc(in[s.corner[q]]) : real(0);
                if (scatter && s.weight[q] != 0.f && masked_g != 0.f)
                    grad_in.add(s.corner[q], s.weight[q] * masked_g);
            }
            if (scatter) grad_in = grad_in.shifted(plane);
            grad_y += g * (hx * (v[2] - v[0]) + s.lx * (v[3] - v[1]));
            grad_x += g * (hy * (v[1] - v[0]) + s.ly * (v[3] - v[2]));
            if (HAS_MASK)
                grad_m += g * (s.weight[0] * v[0] + s.weight[1] * v[1] + s.weight[2] * v[2] +
                               s.weight[3] * v[3]);
        }
    }
    const long long batch = gridDim.y;
    real* grad_offset_yx = grad_offset_partial +
                            (w.slice * batch + w.n) * sample_offsets + 2 * group_tap * pixels +
                            w.pixel;
    grad_offset_yx[0] = m * grad_y;
    grad_offset_yx[pixels] = m * grad_x;
    if (HAS_MASK)
        grad_mask_partial[(w.slice * batch + w.n) * sample_masks + group_tap * pixels + w.pixel] =
            grad_m;
}
