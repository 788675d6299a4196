// Rule B0 sampling of the deformable convolutions (shared/ops-semantics.md):
// where one deformed tap samples the input and with which bilinear weights.
// Shared by the im2col design (deform_conv2d.cu) and the implicit GEMM design
// (deform_conv2d_implicit_gemm.cu).
#pragma once

#include "scalar_conversions.cuh"

namespace {

// Where one deformed tap samples the input, by rule B0; real = acc_t<scalar_t>.
template <typename real>
struct Sample {
    bool in_range;   // false: B0 gives 0 (y <= -1, y >= H, x <= -1 or x >= W)
    real ly, lx;     // fractional parts: the point is (y_low + ly, x_low + lx)
    int corner[4];   // y * W + x of (y_low, x_low), (y_low, x_high), (y_high, x_low),
                     // (y_high, x_high); -1 for a corner outside the map
    real weight[4];  // bilinear weight of each corner; 0 for a corner outside
};

// base_y / base_x: the undeformed position (ho * stride - pad + i * dilation),
// an exact integer. The range test uses y = base + d rounded to float:
// rounding is monotonic and -1, H are representable, so a point the test
// accepts is truly inside (a point within half an ulp of the border may be
// rejected; its value there is below that half ulp times the input anyway).
// The weights use the exact split d = floor(d) + frac: the integer part
// joins base in int arithmetic and frac = d - floor(d) is exact (Sterbenz)
// except for d in (-1, 0), where it is off by at most 2^-24. So the bilinear
// weights carry no error from the size of base (torchvision's
// y = base + d loses ulp(base) of the fraction).
template <typename real>
__device__ __forceinline__ Sample<real> locate(int base_y, int base_x, real dy, real dx,
                                               int height, int width) {
    Sample<real> s;
    const real y = static_cast<real>(base_y) + dy;
    const real x = static_cast<real>(base_x) + dx;
    // Written as "inside" so that a NaN offset lands outside: no NaN ever
    // becomes an index.
    s.in_range = y > -1.f && y < static_cast<real>(height) && x > -1.f &&
                 x < static_cast<real>(width);
    if (!s.in_range) return s;
    const real floor_dy = floor_of(dy);
    const real floor_dx = floor_of(dx);
    s.ly = dy - floor_dy;
    s.lx = dx - floor_dx;
    // in range: -1 <= y_low <= H - 1, likewise x_low; dy, dx are bounded.
    const int y_low = base_y + static_cast<int>(floor_dy);
    const int x_low = base_x + static_cast<int>(floor_dx);
    const bool y_low_in = y_low >= 0, y_high_in = y_low + 1 < height;
    const bool x_low_in = x_low >= 0, x_high_in = x_low + 1 < width;
    const int row_low = y_low * width, row_high = row_low + width;
    const real hy = 1.f - s.ly, hx = 1.f - s.lx;
    s.corner[0] = y_low_in && x_low_in ? row_low + x_low : -1;
    s.corner[1] = y_low_in && x_high_in ? row_low + x_low + 1 : -1;
    s.corner[2] = y_high_in && x_low_in ? row_high + x_low : -1;
    s.corner[3] = y_high_in && x_high_in ? row_high + x_low + 1 : -1;
    s.weight[0] = s.corner[0] >= 0 ? hy * hx : 0.f;
    s.weight[1] = s.corner[1] >= 0 ? hy * s.lx : 0.f;
    s.weight[2] = s.corner[2] >= 0 ? s.ly * hx : 0.f;
    s.weight[3] = s.corner[3] >= 0 ? s.ly * s.lx : 0.f;
    return s;
}

}  // namespace
