"""Edge cases of our RoI pooling kernels (``roi_align``, ``deform_roi_pool``,
``modulated_deform_roi_pool``) that the main tests (tests/test_deform_roi_pool.py) miss.

Each test targets one behaviour a single-change bug in
``kernels/cuda/deform_roi_pool.cu`` got through (issue 17's mutation probe):
samples exactly on B1's far edges (y = H, x = W) and near ones (-1), the
slope of B1's clamps at their kinks (0 and H - 1, W - 1 exactly), channel
slices that do not divide the channels, and the float16 / bfloat16 rounding
of the output, bit-exact. The oracle is the float64 reference
(``kernels.reference.deform_roi_pool``); every kernel output starts as NaN.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import close_to_reference

from kernels import launch
from kernels.ops import deform_roi_pool as ops
from kernels.reference import deform_roi_pool as reference

# The bounds of tests/test_deform_roi_pool.py.
REL_L2 = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MAX_ABS = {dtype: 2 * bound for dtype, bound in REL_L2.items()}
OPS = ("roi_align", "deform_roi_pool", "modulated_deform_roi_pool")

assert_close = close_to_reference(REL_L2, MAX_ABS)
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def call(module, op: str, inputs: dict, params: dict) -> torch.Tensor:
    """``op`` of ``module`` (ours or the reference) on ``inputs``; the
    reference's roi_align is its deform_roi_pool without offset, and takes no
    ``design``."""
    if module is reference:
        params = {name: value for name, value in params.items() if name != "design"}
    if op == "roi_align":
        if module is reference:
            return reference.deform_roi_pool(inputs["input"], inputs["rois"], None, **params)
        return ops.roi_align(inputs["input"], inputs["rois"], **params)
    if op == "deform_roi_pool":
        return module.deform_roi_pool(inputs["input"], inputs["rois"], inputs["offset"], **params)
    return module.modulated_deform_roi_pool(
        inputs["input"], inputs["rois"], inputs["offset"], inputs["mask"], **params
    )


def check_against_reference(op: str, inputs: dict, params: dict) -> torch.Tensor:
    """float32 forward and the gradients of input, offset and mask (those the
    op takes), ours vs float64; returns the reference output."""
    differentiable = [n for n in ("input", "offset", "mask") if inputs.get(n) is not None]
    leaves = {n: t.clone().requires_grad_(n in differentiable) for n, t in inputs.items()}
    references = {n: t.double().requires_grad_(n in differentiable) for n, t in inputs.items()}
    out = call(ops, op, leaves, params)
    expected = call(reference, op, references, params)
    assert_close("output", out, expected, torch.float32)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, [leaves[n] for n in differentiable], grad_output)
    expected_grads = torch.autograd.grad(
        expected, [references[n] for n in differentiable], grad_output.double()
    )
    for name, grad, expected_grad in zip(differentiable, grads, expected_grads, strict=True):
        assert_close(f"grad_{name}", grad, expected_grad, torch.float32)
    return expected


def single_sample_rois(targets: list[tuple[float, float]], batch: int) -> torch.Tensor:
    """[K, 5] RoIs whose one sample (1x1 bin, sampling_ratio 1, spatial_scale
    1, no offset) lies exactly at (y, x) of each target: a 3-pixel box from
    target - 1 to target + 2 has its centre, minus the half-pixel shift of
    B1's coordinates, at the target. Batch indices cycle over the images."""
    rows = [[k % batch, x - 1, y - 1, x + 2, y + 2] for k, (y, x) in enumerate(targets)]
    return torch.tensor(rows, dtype=torch.float32)


SINGLE_SAMPLE = dict(pooled_h=1, pooled_w=1, spatial_scale=1.0, sampling_ratio=1)


def single_sample_inputs(op: str, targets: list[tuple[float, float]], seed: int) -> dict:
    """Inputs for ``single_sample_rois``: offsets 0 (so the samples stay on
    their targets) and random masks."""
    generator = torch.Generator().manual_seed(seed)
    N, C, H, W = 2, 3, 5, 6
    rois = single_sample_rois(targets, N)
    inputs = {"input": torch.randn(N, C, H, W, generator=generator), "rois": rois}
    if op != "roi_align":
        inputs["offset"] = torch.zeros(len(targets), 2, 1, 1)
    if op == "modulated_deform_roi_pool":
        inputs["mask"] = 0.25 + torch.rand(len(targets), 1, 1, 1, generator=generator)
    return inputs


def params_of(op: str, params: dict, design: str, gamma: float = 0.1) -> dict:
    params = {**params, "design": design}
    return params if op == "roi_align" else {**params, "gamma": gamma}


def with_inside(borders: list[float], inside: list[float], flip: bool = False
                ) -> list[tuple[float, float]]:
    """Every border value paired with every in-map value of the other coordinate."""
    pairs = [(b, i) for b in borders for i in inside]
    return [(i, b) for b, i in pairs] if flip else pairs


H, W = 5, 6  # the map of single_sample_inputs


# --------------------------------------------------------------------------- #
# B1's range: samples exactly on y = -1, y = H, x = -1, x = W are inside.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_samples_exactly_on_the_range_borders(op, design):
    """B1 keeps a sample at y = H exactly (it reads row H - 1) and at y = -1
    (row 0), likewise x; each paired with in-map values of the other
    coordinate, plus the four corners. Not one output is 0."""
    targets = with_inside([-1.0, float(H)], [0.25, 2.5, W - 1.5])
    targets += with_inside([-1.0, float(W)], [0.75, 2.25, H - 1.5], flip=True)
    targets += [(-1.0, -1.0), (-1.0, float(W)), (float(H), -1.0), (float(H), float(W))]
    inputs = single_sample_inputs(op, targets, seed=41)
    expected = check_against_reference(op, inputs, params_of(op, SINGLE_SAMPLE, design))
    assert (expected != 0).all(), "a sample on the border was dropped by the reference"


# --------------------------------------------------------------------------- #
# B1's clamps: the slope at the kinks themselves.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("op", ("deform_roi_pool", "modulated_deform_roi_pool"))
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_clamp_slopes_at_the_kinks(op, design):
    """Samples exactly on x = 0 (the clamp below), x = W - 1 (the clamp at the
    last column), y likewise, each with an in-map value of the other
    coordinate: the offset gradient of the clamped coordinate is 0 there (the
    reference's clamp has slope 0 at its kink), the other one is not. The
    positions are exact in float32, so this is deterministic."""
    targets = with_inside([0.0, H - 1.0], [0.25, 2.5, W - 1.75])
    targets += with_inside([0.0, W - 1.0], [0.75, 2.25, H - 1.25], flip=True)
    targets += [(0.0, 0.0), (H - 1.0, W - 1.0)]
    inputs = single_sample_inputs(op, targets, seed=42)
    check_against_reference(op, inputs, params_of(op, SINGLE_SAMPLE, design))


# --------------------------------------------------------------------------- #
# Channel slices that do not divide the channels.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("op", ("deform_roi_pool", "modulated_deform_roi_pool"))
def test_uneven_channel_slices(monkeypatch, op):
    """C = 7 in slices of 4 + 3 (the backward reduces the offset and mask
    gradients over a slice): the last slice stops at C."""
    monkeypatch.setattr(launch, "MIN_CHANNELS_PER_THREAD", 4)
    monkeypatch.setattr(launch, "TARGET_WAVES", 10**6)  # as many slices as allowed
    channels = 7
    slicing = launch.channel_slicing(channels, 1, "cpu")
    assert slicing.slices > 1 and channels % slicing.channels_per_thread != 0
    generator = torch.Generator().manual_seed(43)
    N, Hm, Wm, pooled = 2, 6, 7, (2, 3)
    k = 5
    corner = torch.rand(k, 2, generator=generator) * torch.tensor([Wm - 2.0, Hm - 2.0])
    size = 1.3 + torch.rand(k, 2, generator=generator) * 3
    index = torch.arange(k).float().remainder(N).view(-1, 1)
    inputs = {
        "input": torch.randn(N, channels, Hm, Wm, generator=generator),
        "rois": torch.cat((index, corner, corner + size), dim=1),
        "offset": torch.rand(k, 2, *pooled, generator=generator) * 2 - 1,
    }
    if op == "modulated_deform_roi_pool":
        inputs["mask"] = torch.rand(k, 1, *pooled, generator=generator)
    params = dict(pooled_h=pooled[0], pooled_w=pooled[1], spatial_scale=1.0, sampling_ratio=2)
    check_against_reference(op, inputs, params_of(op, params, "pw_fastest", gamma=0.0917))


# --------------------------------------------------------------------------- #
# float16 / bfloat16 output rounding, bit-exact.
# --------------------------------------------------------------------------- #


def exactly_representable_values(shape: tuple[int, ...], dtype: torch.dtype,
                                 generator: torch.Generator) -> torch.Tensor:
    """Random values with every significand bit of ``dtype`` in use, on one
    grid ((integer of the significand's width) · 2^-k, magnitudes below 4):
    their blends with quarter weights are exact in float32."""
    bits = {torch.float16: 11, torch.bfloat16: 8}[dtype]
    whole = torch.randint(-(2**bits) + 1, 2**bits, shape, generator=generator)
    return whole.double() * 2.0 ** (2 - bits)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_half_precision_output_is_rounded_to_nearest_even(op, dtype, design):
    """RoIs starting at a quarter of a pixel with bins 2 pixels wide and a 2x2
    grid: samples at quarter positions; offsets move them by halves (gamma ·
    roi = 1, offsets in halves), masks in {0.5, 0.75, 1}. Each bin's float32
    mean is exact, so the stored output must be its round-to-nearest-even."""
    generator = torch.Generator().manual_seed(44)
    N, C, Hm, Wm, pooled, k = 2, 3, 7, 9, (2, 2), 8
    corner = torch.randint(0, 3, (k, 2), generator=generator) + 0.25 * torch.randint(
        1, 4, (k, 2), generator=generator
    )
    index = torch.arange(k).remainder(N).view(-1, 1)
    inputs = {
        "input": exactly_representable_values((N, C, Hm, Wm), dtype, generator),
        "rois": torch.cat((index, corner, corner + 4), dim=1).double(),
    }
    if op != "roi_align":
        inputs["offset"] = 0.5 * torch.randint(-1, 2, (k, 2, *pooled), generator=generator)
    if op == "modulated_deform_roi_pool":
        masks = torch.tensor([0.5, 0.75, 1.0], dtype=torch.float64)
        inputs["mask"] = masks[torch.randint(3, (k, 1, *pooled), generator=generator)]
    inputs = {n: t.double() for n, t in inputs.items()}
    params = params_of(
        op, dict(pooled_h=2, pooled_w=2, spatial_scale=1.0, sampling_ratio=2), design, gamma=0.25
    )
    typed = {n: t.to(dtype) for n, t in inputs.items()}
    assert all(torch.equal(typed[n].double(), t) for n, t in inputs.items())
    out = call(ops, op, typed, params)
    exact = call(reference, op, inputs, params)
    assert torch.equal(exact, exact.float().double()), "the float32 result is not exact"
    expected = exact.float().to(dtype)
    rounded = (expected.double() != exact).double().mean().item()
    assert rounded > 0.25, f"only {rounded:.0%} of the values need rounding"
    mismatched = (out.view(torch.int16) != expected.view(torch.int16)).sum().item()
    assert mismatched == 0, (
        f"{mismatched} of {out.numel()} values are not the round-to-nearest-even {dtype} "
        "of the exact result"
    )
