"""Edge cases of our deformable PSRoI pooling kernels that the main tests
(tests/test_deform_psroi_pool.py) miss.

Each test targets one behaviour a single-change bug in
``kernels/cuda/deform_psroi_pool.cu`` got through (issue 17's mutation
probe): samples exactly on B2's borders (-0.5 and H - 0.5, W - 0.5, which are
counted), channel slices that end inside a class, and the float16 / bfloat16
rounding of the output, bit-exact. The oracle is the float64 reference
(``kernels.reference.deform_psroi_pool``); every kernel output starts as NaN.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import close_to_reference

from kernels import launch
from kernels.ops import deform_psroi_pool as ops
from kernels.reference import deform_psroi_pool as reference

# The bounds of tests/test_deform_roi_pool.py, which tests/test_deform_psroi_pool.py uses.
REL_L2 = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
MAX_ABS = {dtype: 2 * bound for dtype, bound in REL_L2.items()}

assert_close = close_to_reference(REL_L2, MAX_ABS)
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def call(module, inputs: dict, params: dict) -> torch.Tensor:
    """Ours or the reference, which takes no ``design``."""
    if module is reference:
        params = {name: value for name, value in params.items() if name != "design"}
    return module.deform_psroi_pool(inputs["input"], inputs["rois"], inputs["trans"], **params)


def check_against_reference(inputs: dict, params: dict) -> torch.Tensor:
    """float32 forward and the gradients of input and trans (unless
    ``no_trans``), ours vs float64; returns the reference output."""
    differentiable = ["input"] if params["no_trans"] else ["input", "trans"]
    leaves = {n: t.clone().requires_grad_(n in differentiable) for n, t in inputs.items()}
    references = {n: t.double().requires_grad_(n in differentiable) for n, t in inputs.items()}
    out = call(ops, leaves, params)
    expected = call(reference, references, params)
    assert_close("output", out, expected, torch.float32)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, [leaves[n] for n in differentiable], grad_output)
    expected_grads = torch.autograd.grad(
        expected, [references[n] for n in differentiable], grad_output.double()
    )
    for name, grad, expected_grad in zip(differentiable, grads, expected_grads, strict=True):
        assert_close(f"grad_{name}", grad, expected_grad, torch.float32)
    return expected


def params_of(output_dim: int, group_size: int, pooled_size: int, sample_per_part: int,
              trans_std: float, no_trans: bool = False, design: str = "pw_fastest") -> dict:
    return dict(spatial_scale=1.0, output_dim=output_dim, group_size=group_size,
                pooled_size=pooled_size, part_size=0, sample_per_part=sample_per_part,
                trans_std=trans_std, no_trans=no_trans, design=design)


# --------------------------------------------------------------------------- #
# B2's borders: a sample exactly on -0.5 or size - 0.5 is counted.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("no_trans", [False, True], ids=["trans_0", "no_trans"])
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_samples_exactly_on_the_counting_borders(no_trans, design):
    """One sample per RoI (1x1 bin, sample_per_part 1, spatial_scale 1) lies
    at (round(y1) - 0.5, round(x1) - 0.5): y1 = H puts it exactly on H - 0.5
    and y1 = 0 on -0.5, likewise x, each with the other coordinate inside,
    plus the corners. B2 counts them (clamped to the last / first row):
    not one output is 0."""
    generator = torch.Generator().manual_seed(51)
    N, C, H, W = 2, 3, 5, 6
    targets = [(y, x) for y in (0, H) for x in (1, 3, W - 1)]
    targets += [(y, x) for x in (0, W) for y in (1, 2, H - 1)]
    targets += [(0, 0), (0, W), (H, 0), (H, W)]
    # (x1, y1) sets the sample; (x2, y2) only the size, which one sample ignores.
    rois = torch.tensor(
        [[k % N, x, y, x + 2, y + 2] for k, (y, x) in enumerate(targets)], dtype=torch.float32
    )
    inputs = {
        "input": torch.randn(N, C, H, W, generator=generator),
        "rois": rois,
        "trans": torch.zeros(len(targets), 2, 1, 1),
    }
    params = params_of(output_dim=C, group_size=1, pooled_size=1, sample_per_part=1,
                       trans_std=0.1, no_trans=no_trans, design=design)
    expected = check_against_reference(inputs, params)
    assert (expected != 0).all(), "a sample on the border was not counted by the reference"


# --------------------------------------------------------------------------- #
# RoI corners rounded by C's round: halves away from zero.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("no_trans", [False, True], ids=["trans", "no_trans"])
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_roi_corners_on_halves_round_away_from_zero(no_trans, design):
    """Every corner of these RoIs is an even integer plus a half (-2.5, 0.5,
    2.5, ...), where C's round (away from zero) and rounding half to even
    differ by a whole pixel: x1, y1, x2 and y2 each move the samples."""
    generator = torch.Generator().manual_seed(54)
    N, C, H, W = 2, 4, 9, 10
    rois = torch.tensor([
        [0, 0.5, 2.5, 4.5, 6.5],
        [1, 2.5, 0.5, 6.5, 4.5],
        [0, -0.5, 4.5, 2.5, 8.5],
        [1, 4.5, -2.5, 8.5, 2.5],
    ])  # fmt: skip
    inputs = {
        "input": torch.randn(N, C, H, W, generator=generator),
        "rois": rois,
        "trans": torch.rand(len(rois), 2, 2, 2, generator=generator) * 2 - 1,
    }
    params = params_of(output_dim=C, group_size=1, pooled_size=2, sample_per_part=2,
                       trans_std=0.0917, no_trans=no_trans, design=design)
    check_against_reference(inputs, params)


# --------------------------------------------------------------------------- #
# Channel slices that end inside a class.
# --------------------------------------------------------------------------- #


def test_uneven_channel_slices_across_classes(monkeypatch):
    """Two classes of 7 output channels each, in slices of 4 + 3 (the backward
    reduces the trans gradient over a slice, and each class moves its bins by
    its own trans): a class's last slice stops at the class's end."""
    monkeypatch.setattr(launch, "MIN_CHANNELS_PER_THREAD", 4)
    monkeypatch.setattr(launch, "TARGET_WAVES", 10**6)  # as many slices as allowed
    output_dim, num_classes, group_size, pooled = 14, 2, 2, 2
    per_class = output_dim // num_classes
    slicing = launch.channel_slicing(per_class, 1, "cpu")
    assert slicing.slices > 1 and per_class % slicing.channels_per_thread != 0
    generator = torch.Generator().manual_seed(52)
    N, H, W, k = 2, 8, 9, 5
    corner = 1 + torch.rand(k, 2, generator=generator) * torch.tensor([W - 5.0, H - 5.0])
    size = 1.5 + torch.rand(k, 2, generator=generator) * 2.5
    index = torch.arange(k).float().remainder(N).view(-1, 1)
    inputs = {
        "input": torch.randn(N, output_dim * group_size**2, H, W, generator=generator),
        "rois": torch.cat((index, corner, corner + size), dim=1),
        "trans": torch.rand(k, 2 * num_classes, pooled, pooled, generator=generator) * 2 - 1,
    }
    params = params_of(output_dim=output_dim, group_size=group_size, pooled_size=pooled,
                       sample_per_part=2, trans_std=0.0917)
    check_against_reference(inputs, params)


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
@pytest.mark.parametrize("no_trans", [False, True], ids=["trans", "no_trans"])
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_half_precision_output_is_rounded_to_nearest_even(no_trans, dtype, design):
    """RoIs 4 pixels wide on integer corners, 2x2 bins, 2x2 samples: samples
    at half pixels, moved by quarters (trans_std · roi = 1/4, trans in
    {-1, 0, 1, 2}), all inside, so every bin averages 4 counted samples and its
    float32 mean is exact: the stored output must be its round-to-nearest-even."""
    generator = torch.Generator().manual_seed(53)
    N, output_dim, group_size, pooled, H, W, k = 2, 2, 2, 2, 8, 9, 6
    corner = torch.randint(1, 3, (k, 2), generator=generator)
    index = torch.arange(k).remainder(N).view(-1, 1)
    inputs = {
        "input": exactly_representable_values(
            (N, output_dim * group_size**2, H, W), dtype, generator
        ),
        "rois": torch.cat((index, corner, corner + 3), dim=1).double(),
        "trans": torch.randint(-1, 3, (k, 2, pooled, pooled), generator=generator).double(),
    }
    params = params_of(output_dim=output_dim, group_size=group_size, pooled_size=pooled,
                       sample_per_part=2, trans_std=0.0625, no_trans=no_trans, design=design)
    typed = {n: t.to(dtype) for n, t in inputs.items()}
    assert all(torch.equal(typed[n].double(), t) for n, t in inputs.items())
    out = call(ops, typed, params)
    exact = call(reference, inputs, params)
    assert torch.equal(exact, exact.float().double()), "the float32 result is not exact"
    expected = exact.float().to(dtype)
    rounded = (expected.double() != exact).double().mean().item()
    assert rounded > 0.25, f"only {rounded:.0%} of the values need rounding"
    mismatched = (out.view(torch.int16) != expected.view(torch.int16)).sum().item()
    assert mismatched == 0, (
        f"{mismatched} of {out.numel()} values are not the round-to-nearest-even {dtype} "
        "of the exact result"
    )
