// Multi-scale deformable attention (Deformable DETR's MSDeformAttn core).
// Semantics: shared/ops-semantics.md, "Multi-scale deformable attention".
//
// value [N, S, M, D] (L maps flattened row-major and stacked, level l at
// level_start_index[l]), spatial_shapes [L, 2] (H_l, W_l) and
// level_start_index [L] as int64, sampling_locations [N, Q, M, L, P, 2]
// (normalised, x first), attention_weights [N, Q, M, L, P], output
// [N, Q, M*D].
//
// Work decomposition, as dcnv3_vectorized.cu: an item is one (n, q, m); its
// D channels are cut into D / VEC vectors of VEC channels (16 bytes, VEC = 1
// when D * itemsize is no multiple of 16 or a pointer is not 16-byte
// aligned -- the host picks). LANES = min(next power of two of D / VEC, 32)
// lanes of one warp own an item, lane l vectors l, l + LANES, ...; a block of
// MSDA_BLOCK_SIZE threads holds MSDA_BLOCK_SIZE / LANES items. Per point a
// lane computes the sampling point, the four bilinear weights and the
// attention weight once and reuses them over its VEC channels. SOFTMAX fuses
// a softmax over the item's L*P weights: each lane computes (max, sum) itself
// (the same addresses across the lanes: broadcast loads).
//
// Every kernel computes in real = acc_t<scalar_t>: float32, double for
// float64 (for gradcheck, not speed: its VEC is 1).
//
// Backward: per point, each lane sums d/dx, d/dy, d/da over its channels; an
// xor-shuffle butterfly over the lanes gives the totals and lane 0 writes
// grad_sampling_locations and grad_attention_weights once (no atomics).
// grad_value by atomics into a buffer of real (points of many queries hit
// the same pixel), 16-byte float32 vector atomics on sm_90; or, with
// grad_value_fixed, the order-independent fixed-point atomics of
// deterministic_atomics.cuh, one per channel. Lanes of items past the end run
// the point loop without loading anything, so every shuffle sees the whole warp.
//
// Index widths: a map's pixel index (< H_l * W_l) is int; anything multiplied
// by the batch, S, the queries or the channels is long long.

#include "channel_vectors.cuh"

#ifndef MSDA_BLOCK_SIZE
#error "compile with -DMSDA_BLOCK_SIZE=<threads per block> (kernels/ops/ms_deform_attn.py sets it)"
#endif

namespace {

struct Sizes {
    int batch, positions, queries, heads, channels, levels, points;
};

#define MSDA_SIZE_PARAMS \
    int batch, int positions, int queries, int heads, int channels, int levels, int points
#define MSDA_SIZES Sizes { batch, positions, queries, heads, channels, levels, points }

struct Lane {
    long long item;  // (n * Q + q) * M + m
    long long n;
    int head;
    int lane, lanes;  // this lane, lanes per item (a power of two <= 32)
    int vectors;      // D / VEC
    bool active;      // the item exists
};

template <int VEC>
__device__ __forceinline__ Lane lane_of(const Sizes& z) {
    Lane l;
    l.vectors = z.channels / VEC;
    l.lanes = lanes_for(l.vectors);
    l.lane = threadIdx.x % l.lanes;
    const long long item = static_cast<long long>(blockIdx.x) * (MSDA_BLOCK_SIZE / l.lanes) +
                           threadIdx.x / l.lanes;
    const long long items = static_cast<long long>(z.batch) * z.queries * z.heads;
    l.active = item < items;
    l.item = l.active ? item : 0;
    l.head = static_cast<int>(l.item % z.heads);
    l.n = l.item / (static_cast<long long>(z.queries) * z.heads);
    return l;
}

// B0 at pixel (y, x) of an H x W map: four corners (pixel index y*W + x, -1
// outside) and their bilinear weights (0 outside).
template <typename real>
struct Sample {
    bool in_range;  // false: B0 gives 0 and every gradient through it is 0
    real ly, lx;    // fractional parts
    int corner[4];  // (y0, x0), (y0, x1), (y1, x0), (y1, x1)
    real weight[4];
};

template <typename real>
__device__ __forceinline__ Sample<real> locate(real y, real x, int height, int width) {
    Sample<real> s;
    // Written as "inside", so that a NaN location lands outside: no NaN becomes an index.
    s.in_range = y > real(-1) && y < static_cast<real>(height) && x > real(-1) &&
                 x < static_cast<real>(width);
    if (!s.in_range) return s;
    const real y_floor = floor_of(y), x_floor = floor_of(x);
    s.ly = y - y_floor;
    s.lx = x - x_floor;
    const int y0 = static_cast<int>(y_floor), x0 = static_cast<int>(x_floor);
    const bool y0_in = y0 >= 0, y1_in = y0 + 1 < height;
    const bool x0_in = x0 >= 0, x1_in = x0 + 1 < width;
    const int row0 = y0 * width, row1 = row0 + width;
    const real hy = real(1) - s.ly, hx = real(1) - s.lx;
    s.corner[0] = y0_in && x0_in ? row0 + x0 : -1;
    s.corner[1] = y0_in && x1_in ? row0 + x0 + 1 : -1;
    s.corner[2] = y1_in && x0_in ? row1 + x0 : -1;
    s.corner[3] = y1_in && x1_in ? row1 + x0 + 1 : -1;
    s.weight[0] = s.corner[0] >= 0 ? hy * hx : real(0);
    s.weight[1] = s.corner[1] >= 0 ? hy * s.lx : real(0);
    s.weight[2] = s.corner[2] >= 0 ? s.ly * hx : real(0);
    s.weight[3] = s.corner[3] >= 0 ? s.ly * s.lx : real(0);
    return s;
}

// The softmax of an item's L*P logits, as max and 1/sum: a = exp(w - max) *
// inv_sum, in real (float32 for the storage types); without SOFTMAX a is w as given.
template <typename real>
struct Softmax {
    real max, inv_sum;
};

template <bool SOFTMAX, typename scalar_t, typename real = acc_t<scalar_t>>
__device__ __forceinline__ Softmax<real> softmax_of(const scalar_t* weights, int count) {
    Softmax<real> s{real(0), real(1)};
    if (!SOFTMAX) return s;
    s.max = to_acc(weights[0]);
    for (int k = 1; k < count; ++k) s.max = max_of(s.max, to_acc(weights[k]));
    real sum = 0;
    for (int k = 0; k < count; ++k) sum += exp_of(to_acc(weights[k]) - s.max);
    if constexpr (sizeof(real) == 4)
        s.inv_sum = __fdividef(1.f, sum);  // sum in [1, L*P]: exact to 2 ulp there
    else
        s.inv_sum = real(1) / sum;
    return s;
}

template <bool SOFTMAX, typename real>
__device__ __forceinline__ real attention(real weight, const Softmax<real>& s) {
    return SOFTMAX ? exp_of(weight - s.max) * s.inv_sum : weight;
}

}  // namespace

// output[n, q, m*D + d] = sum_l sum_p a(n, q, m, l, p) * B0(value_l[n, :, :, m, d], y, x).
template <typename scalar_t, bool SOFTMAX, int VEC>
__global__ void __launch_bounds__(MSDA_BLOCK_SIZE, 3)
ms_deform_attn_forward(const scalar_t* __restrict__ value,               // [N, S, M, D]
                       const long long* __restrict__ spatial_shapes,     // [L, 2]
                       const long long* __restrict__ level_start_index,  // [L]
                       const scalar_t* __restrict__ sampling_locations,  // [N, Q, M, L, P, 2]
                       const scalar_t* __restrict__ attention_weights,   // [N, Q, M, L, P]
                       scalar_t* __restrict__ output,                    // [N, Q, M*D]
                       MSDA_SIZE_PARAMS) {
    using real = acc_t<scalar_t>;
    const Sizes z = MSDA_SIZES;
    const Lane l = lane_of<VEC>(z);
    if (!l.active) return;  // no collectives in the forward
    const int row = z.heads * z.channels;  // elements per value position
    const int LP = z.levels * z.points;
    const scalar_t* weights = attention_weights + l.item * LP;
    const scalar_t* locations = sampling_locations + l.item * LP * 2;
    const Softmax<real> softmax = softmax_of<SOFTMAX>(weights, LP);
    const scalar_t* head_value =
        value + l.n * z.positions * static_cast<long long>(row) + l.head * z.channels;
    scalar_t* out = output + l.item * z.channels;
    for (int vector = l.lane; vector < l.vectors; vector += l.lanes) {
        real acc[VEC] = {};
        for (int level = 0; level < z.levels; ++level) {
            const int height = static_cast<int>(spatial_shapes[2 * level]);
            const int width = static_cast<int>(spatial_shapes[2 * level + 1]);
            const scalar_t* map = head_value + level_start_index[level] * row;
            for (int p = 0; p < z.points; ++p) {
                const int k = level * z.points + p;
                const Sample<real> s =
                    locate(to_acc(locations[2 * k + 1]) * height - real(0.5),
                           to_acc(locations[2 * k]) * width - real(0.5), height, width);
                if (!s.in_range) continue;
                const real a = attention<SOFTMAX>(to_acc(weights[k]), softmax);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    if (s.corner[q] < 0) continue;
                    real v[VEC];
                    load_vector<scalar_t, VEC>(
                        map + s.corner[q] * static_cast<long long>(row) + vector * VEC, v);
                    const real w = a * s.weight[q];
#pragma unroll
                    for (int c = 0; c < VEC; ++c) acc[c] += w * v[c];
                }
            }
        }
        store_vector<scalar_t, VEC>(out + vector * VEC, acc);
    }
}

// Gradients of ms_deform_attn_forward, in real. grad_value is a zeroed buffer
// of value's shape, or null: then grad_value_fixed is the zeroed fixed-point
// one (deterministic), or null too (no scatter); grad_sampling_locations and
// grad_attention_weights have their tensors' shapes, every element written
// once (with SOFTMAX, grad_attention_weights is the logits' gradient).
// At least 2 resident blocks (<= 128 registers): with the fixed-point path in,
// 3 (<= 85, as the forward) spilled the float64 and float32-vector
// instantiations on sm_90 and sm_80, and no minimum spilled them at 80
// registers; with 2, none spills (72-96 registers, 25-37.5 % occupancy).
template <typename scalar_t, bool SOFTMAX, int VEC>
__global__ void __launch_bounds__(MSDA_BLOCK_SIZE, 2)
ms_deform_attn_backward(const scalar_t* __restrict__ value,
                        const long long* __restrict__ spatial_shapes,
                        const long long* __restrict__ level_start_index,
                        const scalar_t* __restrict__ sampling_locations,
                        const scalar_t* __restrict__ attention_weights,
                        const scalar_t* __restrict__ grad_output,  // [N, Q, M*D]
                        acc_t<scalar_t>* __restrict__ grad_value,  // [N, S, M, D] or null
                        long long* __restrict__ grad_value_fixed,  // the same in fixed point, or null
                        double fixed_scale, int* __restrict__ fixed_status,
                        acc_t<scalar_t>* __restrict__ grad_sampling_locations,
                        acc_t<scalar_t>* __restrict__ grad_attention_weights,
                        MSDA_SIZE_PARAMS) {
    using real = acc_t<scalar_t>;
    const Sizes z = MSDA_SIZES;
    const Lane l = lane_of<VEC>(z);
    const int row = z.heads * z.channels;
    const int LP = z.levels * z.points;
    const scalar_t* weights = attention_weights + l.item * LP;
    const scalar_t* locations = sampling_locations + l.item * LP * 2;
    const Softmax<real> softmax =
        l.active ? softmax_of<SOFTMAX>(weights, LP) : Softmax<real>{real(0), real(1)};
    const long long head0 = l.n * z.positions * static_cast<long long>(row) + l.head * z.channels;
    const scalar_t* grad_out = grad_output + l.item * z.channels;
    real* grad_weights = grad_attention_weights + l.item * LP;
    const ScatterAdd<real> grad_values{grad_value, grad_value_fixed, fixed_scale, fixed_status};
    const bool scatter = grad_values.enabled();  // uniform across the launch

    for (int level = 0; level < z.levels; ++level) {
        const int height = static_cast<int>(spatial_shapes[2 * level]);
        const int width = static_cast<int>(spatial_shapes[2 * level + 1]);
        const long long map0 = head0 + level_start_index[level] * row;
        for (int p = 0; p < z.points; ++p) {
            const int k = level * z.points + p;
            real d_x = 0, d_y = 0, d_a = 0, a = 0;
            if (l.active) {
                const Sample<real> s =
                    locate(to_acc(locations[2 * k + 1]) * height - real(0.5),
                           to_acc(locations[2 * k]) * width - real(0.5), height, width);
                a = attention<SOFTMAX>(to_acc(weights[k]), softmax);
                if (s.in_range) {
                    real dot[4] = {0, 0, 0, 0};
                    for (int vector = l.lane; vector < l.vectors; vector += l.lanes) {
                        real grad[VEC];
                        load_vector<scalar_t, VEC>(grad_out + vector * VEC, grad);
#pragma unroll
                        for (int q = 0; q < 4; ++q) {
                            if (s.corner[q] < 0) continue;
                            const long long at =
                                map0 + s.corner[q] * static_cast<long long>(row) + vector * VEC;
                            real v[VEC];
                            load_vector<scalar_t, VEC>(value + at, v);
#pragma unroll
                            for (int c = 0; c < VEC; ++c) dot[q] += grad[c] * v[c];
                            if (scatter && s.weight[q] != real(0))
                                scatter_vector<VEC>(grad_values, at, a * s.weight[q], grad);
                        }
                    }
                    const real hy = real(1) - s.ly, hx = real(1) - s.lx;
                    d_y = hx * (dot[2] - dot[0]) + s.lx * (dot[3] - dot[1]);
                    d_x = hy * (dot[1] - dot[0]) + s.ly * (dot[3] - dot[2]);
                    d_a = s.weight[0] * dot[0] + s.weight[1] * dot[1] + s.weight[2] * dot[2] +
                          s.weight[3] * dot[3];
                }
            }
            d_x = sum_over_lanes(d_x, l.lanes);
            d_y = sum_over_lanes(d_y, l.lanes);
            d_a = sum_over_lanes(d_a, l.lanes);
            if (l.active && l.lane == 0) {
                // x = loc_x * W - 0.5: d/d loc_x = W * d/dx (likewise y).
                grad_sampling_locations[(l.item * LP + k) * 2] = a * d_x * width;
                grad_sampling_locations[(l.item * LP + k) * 2 + 1] = a * d_y * height;
                grad_weights[k] = d_a;
            }
        }
    }
    if (SOFTMAX && l.active && l.lane == 0) {
        // d / d w_k = a_k (g_k - sum_j a_j g_j), in place.
        real dot = 0;
        for (int k = 0; k < LP; ++k)
            dot += attention<SOFTMAX>(to_acc(weights[k]), softmax) * grad_weights[k];
        for (int k = 0; k < LP; ++k)
            grad_weights[k] = attention<SOFTMAX>(to_acc(weights[k]), softmax) *
                              (grad_weights[k] - dot);
    }
}
