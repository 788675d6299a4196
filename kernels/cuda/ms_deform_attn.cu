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
// Backward: per point, each lane sums d/dx, d/dy, d/da over its channels; an
// xor-shuffle butterfly over the lanes gives the totals and lane 0 writes
// grad_sampling_locations and grad_attention_weights once (no atomics).
// grad_value by float32 atomics into a float32 buffer (points of many
// queries hit the same pixel). Lanes of items past the end run the point
// loop without loading anything, so every shuffle sees the whole warp.
//
// Index widths: a map's pixel index (< H_l * W_l) is int; anything multiplied
// by the batch, S, the queries or the channels is long long.

#include "channel_vectors.cuh"
#include "scalar_conversions.cuh"

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
struct Sample {
    bool in_range;  // false: B0 gives 0 and every gradient through it is 0
    float ly, lx;   // fractional parts
    int corner[4];  // (y0, x0), (y0, x1), (y1, x0), (y1, x1)
    float weight[4];
};

__device__ __forceinline__ Sample locate(float y, float x, int height, int width) {
    Sample s;
    // Written as "inside", so that a NaN location lands outside: no NaN becomes an index.
    s.in_range = y > -1.f && y < static_cast<float>(height) && x > -1.f &&
                 x < static_cast<float>(width);
    if (!s.in_range) return s;
    const float y_floor = floorf(y), x_floor = floorf(x);
    s.ly = y - y_floor;
    s.lx = x - x_floor;
    const int y0 = static_cast<int>(y_floor), x0 = static_cast<int>(x_floor);
    const bool y0_in = y0 >= 0, y1_in = y0 + 1 < height;
    const bool x0_in = x0 >= 0, x1_in = x0 + 1 < width;
    const int row0 = y0 * width, row1 = row0 + width;
    const float hy = 1.f - s.ly, hx = 1.f - s.lx;
    s.corner[0] = y0_in && x0_in ? row0 + x0 : -1;
    s.corner[1] = y0_in && x1_in ? row0 + x0 + 1 : -1;
    s.corner[2] = y1_in && x0_in ? row1 + x0 : -1;
    s.corner[3] = y1_in && x1_in ? row1 + x0 + 1 : -1;
    s.weight[0] = s.corner[0] >= 0 ? hy * hx : 0.f;
    s.weight[1] = s.corner[1] >= 0 ? hy * s.lx : 0.f;
    s.weight[2] = s.corner[2] >= 0 ? s.ly * hx : 0.f;
    s.weight[3] = s.corner[3] >= 0 ? s.ly * s.lx : 0.f;
    return s;
}

// The softmax of an item's L*P logits, as max and 1/sum: a = exp(w - max) *
// inv_sum, in float32 whatever the dtype; without SOFTMAX a is w as given.
struct Softmax {
    float max, inv_sum;
};

template <bool SOFTMAX, typename scalar_t>
__device__ __forceinline__ Softmax softmax_of(const scalar_t* weights, int count) {
    Softmax s{0.f, 1.f};
    if (!SOFTMAX) return s;
    s.max = to_float(weights[0]);
    for (int k = 1; k < count; ++k) s.max = fmaxf(s.max, to_float(weights[k]));
    float sum = 0.f;
    for (int k = 0; k < count; ++k) sum += expf(to_float(weights[k]) - s.max);
    s.inv_sum = __fdividef(1.f, sum);  // sum in [1, L*P]: exact to 2 ulp there
    return s;
}

template <bool SOFTMAX>
__device__ __forceinline__ float attention(float weight, const Softmax& s) {
    return SOFTMAX ? expf(weight - s.max) * s.inv_sum : weight;
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
    const Sizes z = MSDA_SIZES;
    const Lane l = lane_of<VEC>(z);
    if (!l.active) return;  // no collectives in the forward
    const int row = z.heads * z.channels;  // elements per value position
    const int LP = z.levels * z.points;
    const scalar_t* weights = attention_weights + l.item * LP;
    const scalar_t* locations = sampling_locations + l.item * LP * 2;
    const Softmax softmax = softmax_of<SOFTMAX>(weights, LP);
    const scalar_t* head_value =
        value + l.n * z.positions * static_cast<long long>(row) + l.head * z.channels;
    scalar_t* out = output + l.item * z.channels;
    for (int vector = l.lane; vector < l.vectors; vector += l.lanes) {
        float acc[VEC] = {};
        for (int level = 0; level < z.levels; ++level) {
            const int height = static_cast<int>(spatial_shapes[2 * level]);
            const int width = static_cast<int>(spatial_shapes[2 * level + 1]);
            const scalar_t* map = head_value + level_start_index[level] * row;
            for (int p = 0; p < z.points; ++p) {
                const int k = level * z.points + p;
                const Sample s = locate(to_float(locations[2 * k + 1]) * height - 0.5f,
                                        to_float(locations[2 * k]) * width - 0.5f, height, width);
                if (!s.in_range) continue;
                const float a = attention<SOFTMAX>(to_float(weights[k]), softmax);
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    if (s.corner[q] < 0) continue;
                    float v[VEC];
                    load_vector<scalar_t, VEC>(
                        map + s.corner[q] * static_cast<long long>(row) + vector * VEC, v);
                    const float w = a * s.weight[q];
#pragma unroll
                    for (int c = 0; c < VEC; ++c) acc[c] += w * v[c];
                }
            }
        }
        store_vector<scalar_t, VEC>(out + vector * VEC, acc);
    }
}

// Gradients of ms_deform_attn_forward. grad_value is a zeroed float32 buffer
// of value's shape (or null: no scatter); grad_sampling_locations and
// grad_attention_weights are float32 of their tensors' shapes, every element
// written once (with SOFTMAX, grad_attention_weights is the logits' gradient).
// No minimum of resident blocks: with 3 (<= 85 registers, as the forward) ptxas
// spilled the fused-softmax half / bfloat16 vector instantiations on sm_90 and
// sm_80; without, sm_90 has none and sm_80 keeps 4-8 bytes (80 registers either way).
template <typename scalar_t, bool SOFTMAX, int VEC>
__global__ void __launch_bounds__(MSDA_BLOCK_SIZE)
ms_deform_attn_backward(const scalar_t* __restrict__ value,
                        const long long* __restrict__ spatial_shapes,
                        const long long* __restrict__ level_start_index,
                        const scalar_t* __restrict__ sampling_locations,
                        const scalar_t* __restrict__ attention_weights,
                        const scalar_t* __restrict__ grad_output,  // [N, Q, M*D]
                        float* __restrict__ grad_value,
                        float* __restrict__ grad_sampling_locations,
                        float* __restrict__ grad_attention_weights,
                        MSDA_SIZE_PARAMS) {
    const Sizes z = MSDA_SIZES;
    const Lane l = lane_of<VEC>(z);
    const int row = z.heads * z.channels;
    const int LP = z.levels * z.points;
    const scalar_t* weights = attention_weights + l.item * LP;
    const scalar_t* locations = sampling_locations + l.item * LP * 2;
    const Softmax softmax = l.active ? softmax_of<SOFTMAX>(weights, LP) : Softmax{0.f, 1.f};
    const long long head0 = l.n * z.positions * static_cast<long long>(row) + l.head * z.channels;
    const scalar_t* grad_out = grad_output + l.item * z.channels;
    float* grad_weights = grad_attention_weights + l.item * LP;
    const bool scatter = grad_value != nullptr;  // uniform across the launch

    for (int level = 0; level < z.levels; ++level) {
        const int height = static_cast<int>(spatial_shapes[2 * level]);
        const int width = static_cast<int>(spatial_shapes[2 * level + 1]);
        const long long map0 = head0 + level_start_index[level] * row;
        for (int p = 0; p < z.points; ++p) {
            const int k = level * z.points + p;
            float d_x = 0.f, d_y = 0.f, d_a = 0.f, a = 0.f;
            if (l.active) {
                const Sample s = locate(to_float(locations[2 * k + 1]) * height - 0.5f,
                                        to_float(locations[2 * k]) * width - 0.5f, height, width);
                a = attention<SOFTMAX>(to_float(weights[k]), softmax);
                if (s.in_range) {
                    float dot[4] = {0.f, 0.f, 0.f, 0.f};
                    for (int vector = l.lane; vector < l.vectors; vector += l.lanes) {
                        float grad[VEC];
                        load_vector<scalar_t, VEC>(grad_out + vector * VEC, grad);
#pragma unroll
                        for (int q = 0; q < 4; ++q) {
                            if (s.corner[q] < 0) continue;
                            const long long at =
                                map0 + s.corner[q] * static_cast<long long>(row) + vector * VEC;
                            float v[VEC];
                            load_vector<scalar_t, VEC>(value + at, v);
#pragma unroll
                            for (int c = 0; c < VEC; ++c) dot[q] += grad[c] * v[c];
                            if (scatter && s.weight[q] != 0.f)
                                scatter_vector<VEC>(grad_value + at, a * s.weight[q], grad);
                        }
                    }
                    const float hy = 1.f - s.ly, hx = 1.f - s.lx;
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
        float dot = 0.f;
        for (int k = 0; k < LP; ++k)
            dot += attention<SOFTMAX>(to_float(weights[k]), softmax) * grad_weights[k];
        for (int k = 0; k < LP; ++k)
            grad_weights[k] = attention<SOFTMAX>(to_float(weights[k]), softmax) *
                              (grad_weights[k] - dot);
    }
}
