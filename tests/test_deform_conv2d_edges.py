"""Edge cases of our DCNv1 / DCNv2 kernels that the main tests (tests/test_deform_conv2d.py) miss.

Each test targets one behaviour a single-change bug in
``kernels/cuda/deform_conv2d.cu`` got through (issue 17's mutation probe):
channel slices that end inside an offset group, B0's borders with exact
gradients, and the float16 / bfloat16 rounding of the columns, bit-exact.
The oracle is the float64 reference (``kernels.reference.deform_conv2d``);
every kernel output starts as NaN.
"""

from __future__ import annotations

import functools

import pytest
import torch
from kernel_checks import close_to_reference

from kernels import launch
from kernels.ops import deform_conv2d as dcn
from kernels.reference import deform_conv2d as reference

# The bounds of tests/test_deform_conv2d.py.
REL_L2 = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MAX_ABS = {dtype: 2 * bound for dtype, bound in REL_L2.items()}

assert_close = close_to_reference(REL_L2, MAX_ABS)
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


@pytest.fixture(autouse=True, params=dcn.DESIGNS)
def design(request, monkeypatch) -> str:
    """Every test runs on both designs of ours: ``call`` passes the test's one."""
    monkeypatch.setattr(dcn, "deform_conv2d",
                        functools.partial(dcn.deform_conv2d, design=request.param))
    monkeypatch.setattr(dcn, "modulated_deform_conv2d",
                        functools.partial(dcn.modulated_deform_conv2d, design=request.param))
    return request.param


def call(module, inputs: dict, params: dict) -> torch.Tensor:
    """DCNv1 (no mask) or DCNv2 of ``module`` (ours or the reference)."""
    if inputs.get("mask") is None:
        return module.deform_conv2d(
            inputs["input"], inputs["offset"], inputs["weight"], inputs.get("bias"), **params
        )
    return module.modulated_deform_conv2d(
        inputs["input"], inputs["offset"], inputs["mask"], inputs["weight"], inputs.get("bias"),
        **params,
    )  # fmt: skip


def check_against_reference(inputs: dict, params: dict) -> None:
    """float32 forward and the gradient of every input, ours vs float64."""
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    references = {n: t.double().requires_grad_() for n, t in inputs.items()}
    out = call(dcn, leaves, params)
    expected = call(reference, references, params)
    assert_close("output", out, expected, torch.float32)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output)
    expected_grads = torch.autograd.grad(expected, list(references.values()), grad_output.double())
    for name, grad, expected_grad in zip(leaves, grads, expected_grads, strict=True):
        assert_close(f"grad_{name}", grad, expected_grad, torch.float32)


def base_positions(out_h: int, out_w: int, kernel: tuple[int, int], params: dict
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Undeformed sampling positions [kh, kw, H_out, W_out] of every tap (float64)."""
    (stride_h, stride_w), (pad_h, pad_w), (dil_h, dil_w) = (
        params["stride"], params["padding"], params["dilation"]
    )
    i = torch.arange(kernel[0], dtype=torch.float64).view(-1, 1, 1, 1)
    j = torch.arange(kernel[1], dtype=torch.float64).view(1, -1, 1, 1)
    ho = torch.arange(out_h, dtype=torch.float64).view(-1, 1)
    wo = torch.arange(out_w, dtype=torch.float64).view(1, -1)
    return ho * stride_h - pad_h + i * dil_h, wo * stride_w - pad_w + j * dil_w


def offsets_for(y: torch.Tensor, x: torch.Tensor, kernel: tuple[int, int], params: dict
                ) -> torch.Tensor:
    """Offsets [N, 2·G·kh·kw, H_out, W_out] that sample at the absolute
    positions ``y``, ``x`` [N, G, kh, kw, H_out, W_out]."""
    n, groups, kh, kw, out_h, out_w = y.shape
    base_y, base_x = base_positions(out_h, out_w, kernel, params)
    offset = torch.stack((y - base_y, x - base_x), dim=4)  # [N, G, kh, kw, 2, H_out, W_out]
    return offset.reshape(n, 2 * groups * kh * kw, out_h, out_w)


# --------------------------------------------------------------------------- #
# Channel slices that end inside an offset group.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
@pytest.mark.parametrize(
    "channels, offset_groups", [(14, 2), (15, 3)], ids=["C14_G2_slices_4+3", "C15_G3_slices_3+2"]
)
def test_uneven_channel_slices_across_offset_groups(monkeypatch, channels, offset_groups,
                                                    modulated):
    """Slices of groups of 7 channels (4 + 3) or 5 (3 + 2): a group's
    last slice stops at the group's end, not at the next group's channels
    (which sample elsewhere). Forward (im2col) and every gradient (col2im)."""
    monkeypatch.setattr(launch, "MIN_CHANNELS_PER_THREAD", 4)
    monkeypatch.setattr(launch, "TARGET_WAVES", 10**6)  # as many slices as allowed
    group_channels = channels // offset_groups
    slicing = launch.channel_slicing(group_channels, 1, "cpu")
    assert slicing.slices > 1 and group_channels % slicing.channels_per_thread != 0
    generator = torch.Generator().manual_seed(31)
    N, H, W, kernel = 2, 4, 5, (3, 3)
    params = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1,
                  offset_groups=offset_groups)
    offset_shape = (N, 2 * offset_groups * 9, H, W)
    offset = torch.randint(-2, 3, offset_shape, generator=generator) + 0.15 + 0.7 * torch.rand(
        offset_shape, generator=generator
    )
    inputs = {
        "input": torch.randn(N, channels, H, W, generator=generator),
        "offset": offset.float(),
        "weight": torch.randn(3, channels, *kernel, generator=generator) / 9,
        "bias": torch.randn(3, generator=generator),
    }
    if modulated:
        inputs["mask"] = torch.rand(N, offset_groups * 9, H, W, generator=generator)
    check_against_reference(inputs, params)


# --------------------------------------------------------------------------- #
# B0's borders: exact positions, so the slopes at the kinks are the reference's.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
def test_exact_borders_with_gradients(modulated):
    """Samples exactly on y = -1, -0.5, 0, H-1, H-0.5, H (x likewise), each with
    the other coordinate inside, plus independent draws: forward and every
    gradient. The positions are short binary fractions on integer bases,
    exact in float32 and float64, so kernel and reference take the same side
    of every kink (B0 is 0, with slope 0, at y = -1 itself)."""
    generator = torch.Generator().manual_seed(32)
    N, C, H, W, groups, kernel = 1, 4, 4, 5, 2, (3, 3)
    params = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, offset_groups=groups)
    shape = (N, groups, *kernel, H, W)
    borders_y = [-1.0, -0.5, 0.0, H - 1.0, H - 0.5, float(H)]
    borders_x = [-1.0, -0.5, 0.0, W - 1.0, W - 0.5, float(W)]
    inside_y, inside_x = [0.25, 1.5, H - 1.75], [0.75, 2.25, W - 1.5]
    pairs = [(y, x) for y in borders_y for x in inside_x]
    pairs += [(y, x) for y in inside_y for x in borders_x]
    slots = torch.Size(shape).numel()
    values_y = torch.tensor(borders_y + inside_y, dtype=torch.float64)
    values_x = torch.tensor(borders_x + inside_x, dtype=torch.float64)
    drawn = (slots - len(pairs),)
    y = torch.cat((torch.tensor([p[0] for p in pairs], dtype=torch.float64),
                   values_y[torch.randint(len(values_y), drawn, generator=generator)]))
    x = torch.cat((torch.tensor([p[1] for p in pairs], dtype=torch.float64),
                   values_x[torch.randint(len(values_x), drawn, generator=generator)]))
    order = torch.randperm(slots, generator=generator)
    inputs = {
        "input": torch.randn(N, C, H, W, generator=generator),
        "offset": offsets_for(y[order].view(shape), x[order].view(shape), kernel, params).float(),
        "weight": torch.randn(3, C, *kernel, generator=generator) / 9,
    }
    if modulated:
        inputs["mask"] = 0.25 + torch.rand(N, groups * 9, H, W, generator=generator)
    check_against_reference(inputs, params)


# --------------------------------------------------------------------------- #
# float16 / bfloat16 rounding of the columns, bit-exact.
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
@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
def test_half_precision_columns_are_rounded_to_nearest_even(dtype, modulated):
    """A 1x1 kernel whose weight is the identity makes the output the im2col
    columns themselves (the GEMM multiplies by 1 and adds zeros). Inputs on a
    grid, offsets at 1/4, 1/2, 3/4 of a pixel, masks in {0.5, 0.75, 1}: each column value is
    exact in float32, so it must be stored as its round-to-nearest-even."""
    generator = torch.Generator().manual_seed(33)
    N, C, H, W, groups = 2, 4, 5, 6, 2
    params = dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, offset_groups=groups)
    offset_shape = (N, 2 * groups, H, W)
    offset = torch.randint(-1, 2, offset_shape, generator=generator) + 0.25 * torch.randint(
        1, 4, offset_shape, generator=generator
    )
    inputs = {
        "input": exactly_representable_values((N, C, H, W), dtype, generator),
        "offset": offset.double(),
        "weight": torch.eye(C, dtype=torch.float64).view(C, C, 1, 1),
    }
    if modulated:
        masks = torch.tensor([0.5, 0.75, 1.0], dtype=torch.float64)
        inputs["mask"] = masks[torch.randint(3, (N, groups, H, W), generator=generator)]
    typed = {n: t.to(dtype) for n, t in inputs.items()}
    assert all(torch.equal(typed[n].double(), t) for n, t in inputs.items())
    out = call(dcn, typed, params)
    exact = call(reference, inputs, params)
    assert torch.equal(exact, exact.float().double()), "the float32 columns are not exact"
    expected = exact.float().to(dtype)
    rounded = (expected.double() != exact).double().mean().item()
    assert rounded > 0.25, f"only {rounded:.0%} of the values need rounding"
    mismatched = (out.view(torch.int16) != expected.view(torch.int16)).sum().item()
    assert mismatched == 0, (
        f"{mismatched} of {out.numel()} columns are not the round-to-nearest-even {dtype} "
        "of the exact value"
    )
