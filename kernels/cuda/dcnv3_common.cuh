// What the DCNv3/DCNv4 designs (dcnv3_direct.cu, dcnv3_vectorized.cu, dcnv3_staged.cu,
// dcnv3_shared_scatter.cu) share: scalar conversions, the deterministic scatter-add, the tap
// geometry, where the offsets and the mask of a tap live (three layouts), B0 sampling, the
// softmax over taps and the backward's tap loop of the designs that give a lane channel vectors.
// Semantics: shared/ops-semantics.md, "DCNv3 and DCNv4". Channels-last:
// input [N, H, W, G*D], output [N, H_out, W_out, G*D].
//
// Index widths: a map's pixel index (y * W + x, < H*W) and a pixel's
// offset/mask row fit in int (checked on the host); anything multiplied by
// the batch, the output pixel count or the channel count is long long.

#pragma once

#include "channel_vectors.cuh"
#include "deterministic_atomics.cuh"
#include "scalar_conversions.cuh"

namespace dcnv3 {

// Where the modulation of a tap is read from (the template argument MODULATION).
enum Modulation : int {
    MASK = 0,               // dcnv3: offset [.., G*P*2], mask [.., G*P], used as given
    SOFTMAX_MASK = 1,       // dcnv3 with softmax: mask holds logits, softmax over P per group
    FUSED_OFFSET_MASK = 2,  // dcnv4: offset_mask [.., M], group g at g*3P: 2P offsets then P masks
};

// Every size of a call; built once per thread from the kernel's int arguments.
struct Geometry {
    int height, width, group, group_channels;
    int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
    int out_h, out_w;
    bool remove_center;
    float offset_scale;

    __device__ __forceinline__ int channels() const { return group * group_channels; }
    __device__ __forceinline__ int taps() const {
        return kernel_h * kernel_w - (remove_center ? 1 : 0);
    }
};

// Offsets of tap p of group g are (dx, dy) at row[offset_index], row[offset_index + 1];
// its mask at row[mask_index]. Rows are per output pixel.
template <int MODULATION>
struct Layout {
    int offset_row, mask_row;  // elements per output pixel
    int offset_group, mask_group, mask_first;

    __device__ __forceinline__ explicit Layout(const Geometry& g) {
        const int P = g.taps();
        if (MODULATION == FUSED_OFFSET_MASK) {
            offset_row = mask_row = (g.group * P * 3 + 7) / 8 * 8;
            offset_group = mask_group = 3 * P;
            mask_first = 2 * P;
        } else {
            offset_row = 2 * g.group * P;
            mask_row = g.group * P;
            offset_group = 2 * P;
            mask_group = P;
            mask_first = 0;
        }
    }
    __device__ __forceinline__ long long offset_index(long long pixel, int g, int p) const {
        return pixel * offset_row + g * offset_group + 2 * p;
    }
    __device__ __forceinline__ long long mask_index(long long pixel, int g, int p) const {
        return pixel * mask_row + g * mask_group + mask_first + p;
    }
};

// The softmax of a (pixel, group)'s P mask logits, as max and 1/sum: m_p =
// exp(l_p - max) * inv_sum. In float32 whatever the dtype (double for
// float64: real is acc_t<scalar_t> throughout). For the other layouts m_p is
// the mask as given.
template <typename real>
struct Softmax {
    real max, inv_sum;
};

// 1 / sum for sum in [1, P] (the largest term is exp(0)): __fdividef is exact
// to 2 ulp there and, unlike '/', has no slow-path call (which spilled on sm_80).
__device__ __forceinline__ float reciprocal_of_sum(float sum) { return __fdividef(1.f, sum); }
__device__ __forceinline__ double reciprocal_of_sum(double sum) { return 1.0 / sum; }

template <int MODULATION, typename scalar_t>
__device__ __forceinline__ Softmax<acc_t<scalar_t>> softmax_of(const scalar_t* mask,
                                                               long long first, int taps) {
    using real = acc_t<scalar_t>;
    Softmax<real> s{0.f, 1.f};
    if (MODULATION != SOFTMAX_MASK) return s;
    s.max = to_acc(mask[first]);
    for (int p = 1; p < taps; ++p) s.max = max_of(s.max, to_acc(mask[first + p]));
    real sum = 0.f;
    for (int p = 0; p < taps; ++p) sum += exp_of(to_acc(mask[first + p]) - s.max);
    s.inv_sum = reciprocal_of_sum(sum);
    return s;
}

template <int MODULATION, typename real>
__device__ __forceinline__ real modulation(real mask_value, const Softmax<real>& s) {
    return MODULATION == SOFTMAX_MASK ? exp_of(mask_value - s.max) * s.inv_sum : mask_value;
}

// grad_mask[first .. first + P) holds d out / d m_p; with SOFTMAX_MASK it is
// turned in place into the gradient of the logits:
// d / d l_p = m_p (g_p - sum_q m_q g_q). Only the thread that wrote the row calls it.
template <int MODULATION, typename scalar_t>
__device__ __forceinline__ void finish_mask_gradient(acc_t<scalar_t>* grad_mask,
                                                     const scalar_t* mask, long long first,
                                                     int taps, const Softmax<acc_t<scalar_t>>& s) {
    if (MODULATION != SOFTMAX_MASK) return;
    acc_t<scalar_t> dot = 0.f;
    for (int p = 0; p < taps; ++p)
        dot += modulation<MODULATION>(to_acc(mask[first + p]), s) * grad_mask[first + p];
    for (int p = 0; p < taps; ++p)
        grad_mask[first + p] =
            modulation<MODULATION>(to_acc(mask[first + p]), s) * (grad_mask[first + p] - dot);
}

// Where tap p of output pixel (ho, wo) samples, before its offsets:
// x = base_x + (tap_x + dx) * offset_scale (likewise y). Taps run column-major:
// i over kernel_w outer, j over kernel_h inner, the centre skipped with remove_center.
struct Tap {
    float base_x, base_y, tap_x, tap_y;
};

__device__ __forceinline__ Tap tap_of(const Geometry& g, int ho, int wo, int p) {
    const int half_w = g.dilation_w * (g.kernel_w - 1) / 2;
    const int half_h = g.dilation_h * (g.kernel_h - 1) / 2;
    int raw = p;
    if (g.remove_center && raw >= (g.kernel_w / 2) * g.kernel_h + g.kernel_h / 2) ++raw;
    const int i = raw / g.kernel_h, j = raw % g.kernel_h;
    Tap t;
    t.base_x = static_cast<float>(wo * g.stride_w - g.pad_w + half_w);
    t.base_y = static_cast<float>(ho * g.stride_h - g.pad_h + half_h);
    t.tap_x = static_cast<float>(i * g.dilation_w - half_w);
    t.tap_y = static_cast<float>(j * g.dilation_h - half_h);
    return t;
}

// B0 at (y, x) of an H x W map: four corners (pixel index y*W + x, -1
// outside) and their bilinear weights (0 outside).
template <typename real>
struct Sample {
    bool in_range;  // false: B0 gives 0 and every gradient through it is 0
    real ly, lx;    // fractional parts
    int y0, x0;     // the first corner's row and column (its neighbours are +1)
    int corner[4];  // (y0, x0), (y0, x1), (y1, x0), (y1, x1)
    real weight[4];
};

// The tap's base and grid positions are small integers, exact in float.
template <typename real>
__device__ __forceinline__ Sample<real> locate(const Geometry& g, const Tap& t, real dx, real dy) {
    Sample<real> s;
    const real scale = g.offset_scale;
    const real x = static_cast<real>(t.base_x) + (static_cast<real>(t.tap_x) + dx) * scale;
    const real y = static_cast<real>(t.base_y) + (static_cast<real>(t.tap_y) + dy) * scale;
    // Written as "inside", so that a NaN offset lands outside: no NaN becomes an index.
    s.in_range = y > -1.f && y < static_cast<real>(g.height) && x > -1.f &&
                 x < static_cast<real>(g.width);
    if (!s.in_range) return s;
    const real y_floor = floor_of(y), x_floor = floor_of(x);
    s.ly = y - y_floor;
    s.lx = x - x_floor;
    const int y0 = static_cast<int>(y_floor), x0 = static_cast<int>(x_floor);
    s.y0 = y0;
    s.x0 = x0;
    const bool y0_in = y0 >= 0, y1_in = y0 + 1 < g.height;
    const bool x0_in = x0 >= 0, x1_in = x0 + 1 < g.width;
    const int row0 = y0 * g.width, row1 = row0 + g.width;
    const real hy = 1.f - s.ly, hx = 1.f - s.lx;
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

// One tap's gradients with respect to its sampling point and its
// modulation, before the modulation and offset_scale factors: given
// dot[q] = sum over the channels of grad_out * (value of corner q) (0 for a
// corner outside), adds d/dx, d/dy of sum_c grad_out * B0 and d/dm = sum_c grad_out * B0.
// Working on the four channel sums keeps one corner's values live at a time.
template <typename real>
__device__ __forceinline__ void add_tap_gradient(const Sample<real>& s, const real (&dot)[4],
                                                 real& d_x, real& d_y, real& d_m) {
    const real hy = 1.f - s.ly, hx = 1.f - s.lx;
    d_y += hx * (dot[2] - dot[0]) + s.lx * (dot[3] - dot[1]);
    d_x += hy * (dot[1] - dot[0]) + s.ly * (dot[3] - dot[2]);
    d_m += s.weight[0] * dot[0] + s.weight[1] * dot[1] + s.weight[2] * dot[2] +
           s.weight[3] * dot[3];
}

// One in-range tap's backward in the designs that give a lane channel vectors
// (VEC channels, 16-byte loads: channel_vectors.cuh): the lane owns vectors
// lane, lane + lanes, ... below `vectors` of its item's D channels; `in` and
// `grad_out` point at the item's image (input) or pixel (grad_output) and
// group, pixels `channels` = G*D apart. Adds the lane's share of
// d/dx, d/dy, d/dm (add_tap_gradient) and, with `scatter_enabled`, hands each
// corner's grad_input to scatter(s, q, at, vector, w, grad): corner q, its element
// `at` from `in`, the weight w = m * its bilinear weight (nonzero) and the
// vector's grad_output. The scatter is the designs' own (GlobalScatter, or a
// shared region first), a functor with a __forceinline__ operator(): the
// emulator's counters group a warp's accesses by call site, so the scatter's
// atomics must stay one site per unrolled corner, as written inline.
template <typename scalar_t, int VEC, typename real, typename Scatter>
__device__ __forceinline__ void add_vector_tap_gradient(const Sample<real>& s, real m,
                                                        const scalar_t* in,
                                                        const scalar_t* grad_out, int channels,
                                                        int lane, int lanes, int vectors,
                                                        bool scatter_enabled,
                                                        const Scatter& scatter, real& d_x,
                                                        real& d_y, real& d_m) {
    real dot[4] = {0.f, 0.f, 0.f, 0.f};
    for (int vector = lane; vector < vectors; vector += lanes) {
        real grad[VEC];
        load_vector<scalar_t, VEC>(grad_out + vector * VEC, grad);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            if (s.corner[q] < 0) continue;
            const long long at = s.corner[q] * static_cast<long long>(channels) + vector * VEC;
            real v[VEC];
            load_vector<scalar_t, VEC>(in + at, v);
#pragma unroll
            for (int k = 0; k < VEC; ++k) dot[q] += grad[k] * v[k];
            if (scatter_enabled && s.weight[q] != 0.f)
                scatter(s, q, at, vector, m * s.weight[q], grad);
        }
    }
    add_tap_gradient(s, dot, d_x, d_y, d_m);
}

// add_vector_tap_gradient's scatter straight to grad_input's atomics.
template <int VEC, typename real>
struct GlobalScatter {
    ScatterAdd<real> to;
    __device__ __forceinline__ void operator()(const Sample<real>&, int, long long at, int, real w,
                                               const real (&grad)[VEC]) const {
        scatter_vector<VEC>(to, at, w, grad);
    }
};

}  // namespace dcnv3

// The kernels' shared argument list (after the tensors), in this order.
#define DCNV3_GEOMETRY_PARAMS                                                                   \
    int batch, int height, int width, int group, int group_channels, int kernel_h,             \
        int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h,        \
        int dilation_w, int out_h, int out_w, int remove_center, float offset_scale
#define DCNV3_GEOMETRY                                                                          \
    dcnv3::Geometry {                                                                           \
        height, width, group, group_channels, kernel_h, kernel_w, stride_h, stride_w, pad_h,   \
            pad_w, dilation_h, dilation_w, out_h, out_w, remove_center != 0, offset_scale      \
    }
