// DCNv3 / DCNv4, the direct design: upstream DCNv3's mapping, one thread per
// output element (output pixel, group, channel). Semantics:
// shared/ops-semantics.md; layouts and sampling: dcnv3_common.cuh.
//
// A block of DCNV3_BLOCK_SIZE threads is cut into segments of
// T = min(D, block) threads; a segment owns one (output pixel, group) item and
// thread t of it channels t, t + T, ... (one channel when D <= block). Every
// thread locates every tap itself (the sampling point is recomputed D times),
// reads its own channel: the reference point for the vectorized design.
//
// Backward: grad_input by float32 atomics (many taps of many pixels sample the
// same input pixel; a float32 buffer keeps the contract's float32
// accumulation, which half / bfloat16 atomics would round at every add), or
// with grad_input_fixed by the order-independent fixed-point atomics of
// deterministic_atomics.cuh.
// The offset and mask gradients of a tap are sums over the D channels: each
// thread's partial goes to shared memory, a tree reduction over the segment
// sums it and the segment's first thread writes it, once (no atomics).
// The block's threads all run every tap and every barrier, items past the end
// included, so that every thread reaches every __syncthreads().

#include "dcnv3_common.cuh"

#ifndef DCNV3_BLOCK_SIZE
#error "compile with -DDCNV3_BLOCK_SIZE=<threads per block> (kernels/ops/dcnv3.py sets it)"
#endif

namespace {

// This thread's item and first channel.
struct Slot {
    long long item;  // (output pixel, group), group fastest; past the end: inactive
    long long pixel; // n * H_out * W_out + ho * W_out + wo
    int group, ho, wo;
    int lane, lanes; // channel slot in the segment, segment size
    bool in_segment; // false for the block's last threads when lanes does not divide it
    bool active;     // in a segment whose item exists
};

__device__ __forceinline__ Slot slot_of(const dcnv3::Geometry& g, int batch) {
    Slot s;
    s.lanes = min(g.group_channels, DCNV3_BLOCK_SIZE);
    const int segments = DCNV3_BLOCK_SIZE / s.lanes;
    const int segment = threadIdx.x / s.lanes;
    s.lane = threadIdx.x % s.lanes;
    s.item = static_cast<long long>(blockIdx.x) * segments + segment;
    const long long items = static_cast<long long>(batch) * g.out_h * g.out_w * g.group;
    s.in_segment = segment < segments;
    s.active = s.in_segment && s.item < items;
    const long long item = s.active ? s.item : 0;
    s.group = static_cast<int>(item % g.group);
    s.pixel = item / g.group;
    s.wo = static_cast<int>(s.pixel % g.out_w);
    s.ho = static_cast<int>(s.pixel / g.out_w % g.out_h);
    return s;
}

// Minimum blocks per SM in the launch bounds: `common` for the storage types
// computing in float32, 2 (<= 128 registers) for double, whose values take two
// registers each.
template <typename scalar_t, int common>
constexpr int MIN_BLOCKS = sizeof(scalar_t) == 8 ? 2 : common;

}  // namespace

// output[pixel, g*D + d] = sum_p m(g, p) * B0(input[n, :, :, g*D + d], y_p, x_p).
// offset / mask: see dcnv3::Layout (FUSED_OFFSET_MASK: both point at offset_mask).
// double: left to itself ptxas picked 64 registers and spilled for the fused layout.
template <typename scalar_t, int MODULATION>
__global__ void __launch_bounds__(DCNV3_BLOCK_SIZE, MIN_BLOCKS<scalar_t, 1>)
dcnv3_direct_forward(const scalar_t* __restrict__ input,  // [N, H, W, G*D]
                     const scalar_t* __restrict__ offset,
                     const scalar_t* __restrict__ mask,
                     scalar_t* __restrict__ output,       // [N, H_out, W_out, G*D]
                     DCNV3_GEOMETRY_PARAMS) {
    using real = acc_t<scalar_t>;
    const dcnv3::Geometry g = DCNV3_GEOMETRY;
    const dcnv3::Layout<MODULATION> layout(g);
    const Slot slot = slot_of(g, batch);
    if (!slot.active) return;
    const int P = g.taps();
    const long long plane = static_cast<long long>(g.height) * g.width;
    const long long n = slot.pixel / (static_cast<long long>(g.out_h) * g.out_w);
    const int C = g.channels();
    const scalar_t* in = input + n * plane * C + slot.group * g.group_channels;
    scalar_t* out = output + slot.pixel * C + slot.group * g.group_channels;
    const dcnv3::Softmax<real> softmax = dcnv3::softmax_of<MODULATION>(
        mask, layout.mask_index(slot.pixel, slot.group, 0), P);
    for (int d = slot.lane; d < g.group_channels; d += slot.lanes) {
        real acc = 0.f;
        for (int p = 0; p < P; ++p) {
            const long long o = layout.offset_index(slot.pixel, slot.group, p);
            const dcnv3::Sample<real> s = dcnv3::locate(
                g, dcnv3::tap_of(g, slot.ho, slot.wo, p), to_acc(offset[o]), to_acc(offset[o + 1]));
            if (!s.in_range) continue;
            const real m = dcnv3::modulation<MODULATION>(
                to_acc(mask[layout.mask_index(slot.pixel, slot.group, p)]), softmax);
            real value = 0.f;
#pragma unroll
            for (int q = 0; q < 4; ++q)
                if (s.corner[q] >= 0)
                    value += s.weight[q] * to_acc(in[s.corner[q] * static_cast<long long>(C) + d]);
            acc += m * value;
        }
        out[d] = from_acc<scalar_t>(acc);
    }
}

// Gradients of dcnv3_direct_forward.
//  grad_input: [N, H, W, G*D] float32, zero-filled, accumulated; or
//  grad_input_fixed: the same in fixed point (deterministic_atomics.cuh);
//  both null: skipped.
//  grad_offset / grad_mask: float32, the layout of offset / mask (for
//  FUSED_OFFSET_MASK both point at one [.., M] buffer; its padding columns
//  are not written). With SOFTMAX_MASK grad_mask is the logits' gradient.
// At least 4 blocks per SM (<= 64 registers): without it ptxas picked 48
// registers and spilled for the softmax half / bfloat16 instantiations on
// sm_80 once the fixed-point path was in.
template <typename scalar_t, int MODULATION>
__global__ void __launch_bounds__(DCNV3_BLOCK_SIZE, MIN_BLOCKS<scalar_t, 4>)
dcnv3_direct_backward(const scalar_t* __restrict__ input,        // [N, H, W, G*D]
                      const scalar_t* __restrict__ offset,
                      const scalar_t* __restrict__ mask,
                      const scalar_t* __restrict__ grad_output,  // [N, H_out, W_out, G*D]
                      acc_t<scalar_t>* __restrict__ grad_input,
                      long long* __restrict__ grad_input_fixed,
                      double fixed_scale, int* __restrict__ fixed_status,
                      acc_t<scalar_t>* grad_offset,
                      acc_t<scalar_t>* grad_mask,
                      DCNV3_GEOMETRY_PARAMS) {
    using real = acc_t<scalar_t>;
    // Partial sums of (d/dx, d/dy, d/dm) per thread, reduced per segment.
    __shared__ real partial[3][DCNV3_BLOCK_SIZE];
    const dcnv3::Geometry g = DCNV3_GEOMETRY;
    const dcnv3::Layout<MODULATION> layout(g);
    const Slot slot = slot_of(g, batch);
    const int P = g.taps();
    const long long plane = static_cast<long long>(g.height) * g.width;
    const long long n = slot.pixel / (static_cast<long long>(g.out_h) * g.out_w);
    const int C = g.channels();
    const long long channel0 = n * plane * C + slot.group * g.group_channels;
    const scalar_t* in = input + channel0;
    const scalar_t* grad_out = grad_output + slot.pixel * C + slot.group * g.group_channels;
    const ScatterAdd<real> grad_in =
        ScatterAdd<real>{grad_input, grad_input_fixed, fixed_scale, fixed_status}.shifted(
            channel0);
    const bool scatter = grad_in.enabled();  // uniform across the launch
    const dcnv3::Softmax<real> softmax =
        slot.active ? dcnv3::softmax_of<MODULATION>(
                          mask, layout.mask_index(slot.pixel, slot.group, 0), P)
                    : dcnv3::Softmax<real>{0.f, 1.f};
    int reduction_span = 1;  // smallest power of two >= lanes
    while (reduction_span < slot.lanes) reduction_span *= 2;

    for (int p = 0; p < P; ++p) {
        real d_x = 0.f, d_y = 0.f, d_m = 0.f;
        real m = 0.f;
        if (slot.active) {
            const long long o = layout.offset_index(slot.pixel, slot.group, p);
            const dcnv3::Sample<real> s = dcnv3::locate(
                g, dcnv3::tap_of(g, slot.ho, slot.wo, p), to_acc(offset[o]), to_acc(offset[o + 1]));
            m = dcnv3::modulation<MODULATION>(
                to_acc(mask[layout.mask_index(slot.pixel, slot.group, p)]), softmax);
            if (s.in_range) {
                real dot[4] = {0.f, 0.f, 0.f, 0.f};
                for (int d = slot.lane; d < g.group_channels; d += slot.lanes) {
                    const real grad = to_acc(grad_out[d]);
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        if (s.corner[q] < 0) continue;
                        const long long at = s.corner[q] * static_cast<long long>(C) + d;
                        dot[q] += grad * to_acc(in[at]);
                        if (scatter && s.weight[q] != 0.f)
                            grad_in.add(at, s.weight[q] * m * grad);
                    }
                }
                dcnv3::add_tap_gradient(s, dot, d_x, d_y, d_m);
            }
        }
        partial[0][threadIdx.x] = d_x;
        partial[1][threadIdx.x] = d_y;
        partial[2][threadIdx.x] = d_m;
        __syncthreads();
        for (int span = reduction_span / 2; span > 0; span /= 2) {
            if (slot.in_segment && slot.lane < span && slot.lane + span < slot.lanes)
                for (int k = 0; k < 3; ++k)
                    partial[k][threadIdx.x] += partial[k][threadIdx.x + span];
            __syncthreads();
        }
        if (slot.active && slot.lane == 0) {
            const real scale = m * g.offset_scale;
            const long long o = layout.offset_index(slot.pixel, slot.group, p);
            grad_offset[o] = scale * partial[0][threadIdx.x];
            grad_offset[o + 1] = scale * partial[1][threadIdx.x];
            grad_mask[layout.mask_index(slot.pixel, slot.group, p)] = partial[2][threadIdx.x];
        }
        __syncthreads();  // the partials are rewritten by the next tap
    }
    if (slot.active && slot.lane == 0)
        dcnv3::finish_mask_gradient<MODULATION>(
            grad_mask, mask, layout.mask_index(slot.pixel, slot.group, 0), P, softmax);
}
