"""Registrations of roi_align, deform_roi_pool, modulated_deform_roi_pool and deform_psroi_pool.

Parameters and validation, what each input mode promises, FLOP and byte
counts on cases worked out by hand, the peers' agreement where they compute
the contract, every implementation through the registry (the CuPy kernels
through the CPU emulator), and saved cases in the contract's format.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from harness import casefile, cli, execution
from harness.cases import make_case
from harness.operators.roi_align import KINK_MARGIN, draw_rois, expected_grid
from harness.registry import DTYPES, get_implementation, get_operator, implementations_of
from kernels.peers import torchvision_ops
from kernels.reference.deform_psroi_pool import sample_positions as ps_positions
from kernels.reference.deform_roi_pool import grid_groups, roi_boxes, sample_positions

B1_OPS = ("roi_align", "deform_roi_pool", "modulated_deform_roi_pool")
ALL_OPS = (*B1_OPS, "deform_psroi_pool")
ROI_PARAMS = ["N", "C", "H", "W", "K", "pooled_h", "pooled_w", "spatial_scale", "sampling_ratio"]
PS_PARAMS = ["N", "H", "W", "K", "output_dim", "group_size", "pooled_size", "part_size",
             "sample_per_part", "trans_std", "no_trans", "num_classes", "spatial_scale"]


def inputs(op, overrides=None, dtype="float32", mode="random", seed=0):
    operator = get_operator(op)
    params = operator.resolve(overrides or {})
    generator = torch.Generator().manual_seed(seed)
    return params, operator.make_inputs(params, DTYPES[dtype], "cpu", generator, mode)


def b1_samples(params, tensors):
    """All (y, x) sample positions of a RoIAlign-family case, flattened per RoI group."""
    rois = tensors["rois"].double()
    offset = tensors.get("offset")
    offset = None if offset is None else offset.double()
    found = []
    for grid, members in grid_groups(rois, params["pooled_h"], params["pooled_w"],
                                     params["spatial_scale"], params["sampling_ratio"]):
        y, x = sample_positions(rois[members], None if offset is None else offset[members], grid,
                                params["pooled_h"], params["pooled_w"], params["spatial_scale"],
                                params.get("gamma", 0.0))
        found.append((members, y, x))
    return found


def distance_to_grid(values, spacing):
    return (values - (values / spacing).round() * spacing).abs()


# --- the registrations --------------------------------------------------------

def test_parameters_are_the_contracts():
    assert list(get_operator("roi_align").params) == [*ROI_PARAMS, "aligned"]
    for op in ("deform_roi_pool", "modulated_deform_roi_pool"):
        assert list(get_operator(op).params) == [*ROI_PARAMS, "gamma"]
    assert list(get_operator("deform_psroi_pool").params) == PS_PARAMS


def test_tensors_implementations_and_baselines():
    tensors = {op: [(t.name, t.differentiable) for t in get_operator(op).tensors] for op in ALL_OPS}
    assert tensors["roi_align"] == [("input", True), ("rois", False)]
    assert tensors["deform_roi_pool"] == [("input", True), ("rois", False), ("offset", True)]
    assert tensors["modulated_deform_roi_pool"] == [*tensors["deform_roi_pool"], ("mask", True)]
    assert tensors["deform_psroi_pool"] == [("input", True), ("rois", False), ("trans", True)]
    kinds = {op: {impl.name: impl.kind for impl in implementations_of(op)} for op in ALL_OPS}
    # At least these: plugins may add more.
    ours = {"reference": "reference", "torchvision": "peer", "cupy": "kernel"}
    assert kinds["roi_align"].items() >= ours.items()
    assert kinds["deform_psroi_pool"].items() >= ours.items()
    for op in ("deform_roi_pool", "modulated_deform_roi_pool"):
        assert kinds[op].items() >= {"reference": "reference", "cupy": "kernel",
                                     "torchvision_roi_align": "baseline"}.items()
        # No peer computes it: the baseline is plain RoIAlign by torchvision, never ourselves.
        assert get_operator(op).baseline == "torchvision_roi_align"
        assert get_implementation(op, "torchvision_roi_align").judged_as == "roi_align"
    assert get_operator("roi_align").baseline == "torchvision"
    assert get_operator("deform_psroi_pool").baseline == "torchvision"
    for op in ALL_OPS:
        assert get_implementation(op, "cupy").emulated_on == ("cpu",)
    for op in B1_OPS:
        assert kinds[op]["cupy_channels_fastest"] == "kernel"
        assert get_operator(op).forward_only_modes == ("degenerate_rois",)
    # Lanes over a bin's samples: a design of the PS op alone.
    assert kinds["deform_psroi_pool"]["cupy_samples_fastest"] == "kernel"
    assert all("cupy_samples_fastest" not in kinds[op] for op in B1_OPS)


@pytest.mark.parametrize(
    "op, overrides, words",
    [
        ("roi_align", {"K": -1}, ["'K'", ">= 0", "got -1"]),
        ("roi_align", {"C": -2}, ["'C'", ">= 0", "got -2"]),
        ("roi_align", {"aligned": "maybe"}, ["'aligned'", "expects bool", "got 'maybe'"]),
        ("deform_roi_pool", {"pooled_w": 0}, ["'pooled_w'", ">= 1"]),
        ("deform_psroi_pool", {"output_dim": -1}, ["'output_dim'", ">= 0", "got -1"]),
        ("roi_align", {"spatial_scale": 0.0}, ["'spatial_scale'", "> 0"]),
        ("deform_psroi_pool", {"num_classes": 3}, ["'num_classes' must divide output_dim",
                                                   "output_dim=4, num_classes=3"]),
        ("deform_psroi_pool", {"group_size": 0}, ["'group_size'", ">= 1"]),
        ("deform_psroi_pool", {"part_size": -1}, ["'part_size'", ">= 0"]),
    ],
)
def test_validation_names_parameter_expected_and_actual(op, overrides, words):
    with pytest.raises(ValueError) as error:
        get_operator(op).resolve(overrides)
    for word in words:
        assert word in str(error.value)


def test_no_trans_needs_no_dividing_num_classes():
    get_operator("deform_psroi_pool").resolve({"num_classes": 3, "no_trans": True})


# --- generated inputs -----------------------------------------------------------

@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_inputs_have_the_specs_shapes_dtype_and_are_reproducible(op, dtype):
    params, tensors = inputs(op, {"K": 7, "N": 3}, dtype)
    _, again = inputs(op, {"K": 7, "N": 3}, dtype)
    assert list(tensors) == [t.name for t in get_operator(op).tensors]
    if op == "deform_psroi_pool":
        expected = {"input": (3, 4 * 9, 12, 16), "rois": (7, 5), "trans": (7, 4, 3, 3)}
    else:
        expected = {"input": (3, 8, 12, 16), "rois": (7, 5), "offset": (7, 2, 3, 3), "mask": (7, 1, 3, 3)}
    for name, tensor in tensors.items():
        assert tuple(tensor.shape) == expected[name], name
        assert tensor.dtype == DTYPES[dtype]
        assert torch.equal(tensor, again[name]), f"{name} is not reproducible"
    assert tensors["rois"][:, 0].tolist() == [0, 1, 2, 0, 1, 2, 2]  # every image, the last too
    if op == "deform_psroi_pool":
        _, plain = inputs(op, {"no_trans": True}, dtype)
        assert "trans" not in plain


def test_random_rois_lie_inside_the_image_and_span_sizes():
    params = get_operator("roi_align").resolve({"K": 3000, "H": 50, "W": 84, "spatial_scale": 1 / 16})
    rois = draw_rois(params, torch.Generator().manual_seed(0), "random")
    x1, y1, x2, y2 = rois[:, 1:].unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= 84 * 16 - 1).all() and (y2 <= 50 * 16 - 1).all()
    assert ((x2 - x1) >= 16 * (1 - 1e-9)).all() and ((x2 - x1) > 600).any() and ((x2 - x1) < 40).any()


def test_rois_outside_straddle_or_leave_the_image():
    params = get_operator("roi_align").resolve({"K": 300})
    rois = draw_rois(params, torch.Generator().manual_seed(1), "rois_outside")
    width, height = 16 / 0.25, 12 / 0.25
    kind = torch.arange(300) % 3
    x1, y1, x2, y2 = rois[:, 1:].unbind(1)
    straddles_x = ((x1 < 0) & (x2 > 0)) | ((x1 < width) & (x2 > width))
    straddles_y = ((y1 < 0) & (y2 > 0)) | ((y1 < height) & (y2 > height))
    assert (straddles_x & straddles_y)[kind == 1].all()
    outside = (x2 < 0) | (x1 > width) | (y2 < 0) | (y1 > height)
    assert outside[kind == 2].all() and not outside[kind == 0].any()


def test_degenerate_rois_are_zero_size_or_sub_pixel():
    params = get_operator("deform_roi_pool").resolve({"K": 60})
    rois = draw_rois(params, torch.Generator().manual_seed(2), "degenerate_rois")
    width, height = rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]
    kind = torch.arange(60) % 3
    assert ((width == 0) & (height == 0))[kind == 0].all()
    assert ((width == 0) ^ (height == 0))[kind == 1].all()
    pixel = 1 / params["spatial_scale"]
    assert ((width > 0) & (width < pixel) & (height > 0) & (height < pixel))[kind == 2].all()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["random", "rois_outside", "far_offsets"])
def test_deform_samples_keep_off_b1_kinks(dtype, mode):
    params, tensors = inputs("modulated_deform_roi_pool", {"K": 40, "sampling_ratio": 0}, dtype, mode)
    for _, y, x in b1_samples(params, tensors):
        assert (distance_to_grid(y, 1.0) >= KINK_MARGIN).all() and (distance_to_grid(x, 1.0) >= KINK_MARGIN).all()


@pytest.mark.parametrize("mode", ["random", "rois_outside"])
def test_roi_align_samples_keep_off_b1_jumps(mode):
    params, tensors = inputs("roi_align", {"K": 60, "spatial_scale": 0.5}, "bfloat16", mode)
    for _, y, x in b1_samples(params, tensors):
        for values, size in ((y, params["H"]), (x, params["W"])):
            assert ((values + 1).abs() >= KINK_MARGIN).all() and ((values - size).abs() >= KINK_MARGIN).all()


def _ps_samples(params, tensors):
    trans = tensors.get("trans")
    return ps_positions(tensors["rois"].double(), None if trans is None else trans.double(),
                        spatial_scale=params["spatial_scale"], pooled_size=params["pooled_size"],
                        part_size=params["part_size"] or params["pooled_size"],
                        sample_per_part=params["sample_per_part"], trans_std=params["trans_std"],
                        num_classes=1 if trans is None else params["num_classes"])


@pytest.mark.parametrize("mode", ["random", "rois_outside", "far_offsets"])
def test_psroi_samples_keep_off_b2_kinks_and_jumps(mode):
    params, tensors = inputs("deform_psroi_pool", {"K": 40}, "bfloat16", mode)
    for values in _ps_samples(params, tensors):
        assert (distance_to_grid(values, 0.5) >= KINK_MARGIN).all()
    params, tensors = inputs("deform_psroi_pool", {"K": 40, "no_trans": True}, "bfloat16", "rois_outside")
    h, w = _ps_samples(params, tensors)
    for values, size in ((h, params["H"]), (w, params["W"])):
        assert ((values + 0.5).abs() >= KINK_MARGIN).all() and ((values - size + 0.5).abs() >= KINK_MARGIN).all()


def test_far_offsets_push_half_the_bins_off_the_map():
    params, tensors = inputs("deform_roi_pool", {"K": 40}, "bfloat16", "far_offsets")
    far_bins = torch.zeros(40, 3, 3, dtype=torch.bool)
    for members, y, x in b1_samples(params, tensors):
        off_y = ((y < -1) | (y > params["H"])).all(-1)
        off_x = ((x < -1) | (x > params["W"])).all(-1)
        far_bins[members] = off_y & off_x
    assert 0.3 < far_bins.float().mean() < 0.7
    out = get_implementation("deform_roi_pool", "reference").forward(tensors, params)
    assert (out.permute(0, 2, 3, 1)[far_bins] == 0).all()
    _, trans = inputs("deform_psroi_pool", {"K": 40}, "float32", "far_offsets")
    h, w = _ps_samples(get_operator("deform_psroi_pool").resolve({"K": 40}), trans)
    skipped = ((h < -0.5) | (h > 11.5)).all(-1) & ((w < -0.5) | (w > 15.5)).all(-1)
    assert 0.3 < skipped.float().mean() < 0.7


def test_modes_that_need_a_move_refuse_without_one():
    with pytest.raises(ValueError, match="expected gamma != 0, got gamma=0"):
        inputs("deform_roi_pool", {"gamma": 0.0}, mode="far_offsets")
    with pytest.raises(ValueError, match="expected no_trans=false"):
        inputs("deform_psroi_pool", {"no_trans": True}, mode="far_offsets")


def test_masks_are_in_zero_one():
    _, tensors = inputs("modulated_deform_roi_pool", {"K": 50})
    mask = tensors["mask"]
    assert ((mask > 0) & (mask < 1)).all() and mask.std() > 0.1


# --- counts -----------------------------------------------------------------------

TINY = {"N": 1, "C": 2, "H": 4, "W": 4, "K": 3, "pooled_h": 2, "pooled_w": 2, "sampling_ratio": 2,
        "spatial_scale": 1.0}
# 12 bins, 48 sample points, 96 channel samples, 24 output elements; input 32, rois 15.


def test_roi_align_family_counts_by_hand():
    align, v1, v2 = (get_operator(op) for op in B1_OPS)
    params = align.resolve(TINY)
    assert align.flops(params) == 10 * 48 + 8 * 96 + 24 == 1272
    assert align.bytes(params, 4) == 4 * (32 + 15 + 24)
    assert align.backward_flops(params) == 10 * 48 + 8 * 96 + 24
    assert align.backward_bytes(params, 2) == 2 * (15 + 24 + 32)
    params = v1.resolve(TINY)
    assert v1.flops(params) == 1272 + 4 * 12
    assert v1.bytes(params, 4) == 4 * (32 + 15 + 24 + 24)
    assert v1.backward_flops(params) == 10 * 48 + 22 * 96 + 24 + 8 * 12 == 2712
    assert v1.backward_bytes(params, 2) == 2 * ((32 + 24) + 15 + 24 + (32 + 24))
    params = v2.resolve(TINY)
    assert v2.flops(params) == 1272 + 4 * 12 + 24
    assert v2.bytes(params, 4) == 4 * (32 + 15 + 24 + 24 + 12)
    assert v2.backward_flops(params) == 2712 + 2 * 24
    assert v2.backward_bytes(params, 2) == 2 * ((32 + 24 + 12) + 15 + 24 + (32 + 24 + 12))


def test_psroi_counts_by_hand():
    op = get_operator("deform_psroi_pool")
    # 2 RoIs × 2 channels × 4 bins × 9 samples = 144 samples, 16 output elements;
    # input 1·(2·2²)·4·4 = 128, rois 10, trans 2·2·2·2 = 16.
    params = op.resolve({"N": 1, "H": 4, "W": 4, "K": 2, "output_dim": 2, "group_size": 2,
                         "pooled_size": 2, "part_size": 2, "sample_per_part": 3, "num_classes": 1})
    assert op.flops(params) == 18 * 144 + 5 * 16 == 2672
    assert op.bytes(params, 4) == 4 * (128 + 10 + 16 + 16)
    assert op.backward_flops(params) == 32 * 144 + 5 * 16
    assert op.backward_bytes(params, 2) == 2 * (2 * (128 + 16) + 10 + 16)
    params = op.resolve({**params, "no_trans": True})
    assert op.flops(params) == 18 * 144 + 16
    assert op.bytes(params, 4) == 4 * (128 + 10 + 16)
    assert op.backward_flops(params) == 18 * 144 + 16


def test_adaptive_grid_count_is_the_random_rois_mean():
    params = get_operator("roi_align").resolve(
        {"sampling_ratio": 0, "K": 20000, "H": 50, "W": 84, "spatial_scale": 1 / 16, "pooled_h": 7})
    rois = draw_rois(params, torch.Generator().manual_seed(3), "random")
    _, _, roi_h, roi_w = roi_boxes(rois, params["spatial_scale"])
    for axis, size, pooled in (("h", roi_h, 7), ("w", roi_w, 3)):
        empirical = float(torch.ceil(size / pooled).mean())
        assert expected_grid(params, axis) == pytest.approx(empirical, rel=0.02), axis
    # By hand: scale 1, side log-uniform on [1, 3], 2 bins: ceil(side/2) is 1 on [1, 2], 2 on (2, 3].
    tiny = get_operator("roi_align").resolve({"sampling_ratio": 0, "H": 4, "spatial_scale": 1.0,
                                              "pooled_h": 2})
    assert expected_grid(tiny, "h") == pytest.approx((math.log(2) + 2 * math.log(1.5)) / math.log(3))
    assert expected_grid(get_operator("roi_align").resolve({}), "h") == 2.0


def test_tolerances_cover_every_dtype_and_say_why():
    for op in ALL_OPS:
        operator = get_operator(op)
        assert set(operator.tolerances) == {"float64", "float32", "float16", "bfloat16"}
        assert all(len(t.why) > 40 for t in operator.tolerances.values())


# --- implementations --------------------------------------------------------------

def check(op, impl, overrides, dtype, mode, backward=True):
    case = make_case(get_operator(op), overrides, dtype, mode)
    case_run = execution.prepare(case, "cpu", 0, backward)
    rows = [execution.run(case_run, get_implementation(op, impl), "forward", None)[0]]
    if backward:
        rows.append(execution.run(case_run, get_implementation(op, impl), "backward", None)[0])
    for row in rows:
        assert row.status in ("ok", "skipped"), f"{op}/{impl} {dtype} {mode} {row.direction}: {row.status} {row.reason}"
    return rows


SMALL = {"N": 2, "H": 7, "W": 9, "K": 6}


@pytest.mark.parametrize("op", ALL_OPS)
def test_reference_returns_the_case_dtype_in_every_mode(op):
    for mode in get_operator(op).input_modes:
        check(op, "reference", SMALL, "float16", mode)


# Every design of our kernels each operator registers.
KERNELS = [(op, impl.name) for op in ALL_OPS for impl in implementations_of(op)
           if impl.kind == "kernel"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
@pytest.mark.parametrize("op, impl", KERNELS, ids=[f"{op}/{impl}" for op, impl in KERNELS])
def test_cupy_kernel_through_the_registry(op, impl, dtype):
    """Our kernels (through the CPU emulator here) in every mode; skipped, saying why,
    while kernels.ops.<module> or the emulator is missing."""
    reason = get_implementation(op, impl).available("cpu")
    if reason is not None:
        assert isinstance(reason, str) and reason
        pytest.skip(reason)
    for mode in get_operator(op).input_modes:
        check(op, impl, {**SMALL, "sampling_ratio": 0} if op in B1_OPS else SMALL, dtype, mode)


EMPTY_CASES = {
    "roi_align": ({"K": 0}, {"C": 0}),
    "deform_roi_pool": ({"K": 0}, {"C": 0}),
    "modulated_deform_roi_pool": ({"K": 0}, {"C": 0}),
    "deform_psroi_pool": ({"K": 0}, {"output_dim": 0, "num_classes": 1}),
}


@pytest.mark.parametrize("op", ALL_OPS)
def test_empty_cases_run_in_every_implementation(op):
    """K = 0 RoIs, C = 0 channels (output_dim = 0): the generator makes them and every
    implementation that computes the case (torchvision's ps_roi_align peer only
    computes no_trans) returns an empty output and zero gradients, forward and backward rows ok."""
    for overrides in EMPTY_CASES[op]:
        params, tensors = inputs(op, {**SMALL, **overrides})
        assert tensors["rois"].shape == (params["K"], 5)
        for impl in implementations_of(op):
            extra = {"no_trans": True} if impl.name == "torchvision" and op == "deform_psroi_pool" else {}
            for row in check(op, impl.name, {**SMALL, **overrides, **extra}, "float32", "random"):
                assert row.status == "ok", (op, impl.name, overrides, row.status, row.reason)


@pytest.mark.parametrize("op", B1_OPS)
def test_adaptive_grid_with_a_negative_sampling_ratio_and_roi_align_not_aligned(op):
    overrides = {**SMALL, "sampling_ratio": -1, **({"aligned": False} if op == "roi_align" else {})}
    for impl in implementations_of(op):
        check(op, impl.name, overrides, "float32", "random")


def test_torchvision_roi_align_meets_the_float32_tolerance_in_every_mode():
    for mode in get_operator("roi_align").input_modes:
        check("roi_align", "torchvision", {**SMALL, "sampling_ratio": 0}, "float32", mode)


def test_torchvision_adapter_takes_boxes_per_image_and_float32_boxes_for_half_input():
    """The peer adapter takes what our ops take: a list of [L, 4] boxes, and
    float32 rois with half features (rounded to half for torchvision)."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 8, 9, generator=generator)
    boxes = [torch.tensor([[0.5, 1.0, 6.0, 7.0]]), torch.tensor([[1.0, 0.5, 8.0, 5.0]])]
    rows = torch.tensor([[0, 0.5, 1.0, 6.0, 7.0], [1, 1.0, 0.5, 8.0, 5.0]])
    args = dict(pooled_h=2, pooled_w=2, spatial_scale=1.0, sampling_ratio=2)
    assert torch.equal(torchvision_ops.roi_align(x, boxes, **args), torchvision_ops.roi_align(x, rows, **args))
    half = torchvision_ops.roi_align(x.half(), rows, **args)
    assert half.dtype == torch.float16
    assert torch.equal(half, torchvision_ops.roi_align(x.half(), rows.half(), **args))


def test_deform_roi_pool_with_zero_offsets_is_torchvision_roi_align():
    params, tensors = inputs("deform_roi_pool", {"K": 20, "sampling_ratio": 0}, "float64", "rois_outside")
    zero = {**tensors, "offset": torch.zeros_like(tensors["offset"])}
    ours = get_implementation("deform_roi_pool", "reference").forward(zero, params)
    theirs = get_implementation("roi_align", "torchvision").forward(tensors, params)
    assert (ours - theirs).abs().max() <= 1e-12 * theirs.abs().max()


def test_torchvision_ps_roi_align_peer_where_it_computes_the_contract():
    check("deform_psroi_pool", "torchvision", {**SMALL, "no_trans": True}, "float32", "random")
    params, tensors = inputs("deform_psroi_pool", {**SMALL, "no_trans": True, "K": 30}, "float64")
    ours = get_implementation("deform_psroi_pool", "reference").forward(tensors, params)
    theirs = get_implementation("deform_psroi_pool", "torchvision").forward(tensors, params)
    assert (ours - theirs).abs().max() <= 1e-12 * ours.abs().max()


@pytest.mark.parametrize(
    "overrides, mode, message",
    [
        ({}, "random", "only with no_trans=True and group_size == pooled_size"),
        ({"no_trans": True, "group_size": 2}, "random", "group_size=2, pooled_size=3"),
        ({"no_trans": True}, "rois_outside", "B1 averages it in, B2 skips it"),
    ],
)
def test_torchvision_ps_roi_align_peer_refuses_where_it_differs(overrides, mode, message):
    params, tensors = inputs("deform_psroi_pool", {**SMALL, **overrides}, "float32", mode)
    args = {name: params[name] for name in ("spatial_scale", "output_dim", "group_size", "pooled_size",
                                             "part_size", "sample_per_part", "trans_std", "no_trans")}
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        torchvision_ops.deform_psroi_pool(tensors["input"], tensors["rois"], tensors.get("trans"), **args)


def test_a_failing_case_is_an_error_row_and_the_sweep_goes_on():
    case = make_case(get_operator("deform_psroi_pool"), SMALL, "float32", "random")
    case_run = execution.prepare(case, "cpu", 0, False)
    row, _ = execution.run(case_run, get_implementation("deform_psroi_pool", "torchvision"), "forward", None)
    assert row.status == "error" and "no_trans=True" in row.reason


# --- saved cases --------------------------------------------------------------------

@pytest.mark.parametrize(
    "op, params, names",
    [
        ("roi_align", ["K=4", "sampling_ratio=0"], ["input", "rois"]),
        ("deform_roi_pool", ["gamma=0.2"], ["input", "rois", "offset"]),
        ("modulated_deform_roi_pool", ["pooled_h=2"], ["input", "rois", "offset", "mask"]),
        ("deform_psroi_pool", ["output_dim=2", "num_classes=1"], ["input", "rois", "trans"]),
    ],
)
def test_case_save_writes_the_contract_names(tmp_path, op, params, names):
    path = tmp_path / "case.npz"
    status = cli.main(["case", op, "--param", *params, "--backward", "--save", str(path), "--device", "cpu"])
    assert status == 0
    saved_params, arrays = casefile.load(path)
    differentiable = [n for n in names if n != "rois"]
    assert set(arrays) == {*names, "output", "grad_output", *(f"grad_{n}" for n in differentiable)}
    assert arrays["rois"].shape[1] == 5
    for assignment in params:
        key, value = assignment.split("=")
        assert str(saved_params[key]) == value or float(saved_params[key]) == float(value)
    assert saved_params["op"] == op
    json.dumps(saved_params)


@pytest.mark.parametrize("op", ["deform_roi_pool", "modulated_deform_roi_pool"])
def test_the_roi_align_baseline_is_judged_by_roi_align(op):
    """torchvision's roi_align leaves the offsets out: right as roi_align (its rows pass,
    gradients too), wrong as the deformable op (judged by that reference, it fails)."""
    case = make_case(get_operator(op), {}, "float32", "random")
    case_run = execution.prepare(case, "cpu", seed=3, backward=True)
    baseline = get_implementation(op, "torchvision_roi_align")
    for direction in ("forward", "backward"):
        row, _ = execution.run(case_run, baseline, direction, None)
        assert row.status == "ok", row.reason
        assert row.case_id == case.id  # the deformable op's case: speedups join on it
    misjudged = dataclasses.replace(baseline, judged_as="")
    row, _ = execution.run(case_run, misjudged, "forward", None)
    assert row.status == "fail"
