// DCNv3 / DCNv4, the staged design: the vectorized design's lanes and
// vectors (dcnv3_vectorized.cu), with an item's offsets and masks staged once
// in shared memory and the tap count a template parameter.
// Semantics: shared/ops-semantics.md; layouts and sampling: dcnv3_common.cuh.
//
// An item is one (output pixel, group); L = min(next power of two of D / VEC,
// 32) lanes of one warp own it, lane l channel vectors l, l + L, ... (VEC as
// in the vectorized design: 16 bytes, or 1 on the scalar path). A block holds
// min(DCNV3_STAGED_ITEMS, DCNV3_BLOCK_SIZE / L) consecutive items, so
// blockDim.x = items * L (the host sets it). Items run (pixel, group) with
// the group fastest, so a block's offsets and masks are one contiguous range
// of each tensor (dcnv4: an item's 2P offsets and P masks are one run of 3P,
// read in one pass; the rows' padding is skipped): the block loads them once,
// coalesced, into shared memory, where every lane of an item reads them (a
// broadcast). With SOFTMAX_MASK the item's lanes split its taps, reduce max
// and sum by xor-shuffle and store the normalised mask in place: the softmax
// is computed once per item.
//
// TAPS (9: 3x3; 8: 3x3 with remove_center; 25: 5x5) sizes the shared arrays
// and makes the staging loops' divisions constant; any other tap count takes
// the vectorized design's runtime-tap kernels (the host picks). Shared rows
// are TAPS rounded up to odd words, so the items of a warp reading the same
// tap hit distinct banks.
//
// Backward: as the vectorized design's (per tap the lanes sum d/dx, d/dy, d/dm
// over their channels, an xor-shuffle butterfly gives the totals, grad_input
// by float32 or fixed-point atomics), except that the totals go to shared
// memory; the block then writes grad_offset / grad_mask coalesced, in the
// storage type (rounded once from float32, as the vectorized design's cast of
// its float32 buffers; no float32 buffers and no conversion pass).

#include "channel_vectors.cuh"
#include "dcnv3_common.cuh"

#ifndef DCNV3_BLOCK_SIZE
#error "compile with -DDCNV3_BLOCK_SIZE=<most threads per block> (kernels/ops/dcnv3.py sets it)"
#endif
#ifndef DCNV3_STAGED_ITEMS
#error "compile with -DDCNV3_STAGED_ITEMS=<most items per block> (kernels/ops/dcnv3.py sets it)"
#endif

namespace {

// Words per item in a shared array: TAPS, odd.
template <int TAPS>
constexpr int staged_row() {
    return TAPS % 2 ? TAPS : TAPS + 1;
}

// This thread's item and lane, and the block's range of items.
struct StagedLane {
    long long first_item;  // the block's first item
    int items;             // the block's items that exist (the last block may have fewer)
    int local;             // this thread's item within the block
    long long pixel, n;
    int group, ho, wo;
    int lane, lanes, vectors;
    bool active;  // local < items
};

template <int VEC>
__device__ __forceinline__ StagedLane staged_lane_of(const dcnv3::Geometry& g, int batch) {
    StagedLane l;
    l.vectors = g.group_channels / VEC;
    l.lanes = lanes_for(l.vectors);
    l.lane = threadIdx.x % l.lanes;
    l.local = threadIdx.x / l.lanes;
    const int per_block = blockDim.x / l.lanes;
    l.first_item = static_cast<long long>(blockIdx.x) * per_block;
    const long long all = static_cast<long long>(batch) * g.out_h * g.out_w * g.group;
    const long long left = all - l.first_item;
    l.items = left < per_block ? static_cast<int>(left) : per_block;
    l.active = l.local < l.items;
    const long long item = l.first_item + (l.active ? l.local : 0);
    l.group = static_cast<int>(item % g.group);
    l.pixel = item / g.group;
    l.wo = static_cast<int>(l.pixel % g.out_w);
    l.ho = static_cast<int>(l.pixel / g.out_w % g.out_h);
    l.n = l.pixel / (static_cast<long long>(g.out_h) * g.out_w);
    return l;
}

// Blocks of DCNV3_BLOCK_SIZE per SM the launch bounds ask for: 4 (<= 64
// registers, 50 % theoretical occupancy on sm_90); 3 for float64 (gradcheck
// only), which spills at 64.
template <typename scalar_t>
constexpr int min_blocks() {
    return sizeof(scalar_t) == 8 ? 3 : 4;
}

// One of the block's items, by its index within the block: (pixel, group).
struct ItemOf {
    long long pixel;
    int group;
};

__device__ __forceinline__ ItemOf item_of(const StagedLane& l, int group_count, int local) {
    const long long item = l.first_item + local;
    return ItemOf{item / group_count, static_cast<int>(item % group_count)};
}

template <typename real>
__device__ __forceinline__ real max_over_lanes(real value, int lanes) {
    for (int mask = lanes / 2; mask > 0; mask /= 2)
        value = max_of(value, __shfl_xor_sync(FULL_WARP, value, mask));
    return value;
}

// The block's offsets and masks into shared memory: x, y, m [items][staged_row<TAPS>()],
// then with SOFTMAX_MASK the logits turned into the softmax, once per item. Every
// thread of the block calls it (it holds barriers and shuffles).
template <int MODULATION, int TAPS, typename scalar_t, typename real>
__device__ __forceinline__ void stage_taps(const StagedLane& l, const dcnv3::Geometry& g,
                                           const dcnv3::Layout<MODULATION>& layout,
                                           const scalar_t* __restrict__ offset,
                                           const scalar_t* __restrict__ mask, real* x, real* y,
                                           real* m) {
    constexpr int ROW = staged_row<TAPS>();
    // Consecutive threads, consecutive elements: for dcnv3 one contiguous range
    // of each tensor; for dcnv4 an item's 2P offsets and P masks are one run of
    // 3P (one pass, so no sector is fetched twice).
    constexpr int PER_ITEM = MODULATION == dcnv3::FUSED_OFFSET_MASK ? 3 * TAPS : 2 * TAPS;
    for (int e = threadIdx.x; e < l.items * PER_ITEM; e += blockDim.x) {
        const int local = e / PER_ITEM, k = e % PER_ITEM;
        const ItemOf it = item_of(l, g.group, local);
        const real value = to_acc(offset[layout.offset_index(it.pixel, it.group, 0) + k]);
        if (k < 2 * TAPS)
            (k % 2 ? y : x)[local * ROW + k / 2] = value;
        else
            m[local * ROW + k - 2 * TAPS] = value;
    }
    if constexpr (MODULATION != dcnv3::FUSED_OFFSET_MASK) {
        for (int e = threadIdx.x; e < l.items * TAPS; e += blockDim.x) {
            const int local = e / TAPS, p = e % TAPS;
            const ItemOf it = item_of(l, g.group, local);
            m[local * ROW + p] = to_acc(mask[layout.mask_index(it.pixel, it.group, p)]);
        }
    }
    __syncthreads();
    if constexpr (MODULATION == dcnv3::SOFTMAX_MASK) {
        // Lane l takes taps l, l + L, ...; lanes of absent items shuffle zeros.
        real* logits = m + l.local * ROW;
        // Starting from one of the item's own logits needs no infinity.
        real largest = l.active ? logits[l.lane % TAPS] : 0.f;
        if (l.active)
            for (int p = l.lane; p < TAPS; p += l.lanes) largest = max_of(largest, logits[p]);
        largest = max_over_lanes(largest, l.lanes);
        real sum = 0.f;
        if (l.active)
            for (int p = l.lane; p < TAPS; p += l.lanes) sum += exp_of(logits[p] - largest);
        const real inv_sum = dcnv3::reciprocal_of_sum(sum_over_lanes(sum, l.lanes));
        if (l.active)
            for (int p = l.lane; p < TAPS; p += l.lanes)
                logits[p] = exp_of(logits[p] - largest) * inv_sum;
        __syncthreads();
    }
}

}  // namespace

// output[pixel, g*D + d] = sum_p m(g, p) * B0(input[n, :, :, g*D + d], y_p, x_p).
// The tap loop stays rolled: unrolled (fully, or by 2 or 3), ptxas hoists the
// taps' loads and spills at the 64-register bound (docs/kernels/dcnv3.md).
template <typename scalar_t, int MODULATION, int VEC, int TAPS>
__global__ void __launch_bounds__(DCNV3_BLOCK_SIZE, min_blocks<scalar_t>())
dcnv3_staged_forward(const scalar_t* __restrict__ input,  // [N, H, W, G*D]
                     const scalar_t* __restrict__ offset,
                     const scalar_t* __restrict__ mask,
                     scalar_t* __restrict__ output,       // [N, H_out, W_out, G*D]
                     DCNV3_GEOMETRY_PARAMS) {
    using real = acc_t<scalar_t>;
    constexpr int ROW = staged_row<TAPS>();
    __shared__ real staged_x[DCNV3_STAGED_ITEMS * ROW], staged_y[DCNV3_STAGED_ITEMS * ROW],
        staged_m[DCNV3_STAGED_ITEMS * ROW];
    const dcnv3::Geometry g = DCNV3_GEOMETRY;
    const dcnv3::Layout<MODULATION> layout(g);
    const StagedLane l = staged_lane_of<VEC>(g, batch);
    stage_taps<MODULATION, TAPS>(l, g, layout, offset, mask, staged_x, staged_y, staged_m);
    if (!l.active) return;  // no collectives after the staging
    const int C = g.channels();
    const scalar_t* in =
        input + l.n * g.height * static_cast<long long>(g.width) * C + l.group * g.group_channels;
    scalar_t* out = output + l.pixel * C + l.group * g.group_channels;
    const real* x = staged_x + l.local * ROW;
    const real* y = staged_y + l.local * ROW;
    const real* m = staged_m + l.local * ROW;
    for (int vector = l.lane; vector < l.vectors; vector += l.lanes) {
        real acc[VEC] = {};
#pragma unroll 1
        for (int p = 0; p < TAPS; ++p) {
            const dcnv3::Sample<real> s =
                dcnv3::locate(g, dcnv3::tap_of(g, l.ho, l.wo, p), x[p], y[p]);
            if (!s.in_range) continue;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                if (s.corner[q] < 0) continue;
                real v[VEC];
                load_vector<scalar_t, VEC>(in + s.corner[q] * static_cast<long long>(C) + vector * VEC, v);
                const real w = m[p] * s.weight[q];
#pragma unroll
                for (int k = 0; k < VEC; ++k) acc[k] += w * v[k];
            }
        }
        store_vector<scalar_t, VEC>(out + vector * VEC, acc);
    }
}

// Gradients of dcnv3_staged_forward; arguments as dcnv3_vectorized_backward's,
// except grad_offset / grad_mask in the storage type (dcnv4: one buffer in
// offset_mask's layout, its padding columns zeroed by the host).
template <typename scalar_t, int MODULATION, int VEC, int TAPS>
__global__ void __launch_bounds__(DCNV3_BLOCK_SIZE, min_blocks<scalar_t>())
dcnv3_staged_backward(const scalar_t* __restrict__ input,        // [N, H, W, G*D]
                      const scalar_t* __restrict__ offset,
                      const scalar_t* __restrict__ mask,
                      const scalar_t* __restrict__ grad_output,  // [N, H_out, W_out, G*D]
                      acc_t<scalar_t>* __restrict__ grad_input,  // [N, H, W, G*D] or null
                      long long* __restrict__ grad_input_fixed,  // the same in fixed point, or null
                      double fixed_scale, int* __restrict__ fixed_status,
                      scalar_t* grad_offset,
                      scalar_t* grad_mask,
                      DCNV3_GEOMETRY_PARAMS) {
    using real = acc_t<scalar_t>;
    constexpr int ROW = staged_row<TAPS>();
    __shared__ real staged_x[DCNV3_STAGED_ITEMS * ROW], staged_y[DCNV3_STAGED_ITEMS * ROW],
        staged_m[DCNV3_STAGED_ITEMS * ROW];
    // d out / d (dx, dy, m) per tap, the offset ones already times m * offset_scale.
    __shared__ real grad_x[DCNV3_STAGED_ITEMS * ROW], grad_y[DCNV3_STAGED_ITEMS * ROW],
        grad_m[DCNV3_STAGED_ITEMS * ROW];
    const dcnv3::Geometry g = DCNV3_GEOMETRY;
    const dcnv3::Layout<MODULATION> layout(g);
    const StagedLane l = staged_lane_of<VEC>(g, batch);
    stage_taps<MODULATION, TAPS>(l, g, layout, offset, mask, staged_x, staged_y, staged_m);
    const int C = g.channels();
    const long long channel0 =
        l.n * g.height * static_cast<long long>(g.width) * C + l.group * g.group_channels;
    const scalar_t* in = input + channel0;
    const scalar_t* grad_out = grad_output + l.pixel * C + l.group * g.group_channels;
    const ScatterAdd<real> grad_in =
        ScatterAdd<real>{grad_input, grad_input_fixed, fixed_scale, fixed_status}.shifted(
            channel0);
    const bool scatter = grad_in.enabled();  // uniform across the launch
    const int row = l.local * ROW;
    // Rolled, as the forward's (NVCC would unroll the constant trip count and
    // spill; so did keeping a lane's grad_output vector across the taps).
#pragma unroll 1
    for (int p = 0; p < TAPS; ++p) {
        real d_x = 0.f, d_y = 0.f, d_m = 0.f;
        const real m = l.active ? staged_m[row + p] : 0.f;
        if (l.active) {
            const dcnv3::Sample<real> s = dcnv3::locate(g, dcnv3::tap_of(g, l.ho, l.wo, p),
                                                        staged_x[row + p], staged_y[row + p]);
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
            grad_x[row + p] = scale * d_x;
            grad_y[row + p] = scale * d_y;
            grad_m[row + p] = d_m;
        }
    }
    __syncthreads();
    if constexpr (MODULATION == dcnv3::SOFTMAX_MASK) {
        // d / d l_p = m_p (g_p - sum_q m_q g_q), the item's lanes splitting its taps.
        real dot = 0.f;
        if (l.active)
            for (int p = l.lane; p < TAPS; p += l.lanes) dot += staged_m[row + p] * grad_m[row + p];
        dot = sum_over_lanes(dot, l.lanes);
        if (l.active)
            for (int p = l.lane; p < TAPS; p += l.lanes)
                grad_m[row + p] = staged_m[row + p] * (grad_m[row + p] - dot);
        __syncthreads();
    }
    // Written as staged: consecutive threads, consecutive elements (dcnv4:
    // grad_offset and grad_mask are one buffer, an item's 3P one run).
    constexpr int PER_ITEM = MODULATION == dcnv3::FUSED_OFFSET_MASK ? 3 * TAPS : 2 * TAPS;
    for (int e = threadIdx.x; e < l.items * PER_ITEM; e += blockDim.x) {
        const int local = e / PER_ITEM, k = e % PER_ITEM;
        const ItemOf it = item_of(l, g.group, local);
        const real value = k < 2 * TAPS ? (k % 2 ? grad_y : grad_x)[local * ROW + k / 2]
                                        : grad_m[local * ROW + k - 2 * TAPS];
        grad_offset[layout.offset_index(it.pixel, it.group, 0) + k] = from_acc<scalar_t>(value);
    }
    if constexpr (MODULATION != dcnv3::FUSED_OFFSET_MASK) {
        for (int e = threadIdx.x; e < l.items * TAPS; e += blockDim.x) {
            const int local = e / TAPS, p = e % TAPS;
            const ItemOf it = item_of(l, g.group, local);
            grad_mask[layout.mask_index(it.pixel, it.group, p)] =
                from_acc<scalar_t>(grad_m[local * ROW + p]);
        }
    }
}
