"""The float64 references of the RoI pooling family.

Independent checks, none of which reads the reference's geometry code:

- torchvision.ops.roi_align in float64, aligned or not, forward and input
  gradient, over many random configurations (RoIs inside, across and outside
  the map, every sampling ratio, negative ones adaptive); deform_roi_pool with
  zero offsets equals the aligned one;
- torchvision.ops.ps_roi_align on RoIs moved by hand, for deform_psroi_pool
  with no_trans;
- tiny examples computed by hand from the contract's B1 and B2 rules, C's
  round, the part-cell, class and channel mapping;
- finite differences (gradcheck) for the offset, mask and trans gradients;
- every argument error of the issue's list names the argument.
"""

from __future__ import annotations

import random

import pytest
import torch
import torchvision

from kernels.reference.deform_psroi_pool import c_round, deform_psroi_pool
from kernels.reference.deform_roi_pool import deform_roi_pool, modulated_deform_roi_pool
from kernels.reference.roi_align import roi_align

F64 = torch.float64


def assert_close(actual, expected, name, tol=1e-12):
    actual, expected = actual.detach(), expected.detach()
    error = float((actual - expected).abs().max())
    scale = float(expected.abs().max()) or 1.0
    assert error <= tol * scale, f"{name}: max error {error:.3g} (scale {scale:.3g})"


def random_rois(rng: random.Random, count, images, extent_h, extent_w, spill=0.3):
    """[count, 5] float64 RoIs, corners up to ``spill`` of the extent outside it."""
    rows = []
    for k in range(count):
        xs = sorted(rng.uniform(-spill * extent_w, (1 + spill) * extent_w) for _ in range(2))
        ys = sorted(rng.uniform(-spill * extent_h, (1 + spill) * extent_h) for _ in range(2))
        rows.append([k % images, xs[0], ys[0], xs[1], ys[1]])
    return torch.tensor(rows, dtype=F64)


def roi_args(pooled_h=1, pooled_w=1, spatial_scale=1.0, sampling_ratio=1):
    return dict(pooled_h=pooled_h, pooled_w=pooled_w, spatial_scale=spatial_scale,
                sampling_ratio=sampling_ratio)


def ps_args(**overrides):
    args = dict(spatial_scale=1.0, output_dim=1, group_size=1, pooled_size=1, part_size=1,
                sample_per_part=1, trans_std=0.1, no_trans=True)
    args.update(overrides)
    return args


# --- roi_align and deform_roi_pool against torchvision ----------------------------

@pytest.mark.parametrize("seed", range(12))
def test_roi_align_is_torchvision_aligned(seed):
    rng = random.Random(seed)
    images, channels, height, width = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 9), rng.randint(1, 9)
    scale = rng.choice([1.0, 0.5, 0.25, 0.3])
    pooled = (rng.randint(1, 4), rng.randint(1, 4))
    ratio = rng.randint(0, 3)
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(images, channels, height, width, dtype=F64, generator=generator, requires_grad=True)
    rois = random_rois(rng, 7, images, height / scale, width / scale)
    args = roi_args(*pooled, scale, ratio)
    ours = roi_align(input, rois, **args)
    theirs = torchvision.ops.roi_align(input, rois, pooled, scale, ratio, aligned=True)
    assert_close(ours, theirs, "output")
    grad_output = torch.randn(ours.shape, dtype=F64, generator=generator)
    ours_grad, = torch.autograd.grad(ours, input, grad_output)
    theirs_grad, = torch.autograd.grad(theirs, input, grad_output)
    assert_close(ours_grad, theirs_grad, "grad_input")
    # No offset, zero offsets and a mask of ones are all roi_align.
    zero = torch.zeros(rois.shape[0], 2, *pooled, dtype=F64)
    ones = torch.ones(rois.shape[0], 1, *pooled, dtype=F64)
    assert_close(deform_roi_pool(input, rois, zero, **args, gamma=0.7), theirs, "deform, zero offset")
    assert_close(modulated_deform_roi_pool(input, rois, zero, ones, **args), theirs, "modulated")


@pytest.mark.parametrize("seed", range(6))
def test_roi_align_not_aligned_is_torchvisions(seed):
    """aligned=False (no -0.5, sides clamped at 1) and sampling_ratio <= 0 (adaptive),
    with tiny RoIs where the clamp acts."""
    rng = random.Random(100 + seed)
    images, channels, height, width = rng.randint(1, 3), rng.randint(1, 4), rng.randint(2, 9), rng.randint(2, 9)
    scale = rng.choice([1.0, 0.5, 0.3])
    pooled = (rng.randint(1, 4), rng.randint(1, 4))
    ratio = rng.choice([-1, 0, 2])
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(images, channels, height, width, dtype=F64, generator=generator, requires_grad=True)
    rois = random_rois(rng, 7, images, height / scale, width / scale)
    rois[::3, 3:] = rois[::3, 1:3] + 0.4  # sides of 0.4 image pixels
    ours = roi_align(input, rois, **roi_args(*pooled, scale, ratio), aligned=False)
    theirs = torchvision.ops.roi_align(input, rois, pooled, scale, ratio, aligned=False)
    assert_close(ours, theirs, "output")
    grad_output = torch.randn(ours.shape, dtype=F64, generator=generator)
    ours_grad, = torch.autograd.grad(ours, input, grad_output)
    theirs_grad, = torch.autograd.grad(theirs, input, grad_output)
    assert_close(ours_grad, theirs_grad, "grad_input")


def test_boxes_per_image_and_empty_cases():
    """A list of [L, 4] boxes is the [K, 5] rows; K = 0 and C = 0 give empty
    outputs with zero gradients (torchvision's shapes)."""
    generator = torch.Generator().manual_seed(3)
    input = torch.randn(2, 3, 6, 7, dtype=F64, generator=generator, requires_grad=True)
    boxes = [torch.tensor([[0.5, 1.0, 4.0, 5.0]], dtype=F64),
             torch.tensor([[1.5, 0.0, 6.0, 3.5], [2.0, 2.0, 3.0, 6.0]], dtype=F64)]
    rows = torch.tensor([[0, 0.5, 1.0, 4.0, 5.0], [1, 1.5, 0.0, 6.0, 3.5], [1, 2.0, 2.0, 3.0, 6.0]],
                        dtype=F64)
    args = roi_args(2, 3, 1.0, 2)
    assert torch.equal(roi_align(input, boxes, **args), roi_align(input, rows, **args))
    assert_close(roi_align(input, boxes, **args), torchvision.ops.roi_align(input, boxes, (2, 3), 1.0, 2,
                                                                             aligned=True), "boxes")
    for empty_input, empty_rois in ((input, rows[:0]), (input[:, :0], rows)):
        out = roi_align(empty_input, empty_rois, **args)
        expected = torchvision.ops.roi_align(empty_input.detach(), empty_rois, (2, 3), 1.0, 2, aligned=True)
        assert out.shape == expected.shape
        grad, = torch.autograd.grad(out.sum(), input)
        assert not grad.any()


def test_modulated_is_deform_times_mask():
    generator = torch.Generator().manual_seed(1)
    input = torch.randn(2, 3, 6, 7, dtype=F64, generator=generator)
    rois = random_rois(random.Random(1), 5, 2, 6, 7)
    offset = torch.rand(5, 2, 2, 3, dtype=F64, generator=generator) - 0.5
    mask = torch.rand(5, 1, 2, 3, dtype=F64, generator=generator)
    args = roi_args(2, 3, 1.0, 0)
    expected = deform_roi_pool(input, rois, offset, **args, gamma=0.3) * mask
    assert_close(modulated_deform_roi_pool(input, rois, offset, mask, **args, gamma=0.3), expected, "output")


def test_offset_moves_a_bin_by_gamma_times_the_roi_size():
    # One bin, one sample: RoI [1, 3] × [1, 5] (scale 1) samples at its centre
    # (x, y) = (2 - 0.5, 3 - 0.5); offset (0.25, -0.125) with gamma 0.5 moves it by
    # (0.5·2·0.25, 0.5·4·(-0.125)) = (0.25, -0.25) to (1.75, 2.25).
    input = torch.arange(30, dtype=F64).view(1, 1, 5, 6)  # value = 6·y + x
    rois = torch.tensor([[0, 1, 1, 3, 5]], dtype=F64)
    offset = torch.tensor([0.25, -0.125], dtype=F64).view(1, 2, 1, 1)
    out = deform_roi_pool(input, rois, offset, **roi_args(), gamma=0.5)
    assert float(out) == pytest.approx(6 * 2.25 + 1.75)


# --- B1 by hand ---------------------------------------------------------------

def b1_value(input, y, x):
    """One sample of deform_roi_pool at (y, x): a zero-size RoI at (x + 0.5, y + 0.5),
    one bin, a 1×1 grid."""
    rois = torch.tensor([[0, x + 0.5, y + 0.5, x + 0.5, y + 0.5]], dtype=F64)
    return float(roi_align(input, rois, **roi_args()))


@pytest.mark.parametrize(
    "y, x, expected",
    [
        (-1.0, 2.0, 2.0),          # y = -1 exactly: inside, clamped to row 0
        (-1.0 - 2**-20, 2.0, 0.0),  # just below -1: 0
        (4.0, 2.0, 32.0),          # y = H exactly: row H-1
        (4.0 + 2**-20, 2.0, 0.0),   # just above H: 0
        (3.5, 2.0, 32.0),          # y_low = 3 >= H-1: y_low = y_high = H-1, y = H-1
        (1.25, 5.5, 10 * 1.25 + 5.0),  # x beyond W-1 = 5: column 5; y blended
        (-0.5, -0.75, 0.0),        # both clamped to 0: pixel (0, 0)
        (1.5, 2.25, 17.25),        # plain bilinear: 10·1.5 + 2.25
        (2.0, 6.0, 25.0),          # x = W exactly: column W-1
        (2.0, 6.0 + 2**-20, 0.0),   # past W: 0
    ],
)
def test_b1_edges_by_hand(y, x, expected):
    input = (10 * torch.arange(4, dtype=F64)[:, None] + torch.arange(6, dtype=F64)).view(1, 1, 4, 6)
    assert b1_value(input, y, x) == pytest.approx(expected, abs=1e-12)


def test_b1_clamped_coordinate_has_no_offset_gradient():
    # Sample at y in the band [-1, 0): clamped to 0, so d/dy = 0 (mmcv differs here).
    # value = 6·y + x; the RoI [2, 3] × [-1, 1] (1 × 2) samples its centre (y, x) = (-0.5, 2).
    input = torch.arange(24, dtype=F64).view(1, 1, 4, 6)
    offset = torch.zeros(1, 2, 1, 1, dtype=F64, requires_grad=True)
    rois = torch.tensor([[0, 2.0, -1.0, 3.0, 1.0]], dtype=F64)
    out = deform_roi_pool(input, rois, offset, **roi_args(), gamma=0.1)
    grad, = torch.autograd.grad(out.sum(), offset)
    # d/dx = gamma·roi_w·(value slope 1); d/dy = 0 although the map's slope is 6.
    assert float(grad[0, 1]) == 0.0 and float(grad[0, 0]) == pytest.approx(0.1 * 1.0 * 1.0)


def test_empty_adaptive_grid_gives_zero():
    # A zero-size RoI with sampling_ratio 0 has a 0×0 grid: the sum of nothing over 1.
    input = torch.ones(1, 2, 5, 5, dtype=F64)
    rois = torch.tensor([[0, 2.0, 2.0, 2.0, 2.0], [0, 2.0, 2.0, 2.0, 4.0]], dtype=F64)
    out = roi_align(input, rois, **roi_args(2, 2, 1.0, 0))
    assert torch.equal(out[0], torch.zeros(2, 2, 2, dtype=F64))
    assert torch.equal(out[1], torch.zeros(2, 2, 2, dtype=F64))  # zero width: 1×0 grid


def test_adaptive_grid_is_ceil_of_the_bin_size():
    # roi_w = 2.5 over 1 bin: ceil(2.5) = 3 samples at start + (i + 0.5)·2.5/3.
    input = torch.arange(8, dtype=F64).view(1, 1, 1, 8)  # value = x
    rois = torch.tensor([[0, 1.0, 0.0, 3.5, 1.0]], dtype=F64)  # roi_h = 1: one row at y = 0
    out = roi_align(input, rois, **roi_args(sampling_ratio=0))
    xs = [0.5 + (i + 0.5) * 2.5 / 3 for i in range(3)]
    assert float(out) == pytest.approx(sum(xs) / 3)


# --- deform_psroi_pool -----------------------------------------------------------

def test_c_round_rounds_halves_away_from_zero():
    values = torch.tensor([2.5, -2.5, 0.5, -0.5, 1.4999, 3.5, -3.5], dtype=F64)
    assert c_round(values).tolist() == [3.0, -3.0, 1.0, -1.0, 1.0, 4.0, -4.0]
    assert torch.round(values)[:2].tolist() == [2.0, -2.0]  # why torch.round is not it


def test_psroi_rounds_roi_corners_the_c_way():
    # x1 = x2 = 2.5 rounds to 3: one bin [2.5, 3.5), one sample at 2.5 = 3 - 0.5.
    input = torch.arange(6, dtype=F64).view(1, 1, 1, 6)
    rois = torch.tensor([[0, 2.5, 0.0, 2.5, 0.0]], dtype=F64)
    assert float(deform_psroi_pool(input, rois, None, **ps_args())) == pytest.approx(2.5)
    rois = torch.tensor([[0, 1.5, 0.0, 1.5, 0.0]], dtype=F64)  # 1.5 -> 2 (torch.round: 2 too)
    assert float(deform_psroi_pool(input, rois, None, **ps_args())) == pytest.approx(1.5)


def test_b2_skips_samples_outside_and_does_not_count_them():
    # Row 0, x1 = x2 = 6 = W: bin [5.5, 6.5), two samples at 5.5 (= W - 0.5: counted,
    # clamped to column 5) and 6.0 (> W - 0.5: skipped). Mean over 1, not 2.
    input = (torch.arange(6, dtype=F64) + 1).view(1, 1, 1, 6)
    rois = torch.tensor([[0, 6.0, 0.0, 6.0, 0.0]], dtype=F64)
    out = deform_psroi_pool(input, rois, None, **ps_args(sample_per_part=2))
    assert float(out) == pytest.approx(6.0)
    # Every sample outside: count 0, the bin is 0.
    rois = torch.tensor([[0, 9.0, 0.0, 9.0, 0.0]], dtype=F64)
    assert float(deform_psroi_pool(input, rois, None, **ps_args(sample_per_part=2))) == 0.0
    # x = -0.5 exactly counts (clamped to 0); y likewise.
    rois = torch.tensor([[0, 0.0, 0.0, 0.0, 0.0]], dtype=F64)
    assert float(deform_psroi_pool(input, rois, None, **ps_args())) == pytest.approx(1.0)


def test_psroi_minimum_roi_size_and_sub_samples():
    # scale 1/16: a one-pixel RoI is 1/16 wide, below 0.1: roi_w = 0.1, sub_w = 0.05.
    input = torch.arange(6, dtype=F64).view(1, 1, 1, 6)  # value = x
    rois = torch.tensor([[0, 32.0, 0.0, 32.0, 0.0]], dtype=F64)  # start_x = 2 - 0.5
    out = deform_psroi_pool(input, rois, None, **ps_args(spatial_scale=1 / 16, sample_per_part=2))
    assert float(out) == pytest.approx(1.5 + 0.05 / 2)


def test_psroi_channel_mapping_and_group_cells():
    # Channel c holds the constant c: the output names the channel each bin reads.
    # group_size 2, pooled_size 3: gh = floor(ph·2/3) = 0, 0, 1.
    output_dim, group_size, pooled = 2, 2, 3
    channels = output_dim * group_size**2
    input = torch.arange(channels, dtype=F64).view(1, channels, 1, 1).expand(1, channels, 4, 4).contiguous()
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], dtype=F64)
    out = deform_psroi_pool(input, rois, None, **ps_args(output_dim=output_dim, group_size=group_size,
                                                         pooled_size=pooled, part_size=pooled))
    group = [0, 0, 1]
    expected = torch.tensor([[[(ctop * group_size + group[ph]) * group_size + group[pw] for pw in range(3)]
                              for ph in range(3)] for ctop in range(output_dim)], dtype=F64)
    assert_close(out[0], expected, "channels read")  # blends of a constant map, up to rounding


def test_psroi_part_cells_and_classes():
    # pooled 3, part 2: part_h = floor(ph·2/3) = 0, 0, 1. output_dim 4, 2 classes:
    # ctop 0, 1 are class 0 and ctop 2, 3 class 1. Moving only class 1's cell
    # (part_h, part_w) = (1, 0) in x changes exactly bins (2, 0) and (2, 1) of ctop 2, 3.
    generator = torch.Generator().manual_seed(3)
    input = torch.randn(1, 4 * 9, 8, 8, dtype=F64, generator=generator)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 6.0]], dtype=F64)
    args = ps_args(output_dim=4, group_size=3, pooled_size=3, part_size=2, sample_per_part=2,
                   no_trans=False, trans_std=0.1)
    trans = torch.zeros(1, 4, 2, 2, dtype=F64)
    base = deform_psroi_pool(input, rois, trans, **args)
    assert torch.equal(base, deform_psroi_pool(input, rois, None, **{**args, "no_trans": True}))
    trans[0, 2, 1, 0] = 1.0  # class 1, x, part cell (1, 0)
    moved = deform_psroi_pool(input, rois, trans, **args)
    changed = (moved != base)[0]
    expected = torch.zeros(4, 3, 3, dtype=torch.bool)
    expected[2:, 2, :2] = True  # bins with part_h = 1, part_w = 0
    assert torch.equal(changed, expected)


def test_psroi_no_trans_ignores_trans():
    generator = torch.Generator().manual_seed(4)
    input = torch.randn(2, 2 * 4, 6, 7, dtype=F64, generator=generator)
    rois = random_rois(random.Random(4), 5, 2, 6, 7)
    trans = torch.randn(5, 2, 2, 2, dtype=F64, generator=generator)
    args = ps_args(output_dim=2, group_size=2, pooled_size=2, part_size=2, sample_per_part=2)
    assert torch.equal(deform_psroi_pool(input, rois, trans, **args),
                       deform_psroi_pool(input, rois, None, **args))


@pytest.mark.parametrize("seed", range(4))
def test_psroi_no_trans_is_ps_roi_align_on_moved_rois(seed):
    # Integer RoIs inside the map: deform_psroi_pool samples at start + i·sub from the
    # corners round(x1)·s − 0.5 and (round(x2) + 1)·s − 0.5; ps_roi_align at
    # start' + (i + 0.5)·sub from x1'·s − 0.5: x1' = x1 − sub/(2s), x2' = x1' + roi_w/s.
    rng = random.Random(seed)
    scale, pooled, samples, output_dim = 0.5, rng.randint(1, 4), rng.randint(1, 3), 2
    height, width = 9, 11
    generator = torch.Generator().manual_seed(seed)
    input = torch.randn(2, output_dim * pooled**2, height, width, dtype=F64, generator=generator)
    rows = []
    for k in range(6):
        x1, x2 = sorted(rng.randint(0, int(width / scale) - 1) for _ in range(2))
        y1, y2 = sorted(rng.randint(0, int(height / scale) - 1) for _ in range(2))
        rows.append([k % 2, x1, y1, x2, y2])
    rois = torch.tensor(rows, dtype=F64)
    ours = deform_psroi_pool(input, rois, None, **ps_args(
        spatial_scale=scale, output_dim=output_dim, group_size=pooled, pooled_size=pooled,
        part_size=pooled, sample_per_part=samples))
    moved = rois.clone()
    for low, high in ((1, 3), (2, 4)):
        size = torch.clamp((rois[:, high] + 1 - rois[:, low]) * scale, min=0.1)
        moved[:, low] = rois[:, low] - size / pooled / samples / 2 / scale
        moved[:, high] = moved[:, low] + size / scale
    theirs = torchvision.ops.ps_roi_align(input, moved, pooled, scale, samples)
    assert_close(ours, theirs, "output")


# --- gradients by finite differences ---------------------------------------------

def test_offset_and_mask_gradients_match_finite_differences():
    generator = torch.Generator().manual_seed(5)
    input = torch.randn(1, 2, 6, 7, dtype=F64, generator=generator, requires_grad=True)
    # Sample positions at x.3 / x.7 fractions, far from pixels and borders.
    rois = torch.tensor([[0, 1.3, 1.1, 4.9, 4.3]], dtype=F64)
    offset = (torch.rand(1, 2, 2, 2, dtype=F64, generator=generator) * 0.2 - 0.1).requires_grad_()
    mask = torch.rand(1, 1, 2, 2, dtype=F64, generator=generator).requires_grad_()
    args = roi_args(2, 2, 1.0, 2)
    assert torch.autograd.gradcheck(
        lambda i, o, m: modulated_deform_roi_pool(i, rois, o, m, **args, gamma=0.1),
        (input, offset, mask))


def test_trans_gradient_matches_finite_differences():
    generator = torch.Generator().manual_seed(6)
    input = torch.randn(1, 2 * 4, 7, 8, dtype=F64, generator=generator, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 5.0, 4.0]], dtype=F64)
    trans = (torch.rand(1, 2, 2, 2, dtype=F64, generator=generator) * 0.6 - 0.3).requires_grad_()
    args = ps_args(output_dim=2, group_size=2, pooled_size=2, part_size=2, sample_per_part=3,
                   no_trans=False, trans_std=0.13)
    assert torch.autograd.gradcheck(lambda i, t: deform_psroi_pool(i, rois, t, **args), (input, trans))


# --- bad input -----------------------------------------------------------------

def _good():
    input = torch.zeros(2, 4, 5, 5, dtype=F64)
    rois = torch.tensor([[0, 0, 0, 3, 3], [1, 1, 1, 4, 4]], dtype=F64)
    return input, rois


ROI_ARGS = roi_args(2, 2, 1.0, 2)
PS_ARGS = ps_args(output_dim=1, group_size=2, pooled_size=2, part_size=2, no_trans=False)


def _bad_cases():
    input, rois = _good()
    offset = torch.zeros(2, 2, 2, 2, dtype=F64)
    trans = torch.zeros(2, 2, 2, 2, dtype=F64)

    def with_rois(**change):
        bad = rois.clone()
        for (row, column), value in change.values():
            bad[row, column] = value
        return bad

    rois_cases = {
        "rois not [K, 5]": (rois[:, :4], "rois must be [K, 5]"),
        "batch index out of range": (with_rois(a=((1, 0), 2.0)), "integral batch indices in [0, 1]"),
        "batch index negative": (with_rois(a=((1, 0), -1.0)), "got -1.0 in row 1"),
        "batch index not integral": (with_rois(a=((0, 0), 0.5)), "integral batch indices"),
        "NaN coordinate": (with_rois(a=((1, 3), float("nan"))), "rois must be finite"),
        "Inf coordinate": (with_rois(a=((0, 2), float("inf"))), "rois must be finite"),
        "rois dtype": (rois.float(), "rois must be torch.float64"),
        "rois device": (rois.to("meta"), "on cpu like input"),
    }
    for name, (bad_rois, message) in rois_cases.items():
        yield f"deform_roi_pool: {name}", lambda r=bad_rois: deform_roi_pool(input, r, offset, **ROI_ARGS), message
        yield f"psroi: {name}", lambda r=bad_rois: deform_psroi_pool(input, r, trans, **PS_ARGS), message
    yield ("offset shape", lambda: deform_roi_pool(input, rois, offset[:, :1], **ROI_ARGS),
           "offset must be [K, 2, pooled_h, pooled_w] = [2, 2, 2, 2], got [2, 1, 2, 2]")
    yield ("offset dtype", lambda: deform_roi_pool(input, rois, offset.float(), **ROI_ARGS),
           "offset must be torch.float64")
    yield ("mask shape", lambda: modulated_deform_roi_pool(input, rois, offset, offset, **ROI_ARGS),
           "mask must be [K, 1, pooled_h, pooled_w]")
    yield ("trans shape", lambda: deform_psroi_pool(input, rois, trans[:, :, :1], **PS_ARGS),
           "trans must be [K, 2·num_classes, part_size, part_size] = [2, 2, 2, 2], got [2, 2, 1, 2]")
    yield ("trans odd channels", lambda: deform_psroi_pool(input, rois, trans[:, :1], **PS_ARGS),
           "trans must be [K, 2·num_classes, part_size, part_size]")
    yield ("trans missing", lambda: deform_psroi_pool(input, rois, None, **PS_ARGS), "got None")
    yield ("trans classes", lambda: deform_psroi_pool(
        input, rois, torch.zeros(2, 6, 2, 2, dtype=F64), **{**PS_ARGS, "output_dim": 1}),
        "num_classes = 3")
    yield ("channels not output_dim·group_size²", lambda: deform_psroi_pool(
        input, rois, trans, **{**PS_ARGS, "group_size": 3}), "must have output_dim·group_size² = 1·3² = 9 channels, got 4")
    yield ("trans dtype", lambda: deform_psroi_pool(input, rois, trans.float(), **PS_ARGS),
           "trans must be torch.float64")
    yield ("input not 4-D", lambda: roi_align(input[0], rois, **ROI_ARGS), "input must be 4-D")
    yield ("sampling_ratio too large", lambda: roi_align(input, rois, **{**ROI_ARGS, "sampling_ratio": 1025}),
           "sampling_ratio must be at most 1024")
    yield ("adaptive grid too large", lambda: roi_align(
        input, torch.tensor([[0, 0, 0, 1e7, 2]], dtype=F64), **{**ROI_ARGS, "sampling_ratio": -1}),
        "RoI 0 needs an adaptive sampling grid of 1 x 5000000 samples per bin")
    yield ("sample_per_part too large", lambda: deform_psroi_pool(
        input, rois, trans, **{**PS_ARGS, "sample_per_part": 2000}), "sample_per_part must be at most 1024")
    yield ("rois list of wrong shape", lambda: roi_align(input, [rois], **ROI_ARGS),
           "rois[0] must have shape (L, 4) (x1, y1, x2, y2), got (2, 5)")


BAD_CASES = list(_bad_cases())


@pytest.mark.parametrize("name, call, message", BAD_CASES, ids=[case[0] for case in BAD_CASES])
def test_bad_input_is_a_clear_error(name, call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)
