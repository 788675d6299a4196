// DCNv3 / DCNv4, the vectorized design. Semantics: shared/ops-semantics.md;
// layouts and sampling: dcnv3_common.cuh.
//
// Work decomposition: an item is one (output pixel, group); its D channels
// are cut into D / VEC vectors of VEC channels (16 bytes: 4 floats, 8 halves
// or 8 bfloat16; VEC = 1 when D * itemsize is no multiple of 16 or a pointer
// is not 16-byte aligned -- the host picks). L = min(next power of two of
// D / VEC, 32) lanes of one warp own an item, lane l vectors l, l + L, ...;
// a block of DCNV3_BLOCK_SIZE threads holds DCNV3_BLOCK_SIZE / L items (several
// output pixels). Per tap, a lane computes the sampling point, the four
// bilinear weights and the modulation once and reuses them over its VEC
// channels; each corner is one 16-byte load. The softmax over taps is fused:
// each lane computes the (max, sum) of its item's P logits (the same
// addresses across the lanes: broadcast loads).
//
// Backward: per tap, each lane sums d/dx, d/dy, d/dm over its channels; an
// xor-shuffle butterfly over the L lanes (within one warp, L a power of two)
// gives the totals, lane 0 writes them once (no atomics). grad_input by
// float32 atomics into a float32 buffer (taps of many pixels hit the same
// input pixel; half / bfloat16 atomics would round every add), 16-byte
// vector atomics on sm_90; or, with grad_input_fixed, the order-independent
// fixed-point atomics of deterministic_atomics.cuh, one per channel. Lanes of
// items past the end run the tap loop without loading anything, so every
// shuffle sees the whole warp.

#include "channel_vectors.cuh"
#include "dcnv3_common.cuh"

#ifndef DCNV3_BLOCK_SIZE
#error "compile with -DDCNV3_BLOCK_SIZE=<threads per block> (kernels/ops/dcnv3.py sets it)"
#endif

namespace {

struct Lane {
    long long pixel;  // n * H_out * W_out + ho * W_out + wo
    long long n;
    int group, ho, wo;
    int lane, lanes;  // this lane, lanes per item (a power of two <= 32)
    int vectors;      // D / VEC
    bool active;      // the item exists
};

template <int VEC>
__device__ __forceinline__ Lane lane_of(const dcnv3::Geometry& g, int batch) {
    Lane l;
    l.vectors = g.group_channels / VEC;
    l.lanes = lanes_for(l.vectors);
    l.lane = threadIdx.x % l.lanes;
    const long long item = static_cast<long long>(blockIdx.x) * (DCNV3_BLOCK_SIZE / l.lanes) +
                           threadIdx.x / l.lanes;
    const long long items = static_cast<long long>(batch) * g.out_h * g.out_w * g.group;
    l.active = item < items;
    const long long valid = l.active ? item : 0;
    l.group = static_cast<int>(valid % g.group);
    l.pixel = valid / g.group;
    l.wo = static_cast<int>(l.pixel % g.out_w);
    l.ho = static_cast<int>(l.pixel / g.out_w % g.out_h);
    l.n = l.pixel / (static_cast<long long>(g.out_h) * g.out_w);
    return l;
}

}  // namespace

// output[pixel, g*D + d] = sum_p m(g, p) * B0(input[n, :, :, g*D + d], y_p, x_p).
// At least 3 blocks per SM (<= 85 registers): without it ptxas picked 48
// registers and spilled for the fused half / bfloat16 instantiations on sm_80.
template <typename scalar_t, int MODULATION, int VEC>
__global__ void __launch_bounds__(DCNV3_BLOCK_SIZE, 3)
dcnv3_vectorized_forward(const scalar_t* __restrict__ input,  // [N, H, W, G*D]
                         const scalar_t* __restrict__ offset,
                         const scalar_t* __restrict__ mask,
                         scalar_t* __restrict__ output,       // [N, H_out, W_out, G*D]
                         DCNV3_GEOMETRY_PARAMS) {
    using real = acc_t<scalar_t>;
    const dcnv3::Geometry g = DCNV3_GEOMETRY;
    const dcnv3::Layout<MODULATION> layout(g);
    const Lane l = lane_of<VEC>(g, batch);
    if (!l.active) return;  // no collectives in the forward
    const int P = g.taps();
    const int C = g.channels();
    const scalar_t* in =
        input + l.n * g.height * static_cast<long long>(g.width) * C + l.group * g.group_channels;
    scalar_t* out = output + l.pixel * C + l.group * g.group_channels;
    const dcnv3::Softmax<real> softmax =
        dcnv3::softmax_of<MODULATION>(mask, layout.mask_index(l.pixel, l.group, 0), P);
    for (int vector = l.lane; vector < l.vectors; vector += l.lanes) {
        real acc[VEC] = {};
        for (int p = 0; p < P; ++p) {
            const long long o = layout.offset_index(l.pixel, l.group, p);
            const dcnv3::Sample<real> s =
                dcnv3::locate(g, dcnv3::tap_of(g, l.ho, l.wo, p), to_acc(offset[o]),
                              to_acc(offset[o + 1]));
            if (!s.in_range) continue;
            const real m = dcnv3::modulation<MODULATION>(
                to_acc(mask[layout.mask_index(l.pixel, l.group, p)]), softmax);
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                if (s.corner[q] < 0) continue;
                real v[VEC];
                load_vector<scalar_t, VEC>(in + s.corner[q] * static_cast<long long>(C) + vector * VEC, v);
                const real w = m * s.weight[q];
#pragma unroll
                for (int k = 0; k < VEC; ++k) acc[k] += w * v[k];
            }
        }
        store_vector<scalar_t, VEC>(out + vector * VEC, acc);
    }
}

// Gradients of dcnv3_vectorized_forward; arguments as dcnv3_direct_backward's.
// At least 3 blocks per SM (<= 85 registers), as the forward: without it
// ptxas picked 48 or 64 registers and spilled once the fixed-point path was in.
template <typename scalar_t, int MODULATION, int VEC>
__global__ void __launch_bounds__(DCNV3_BLOCK_SIZE, 3)
dcnv3_vectorized_backward(const scalar_t* __restrict__ input,        // [N, H, W, G*D]
                          const scalar_t* __restrict__ offset,
                          const scalar_t* __restrict__ mask,
                          const scalar_t* __restrict__ grad_output,  // [N, H_out, W_out, G*D]
                          acc_t<scalar_t>* __restrict__ grad_input,  // [N, H, W, G*D] or null
                          long long* __restrict__ grad_input_fixed,  // the same in fixed point, or null
                          double fixed_scale, int* __restrict__ fixed_status,
                          acc_t<scalar_t>* grad_offset,
                          acc_t<scalar_t>* grad_mask,
                          DCNV3_GEOMETRY_PARAMS) {
    using real = acc_t<scalar_t>;
    const dcnv3::Geometry g = DCNV3_GEOMETRY;
    const dcnv3::Layout<MODULATION> layout(g);
    const Lane l = lane_of<VEC>(g, batch);
    const int P = g.taps();
    const int C = g.channels();
    const long long channel0 =
        l.n * g.height * static_cast<long long>(g.width) * C + l.group * g.group_channels;
    const scalar_t* in = input + channel0;
    const scalar_t* grad_out = grad_output + l.pixel * C + l.group * g.group_channels;
    const ScatterAdd<real> grad_in =
        ScatterAdd<real>{grad_input, grad_input_fixed, fixed_scale, fixed_status}.shifted(
            channel0);
    const bool scatter = grad_in.enabled();  // uniform across the launch
    const dcnv3::Softmax<real> softmax =
        l.active ? dcnv3::softmax_of<MODULATION>(mask, layout.mask_index(l.pixel, l.group, 0), P)
                 : dcnv3::Softmax<real>{0.f, 1.f};

    for (int p = 0; p < P; ++p) {
        real d_x = 0.f, d_y = 0.f, d_m = 0.f, m = 0.f;
        const long long o = layout.offset_index(l.pixel, l.group, p);
        if (l.active) {
            const dcnv3::Sample<real> s =
                dcnv3::locate(g, dcnv3::tap_of(g, l.ho, l.wo, p), to_acc(offset[o]),
                              to_acc(offset[o + 1]));
            m = dcnv3::modulation<MODULATION>(
                to_acc(mask[layout.mask_index(l.pixel, l.group, p)]), softmax);
            if (s.in_range)
                dcnv3::add_vector_tap_gradient<scalar_t, VEC>(
                    s, m, in, grad_out, C, l.lane, l.lanes, l.vectors, scatter,
                    dcnv3::GlobalScatter<VEC, real>{grad_in}, d_x, d_y, d_m);
        }
        d_x = sum_over_lanes(d_x, l.lanes);
        d_y = sum_over_lanes(d_y, l.lanes);
        d_m = sum_over_lanes(d_m, l.lanes);
        if (l.active && l.lane == 0) {
            const real scale = m * g.offset_scale;
            grad_offset[o] = scale * d_x;
            grad_offset[o + 1] = scale * d_y;
            grad_mask[layout.mask_index(l.pixel, l.group, p)] = d_m;
        }
    }
    if (l.active && l.lane == 0)
        dcnv3::finish_mask_gradient<MODULATION>(
            grad_mask, mask, layout.mask_index(l.pixel, l.group, 0), P, softmax);
}
