"""Our RoI pooling kernels (``kernels.ops.deform_roi_pool``): ``roi_align``,
``deform_roi_pool``, ``modulated_deform_roi_pool``, against the float64 reference.

On the CPU the very CUDA source the GPU runs goes through ``kernels.emulator``.
Every kernel call here runs with outputs poisoned with NaN, so an element a
kernel forgets to write fails the comparison. The oracle is the float64
reference (``kernels.reference.deform_roi_pool``, from the contract) on the
same (already rounded) inputs; ``roi_align`` is also compared with
``torchvision.ops.roi_align(aligned=True)``. Errors are relative L2 and
max-abs relative to max |ref|.

``TestOnGPU`` runs the same comparisons on CUDA; it is skipped without a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from kernel_checks import close_to_reference

from kernels import emulator, launch
from kernels.ops import deform_roi_pool as ops
from kernels.reference import deform_roi_pool as reference
from kernels.reference import roi_align as roi_align_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Relative L2 bound per dtype: a few units of the dtype's rounding (the
# output and each gradient are rounded once; float32 sample positions differ
# from float64 ones by an ulp of the coordinate). float64 kernels compute in
# float64: only the summation order differs from the reference.
REL_L2 = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-13}
MAX_ABS = {dtype: 2 * bound for dtype, bound in REL_L2.items()}
OPS = ("roi_align", "deform_roi_pool", "modulated_deform_roi_pool")
DESIGNS = ops.DESIGNS


# Every kernel output starts as NaN: an unwritten element fails its comparison.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


@dataclasses.dataclass(frozen=True)
class Case:
    N: int = 2
    C: int = 3
    H: int = 7
    W: int = 9
    pooled_h: int = 3
    pooled_w: int = 2
    spatial_scale: float = 0.5
    sampling_ratio: int = 0
    # Not 0.1: with bfloat16 / float16 RoIs and offsets (few mantissa bits),
    # gamma = 0.1 puts samples within float32 rounding of integer positions,
    # where B1's slope jumps and float32 and float64 positions can fall on
    # different sides (a true gradient difference, not a kernel error).
    gamma: float = 0.0917

    def params(self, op: str, design: str = "pw_fastest") -> dict:
        """Our function's keyword arguments (``reference_call`` drops the design)."""
        params = dict(
            pooled_h=self.pooled_h,
            pooled_w=self.pooled_w,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            design=design,
        )
        if op != "roi_align":
            params["gamma"] = self.gamma
        return params


CASES = {
    "adaptive_grid": Case(),
    "sampling_ratio_2": Case(sampling_ratio=2, gamma=0.2917),
    "pooled_1x1": Case(N=1, C=2, pooled_h=1, pooled_w=1, spatial_scale=0.25),
    "pooled_14x14": Case(N=1, C=2, H=5, W=6, pooled_h=14, pooled_w=14, sampling_ratio=1),
    # Two chunks of 32 channels in the channels-fastest design, the second with
    # 5 (27 dead lanes); a sampling ratio that is not specialised.
    "channels_37": Case(N=2, C=37, H=5, W=6, pooled_h=3, pooled_w=3, sampling_ratio=3),
}


def make_rois(case: Case, generator: torch.Generator) -> torch.Tensor:
    """RoIs in image coordinates (feature map = image·spatial_scale): inside,
    partly outside, wholly outside, zero-size, sub-pixel, on the last image,
    plus random ones."""
    image_h, image_w = case.H / case.spatial_scale, case.W / case.spatial_scale
    last = case.N - 1
    fixed = torch.tensor(
        [
            [0, 1.3, 2.2, image_w - 3.1, image_h - 1.7],  # inside
            [last, -0.4 * image_w, -3.3, 0.6 * image_w, 0.5 * image_h],  # partly outside
            [last, 1.7 * image_w, 1.2 * image_h, 2.3 * image_w, 1.9 * image_h],  # wholly outside
            [0, 0.37 * image_w, 0.41 * image_h, 0.37 * image_w, 0.41 * image_h],  # zero size
            [last, 0.52 * image_w, 0.33 * image_h, 0.52 * image_w + 0.3, 0.33 * image_h + 0.2],
        ]
    )
    k = 4
    x = torch.rand(k, 2, generator=generator) * 1.4 * image_w - 0.2 * image_w
    y = torch.rand(k, 2, generator=generator) * 1.4 * image_h - 0.2 * image_h
    index = torch.randint(case.N, (k,), generator=generator).float()
    random = torch.stack(
        [index, x.min(1).values, y.min(1).values, x.max(1).values, y.max(1).values], dim=1
    )
    return torch.cat([fixed, random])


def make_inputs(case: Case, op: str, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rois = make_rois(case, generator)
    bins = (rois.shape[0], 1, case.pooled_h, case.pooled_w)
    inputs = {
        "input": torch.randn(case.N, case.C, case.H, case.W, generator=generator),
        "rois": rois,
        # up to ±3 moves a bin by 0.3 of its RoI (gamma 0.1): some off the map
        "offset": (torch.rand(bins[0], 2, *bins[2:], generator=generator) * 6 - 3)
        if op != "roi_align"
        else None,
        "mask": torch.rand(bins, generator=generator)
        if op == "modulated_deform_roi_pool"
        else None,
    }
    return {name: None if t is None else t.to(dtype) for name, t in inputs.items()}


def call(module, op: str, inputs: dict, params: dict) -> torch.Tensor:
    """``op`` of ``module`` (ours or the reference) on ``inputs``."""
    if op == "roi_align":
        return module.roi_align(inputs["input"], inputs["rois"], **params)
    if op == "deform_roi_pool":
        return module.deform_roi_pool(inputs["input"], inputs["rois"], inputs["offset"], **params)
    return module.modulated_deform_roi_pool(
        inputs["input"], inputs["rois"], inputs["offset"], inputs["mask"], **params
    )


def reference_call(op: str, inputs: dict, params: dict) -> torch.Tensor:
    params = {name: value for name, value in params.items() if name != "design"}
    if op == "roi_align":
        return roi_align_reference.roi_align(inputs["input"], inputs["rois"], **params)
    return call(reference, op, inputs, params)


assert_close = close_to_reference(REL_L2, MAX_ABS)


def check_against_reference(
    op: str,
    inputs: dict,
    params: dict,
    dtype: torch.dtype,
    requires_grad: tuple[str, ...] = ("input", "offset", "mask"),
) -> torch.Tensor:
    """Forward and the requested gradients of ours vs the float64 reference; returns ours."""
    leaves = {
        name: None if t is None else t.detach().clone().requires_grad_(name in requires_grad)
        for name, t in inputs.items()
    }
    references = {
        name: None if t is None else t.detach().double().requires_grad_(name in requires_grad)
        for name, t in inputs.items()
    }
    out = call(ops, op, leaves, params)
    expected = reference_call(op, references, params)
    assert_close("output", out, expected, dtype)

    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    differentiable = [n for n in requires_grad if leaves.get(n) is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in differentiable], grad_output)
    expected_grads = torch.autograd.grad(
        expected, [references[n] for n in differentiable], grad_output.double()
    )
    for name, grad, expected_grad in zip(differentiable, grads, expected_grads, strict=True):
        assert_close(f"grad_{name}", grad, expected_grad, dtype)
    return out


# --------------------------------------------------------------------------- #
# Forward and gradients vs the reference.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_forward_and_gradients(case_name, op, dtype, design):
    case = CASES[case_name]
    check_against_reference(op, make_inputs(case, op, dtype), case.params(op, design), dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("case_name", ["adaptive_grid", "sampling_ratio_2"])
def test_float64_kernels(case_name, op, design):
    """The float64 instantiations (forward and backward) compute in float64:
    the reference's values to ~1e-15, every gradient included."""
    case = CASES[case_name]
    check_against_reference(op, make_inputs(case, op, torch.float64), case.params(op, design),
                            torch.float64)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_on_the_kernels(op, design):
    """torch.autograd.gradcheck (float64 finite differences) of the emulated
    kernels, every differentiable argument; RoIs inside the map at generic
    positions (no sample within eps of B1's kinks)."""
    generator = torch.Generator().manual_seed(30)
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64, generator=generator).requires_grad_()
    rois = torch.tensor([[0, 1.3, 0.7, 8.1, 6.9], [1, 2.2, 3.1, 9.4, 8.3], [1, 0.6, 1.9, 5.2, 9.1]],
                        dtype=torch.float64)
    offset = (torch.rand(3, 2, 2, 3, dtype=torch.float64, generator=generator) * 0.4 - 0.2
              ).requires_grad_()
    mask = torch.rand(3, 1, 2, 3, dtype=torch.float64, generator=generator).requires_grad_()
    params = dict(pooled_h=2, pooled_w=3, spatial_scale=0.5, sampling_ratio=2, design=design)
    if op == "roi_align":
        function, arguments = (lambda i: ops.roi_align(i, rois, **params)), (x,)
    elif op == "deform_roi_pool":
        function, arguments = (lambda i, o: ops.deform_roi_pool(i, rois, o, **params, gamma=0.3)
                               ), (x, offset)
    else:
        function, arguments = (lambda i, o, m: ops.modulated_deform_roi_pool(
            i, rois, o, m, **params, gamma=0.3)), (x, offset, mask)
    assert torch.autograd.gradcheck(function, arguments)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("design", DESIGNS)
def test_roi_align_matches_torchvision(sampling_ratio, design):
    """roi_align = torchvision.ops.roi_align(aligned=True), forward and grad_input."""
    case = dataclasses.replace(CASES["adaptive_grid"], sampling_ratio=sampling_ratio)
    inputs = make_inputs(case, "roi_align", torch.float32, seed=2)
    x = inputs["input"].clone().requires_grad_()
    out = ops.roi_align(x, inputs["rois"], **case.params("roi_align", design))
    x_tv = inputs["input"].double().requires_grad_()
    expected = torchvision.ops.roi_align(
        x_tv,
        inputs["rois"].double(),
        (case.pooled_h, case.pooled_w),
        case.spatial_scale,
        sampling_ratio,
        aligned=True,
    )
    assert_close("output", out, expected, torch.float32)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    out.backward(grad_output)
    expected.backward(grad_output.double())
    assert_close("grad_input", x.grad, x_tv.grad, torch.float32)


@pytest.mark.parametrize("design", DESIGNS)
def test_zero_size_roi_with_adaptive_grid_is_zero(design):
    """sampling_ratio 0 and a zero-size RoI: an empty grid, the bin is 0 and
    nothing has a gradient (the reference's graph does not even reach the inputs)."""
    case = CASES["adaptive_grid"]
    op = "modulated_deform_roi_pool"
    inputs = make_inputs(case, op, torch.float32, seed=4)
    inputs = {
        "input": inputs["input"].requires_grad_(),
        "rois": torch.tensor([[1, 5.0, 6.0, 5.0, 6.0]]),
        "offset": inputs["offset"][:1].clone().requires_grad_(),
        "mask": inputs["mask"][:1].clone().requires_grad_(),
    }
    out = call(ops, op, inputs, case.params(op, design))
    assert (out == 0).all()
    grads = torch.autograd.grad(
        out, [inputs[n] for n in ("input", "offset", "mask")], torch.ones_like(out)
    )
    for grad in grads:
        assert (grad == 0).all()


@pytest.mark.parametrize(
    "min_channels, waves",
    [(1, 10**6), (2, 10**6), (4, 0)],
    ids=["slice_per_channel", "uneven_slices", "one_slice"],
)
def test_channel_slices(monkeypatch, min_channels, waves):
    """Every way the backward splits channels gives the reference's gradients
    (C = 5: slices of 1, of 2+2+1, one of 5)."""
    monkeypatch.setattr(launch, "MIN_CHANNELS_PER_THREAD", min_channels)
    monkeypatch.setattr(launch, "TARGET_WAVES", waves)
    case = dataclasses.replace(CASES["adaptive_grid"], C=5)
    op = "modulated_deform_roi_pool"
    check_against_reference(
        op, make_inputs(case, op, torch.float32, seed=5), case.params(op), torch.float32
    )


@pytest.mark.parametrize("design", DESIGNS)
def test_rois_in_several_launches(monkeypatch, design):
    """More RoIs than one launch's gridDim.y: chunks of 4 RoIs (the real limit is 65535)."""
    monkeypatch.setattr(launch, "MAX_GRID_DIM", (2**31 - 1, 4, 65535))
    case = CASES["sampling_ratio_2"]
    op = "modulated_deform_roi_pool"
    check_against_reference(
        op, make_inputs(case, op, torch.float32, seed=6), case.params(op, design), torch.float32
    )


@pytest.mark.parametrize(
    "requires_grad", [("input",), ("offset",), ("mask",), ("offset", "mask")], ids="+".join
)
@pytest.mark.parametrize("design", DESIGNS)
def test_only_requested_gradients(requires_grad, design):
    case = CASES["adaptive_grid"]
    op = "modulated_deform_roi_pool"
    inputs = make_inputs(case, op, torch.float32, seed=7)
    check_against_reference(op, inputs, case.params(op, design), torch.float32, requires_grad)


@pytest.mark.parametrize("design", DESIGNS)
def test_modulated_without_offset(design):
    case = CASES["sampling_ratio_2"]
    op = "modulated_deform_roi_pool"
    inputs = dict(make_inputs(case, op, torch.float32, seed=8), offset=None)
    check_against_reference(op, inputs, case.params(op, design), torch.float32)


def test_deform_roi_pool_without_offset_is_roi_align():
    case = CASES["adaptive_grid"]
    inputs = make_inputs(case, "roi_align", torch.float32, seed=9)
    pooled = ops.deform_roi_pool(
        inputs["input"], inputs["rois"], None, **case.params("deform_roi_pool")
    )
    aligned = ops.roi_align(inputs["input"], inputs["rois"], **case.params("roi_align"))
    torch.testing.assert_close(pooled, aligned, rtol=0, atol=0)


@pytest.mark.parametrize("design", DESIGNS)
def test_no_rois_and_noncontiguous_inputs(design):
    case = CASES["adaptive_grid"]
    op = "modulated_deform_roi_pool"
    params = case.params(op, design)
    inputs = make_inputs(case, op, torch.float32, seed=10)
    empty = {n: t[:0] if n != "input" else t for n, t in inputs.items()}
    assert call(ops, op, empty, params).shape == (0, case.C, case.pooled_h, case.pooled_w)
    expected = call(ops, op, inputs, params)
    transposed = {n: t.transpose(-1, -2).contiguous().transpose(-1, -2) for n, t in inputs.items()}
    assert not transposed["input"].is_contiguous()
    torch.testing.assert_close(call(ops, op, transposed, params), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# The ops as users of torchvision and mmcv call them.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_not_aligned_matches_torchvision(sampling_ratio, design):
    """aligned=False (torchvision's legacy rule: no -0.5, sides >= 1) = torchvision's,
    forward and grad_input; the reference agrees as well. The zero-size and
    sub-pixel RoIs of make_rois are where the clamp at 1 acts."""
    case = dataclasses.replace(CASES["adaptive_grid"], sampling_ratio=sampling_ratio)
    inputs = make_inputs(case, "roi_align", torch.float32, seed=15)
    params = dict(case.params("roi_align", design), aligned=False)
    out = check_against_reference("roi_align", inputs, params, torch.float32)
    x_tv = inputs["input"].double().requires_grad_()
    expected = torchvision.ops.roi_align(
        x_tv, inputs["rois"].double(), (case.pooled_h, case.pooled_w), case.spatial_scale,
        sampling_ratio, aligned=False,
    )
    assert_close("output", out, expected, torch.float32)
    x = inputs["input"].clone().requires_grad_()
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(16))
    ops.roi_align(x, inputs["rois"], **params).backward(grad_output)
    expected.backward(grad_output.double())
    assert_close("grad_input", x.grad, x_tv.grad, torch.float32)
    aligned = ops.roi_align(inputs["input"], inputs["rois"], **case.params("roi_align", design))
    assert (aligned - out).abs().max() > 0.1  # the flag changes the result


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("op", OPS)
def test_nonpositive_sampling_ratio_is_the_adaptive_grid(op, design):
    """sampling_ratio -1 (torchvision's default) and -7 are sampling_ratio 0, bit for bit."""
    case = CASES["adaptive_grid"]
    inputs = make_inputs(case, op, torch.float32, seed=17)
    adaptive = call(ops, op, inputs, case.params(op, design))
    for ratio in (-1, -7):
        params = dict(case.params(op, design), sampling_ratio=ratio)
        torch.testing.assert_close(call(ops, op, inputs, params), adaptive, rtol=0, atol=0)
        expected = reference_call(op, {n: None if t is None else t.double() for n, t in inputs.items()},
                                  params)
        assert_close("output", call(ops, op, inputs, params), expected, torch.float32)


def test_defaults_are_torchvisions_and_mmcvs():
    """roi_align(input, boxes, output_size) with nothing else is torchvision's
    roi_align(..., aligned=True) at its defaults (spatial_scale 1, sampling_ratio
    -1); the deformable ops with no offset at mmcv's defaults (sampling_ratio 0,
    gamma 0.1) are the same pooling."""
    generator = torch.Generator().manual_seed(18)
    x = torch.randn(2, 3, 12, 10, generator=generator)
    boxes = [torch.tensor([[1.0, 2.0, 7.5, 9.0]]), torch.tensor([[0.5, 0.5, 9.0, 4.0],
                                                                 [3.0, 1.0, 4.0, 11.0]])]
    expected = torchvision.ops.roi_align(x.double(), [b.double() for b in boxes], (3, 2), aligned=True)
    ours = ops.roi_align(x, boxes, (3, 2))
    assert_close("output", ours, expected, torch.float32)
    torch.testing.assert_close(ops.deform_roi_pool(x, boxes, output_size=(3, 2)), ours, rtol=0, atol=0)
    mask = torch.rand(3, 1, 3, 2, generator=generator)
    torch.testing.assert_close(
        ops.modulated_deform_roi_pool(x, boxes, None, mask, (3, 2)), ours * mask, rtol=0, atol=0
    )
    offset = torch.rand(3, 2, 3, 2, generator=generator)
    torch.testing.assert_close(
        ops.deform_roi_pool(x, boxes, offset, (3, 2)),
        reference.deform_roi_pool(x.double(), boxes_as_rois(boxes).double(), offset.double(),
                                  pooled_h=3, pooled_w=2, spatial_scale=1.0, sampling_ratio=0,
                                  gamma=0.1).float(),
        rtol=2e-5, atol=2e-6,
    )


def boxes_as_rois(boxes: list[torch.Tensor]) -> torch.Tensor:
    """torchvision's list of [L_i, 4] boxes as [K, 5] rows, written out here
    (not kernels.rois.as_rois, the code under test)."""
    rows = [[float(image), *box.tolist()] for image, per_image in enumerate(boxes)
            for box in per_image]
    return torch.tensor(rows, dtype=boxes[0].dtype)


@pytest.mark.parametrize("op", OPS)
def test_boxes_per_image_are_rois(op):
    """A list of [L_i, 4] boxes (image 1 without any) pools as the [K, 5] rows."""
    case = CASES["adaptive_grid"]
    inputs = make_inputs(case, op, torch.float32, seed=19)
    boxes = [inputs["rois"][:3, 1:], inputs["rois"][:0, 1:], inputs["rois"][3:5, 1:]]
    rows = boxes_as_rois(boxes)
    picked = {n: t if t is None or n == "input" else t[:5] for n, t in inputs.items()}
    picked["input"] = torch.cat([inputs["input"], inputs["input"][:1]])  # three images
    expected = call(ops, op, dict(picked, rois=rows), case.params(op))
    torch.testing.assert_close(call(ops, op, dict(picked, rois=boxes), case.params(op)), expected,
                               rtol=0, atol=0)
    reference_inputs = {n: None if t is None else t.double() for n, t in picked.items()}
    reference_out = reference_call(op, dict(reference_inputs, rois=[b.double() for b in boxes]),
                                   case.params(op))
    assert_close("output", expected, reference_out, torch.float32)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("op", OPS)
def test_float32_boxes_with_half_features_under_autocast(op, design):
    """Autocast hands float32 boxes to half features: accepted, read in float32
    (not rounded to half), the output and gradients half; against the
    reference on the same float32 boxes."""
    case = CASES["sampling_ratio_2"]
    inputs = make_inputs(case, op, torch.float16, seed=20)
    rois = make_inputs(case, op, torch.float32, seed=20)["rois"]
    rois[:, 1:] *= 1.0001  # coordinates that half does not hold
    inputs["rois"] = rois
    with torch.autocast("cpu", dtype=torch.float16):
        out = check_against_reference(op, inputs, case.params(op, design), torch.float16)
    assert out.dtype == torch.float16
    rounded = call(ops, op, dict(inputs, rois=inputs["rois"].half()), case.params(op, design))
    assert not torch.equal(out, rounded)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("empty", ["K", "C", "K_and_N"])
def test_empty_output_and_zero_gradients(op, empty, design):
    """K = 0 RoIs (also on an N = 0 batch) or C = 0 channels: an empty output of
    the right shape and zero gradients, in ours and in the reference."""
    case = CASES["adaptive_grid"]
    inputs = make_inputs(case, op, torch.float32, seed=21)
    if empty in ("K", "K_and_N"):
        inputs = {n: None if t is None else (t if n == "input" else t[:0]) for n, t in inputs.items()}
    if empty == "C":
        inputs["input"] = inputs["input"][:, :0]
    if empty == "K_and_N":
        inputs["input"] = inputs["input"][:0]
    count, channels = inputs["rois"].shape[0], inputs["input"].shape[1]
    for run in (lambda *args: call(ops, *args), reference_call):
        leaves = {n: None if t is None else t.clone().requires_grad_(n != "rois")
                  for n, t in inputs.items()}
        out = run(op, leaves, case.params(op, design))
        assert out.shape == (count, channels, case.pooled_h, case.pooled_w)
        names = [n for n in ("input", "offset", "mask") if leaves.get(n) is not None]
        grads = torch.autograd.grad(out.sum(), [leaves[n] for n in names])
        for name, grad in zip(names, grads, strict=True):
            assert grad.shape == inputs[name].shape and not grad.any(), name


@pytest.mark.parametrize("design", DESIGNS)
def test_a_million_pixel_roi_at_one_bin(design):
    """A 1000 x 1000-pixel RoI pooled to 1x1 with the adaptive grid: 10^6
    samples in one thread, within MAX_SAMPLES_PER_BIN, runs and matches the
    reference (forward and grad_input); a 10^6 x 10^6 one is refused at once."""
    generator = torch.Generator().manual_seed(22)
    # Positive values: no cancellation in the bin's sum.
    x = torch.rand(1, 1, 1000, 1000, generator=generator).requires_grad_()
    rois = torch.tensor([[0, 0.0, 0.0, 1000.0, 1000.0]])
    out = ops.roi_align(x, rois, 1, design=design)
    x64 = x.detach().double().requires_grad_()
    expected = roi_align_reference.roi_align(x64, rois.double(), pooled_h=1, pooled_w=1)
    # One thread sums 10^6 float32 terms: ~sqrt(n)·u ≈ 6e-5 relative, not the
    # few-u bound of the small cases.
    assert abs(out.item() / expected.item() - 1) < 1e-3
    grad_output = torch.tensor([[[[0.7]]]])
    out.backward(grad_output)
    expected.backward(grad_output.double())
    assert_close("grad_input", x.grad, x64.grad, torch.float32)
    huge = torch.tensor([[0, 0.0, 0.0, 1e6, 1e6]])
    message = r"RoI 0 needs an adaptive sampling grid of 1000000 x 1000000 samples per bin"
    with pytest.raises(ValueError, match=message):
        ops.roi_align(x, huge, 1)
    with pytest.raises(ValueError, match=message):
        reference.deform_roi_pool(x.double(), huge.double(), pooled_h=1, pooled_w=1)


# --------------------------------------------------------------------------- #
# Modules.
# --------------------------------------------------------------------------- #


def test_modules_are_the_functions():
    case = CASES["adaptive_grid"]
    op = "modulated_deform_roi_pool"
    inputs = make_inputs(case, op, torch.float32, seed=23)
    x, rois, offset, mask = (inputs[n] for n in ("input", "rois", "offset", "mask"))
    size, scale = (case.pooled_h, case.pooled_w), case.spatial_scale
    pairs = [
        (ops.RoIAlign(size, scale, 2, aligned=False)(x, rois),
         ops.roi_align(x, rois, size, scale, 2, aligned=False)),
        (ops.DeformRoIPool(size, scale, 0, gamma=0.3)(x, rois, offset),
         ops.deform_roi_pool(x, rois, offset, size, scale, 0, 0.3)),
        (ops.ModulatedDeformRoIPool(size, scale)(x, rois, offset, mask),
         ops.modulated_deform_roi_pool(x, rois, offset, mask, size, scale)),
    ]
    for module_out, function_out in pairs:
        torch.testing.assert_close(module_out, function_out, rtol=0, atol=0)
    assert "aligned=False" in repr(ops.RoIAlign(size, scale, 2, aligned=False))


def _pack_inputs(seed: int):
    case = CASES["sampling_ratio_2"]
    inputs = make_inputs(case, "roi_align", torch.float32, seed=seed)
    size = (case.pooled_h, case.pooled_w)
    return case, inputs["input"], inputs["rois"], size


@pytest.mark.parametrize("modulated", [False, True], ids=["DeformRoIPoolPack", "Modulated"])
def test_a_new_pack_is_roi_align_and_learns_its_offsets(modulated):
    """Zero-initialised last layers (mmcv): a new Pack is roi_align (the
    modulated one 0.5·roi_align, sigmoid(0)); its offset (and mask) layers get
    gradients through the op, and one step of SGD moves the bins."""
    torch.manual_seed(24)
    case, x, rois, size = _pack_inputs(24)
    pack_class = ops.ModulatedDeformRoIPoolPack if modulated else ops.DeformRoIPoolPack
    pack = pack_class(size, case.C, 16, case.spatial_scale, case.sampling_ratio)
    out = pack(x, rois)
    expected = ops.roi_align(x, rois, size, case.spatial_scale, case.sampling_ratio)
    torch.testing.assert_close(out, 0.5 * expected if modulated else expected, rtol=0, atol=0)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(25))
    out.backward(grad_output)
    layers = [pack.offset_fc[-1], *([pack.mask_fc[-2]] if modulated else [])]
    for layer in layers:
        assert layer.weight.grad.abs().sum() > 0 and layer.bias.grad.abs().sum() > 0
    torch.optim.SGD(pack.parameters(), lr=1.0).step()
    moved = pack(x, rois)
    assert (moved - out).abs().max() > 1e-3


@pytest.mark.parametrize("modulated", [False, True], ids=["DeformRoIPoolPack", "Modulated"])
def test_pack_without_rois(modulated):
    """K = 0 (an image without proposals, as an empty list of boxes): an empty
    output, and zero gradients for the layers."""
    case, x, _, size = _pack_inputs(26)
    pack_class = ops.ModulatedDeformRoIPoolPack if modulated else ops.DeformRoIPoolPack
    pack = pack_class(size, case.C, 8, case.spatial_scale)
    out = pack(x, [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert out.shape == (0, case.C, *size)
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in pack.parameters())


def test_pack_checks_its_channels():
    case, x, rois, size = _pack_inputs(27)
    with pytest.raises(ValueError, match=r"input must be \[N, output_channels = 5, H, W\], got"):
        ops.DeformRoIPoolPack(size, 5)(x, rois)
    with pytest.raises(ValueError, match=r"output_channels must be an int >= 1, got 0"):
        ops.DeformRoIPoolPack(size, 0)


# --------------------------------------------------------------------------- #
# Memory safety: every kernel once under the emulator's memcheck.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "op, dtype",
    [*((op, torch.float32) for op in OPS), ("modulated_deform_roi_pool", torch.float64)],
    ids=lambda v: str(v).removeprefix("torch."),
)
@pytest.mark.parametrize("design", DESIGNS)
def test_memcheck(op, dtype, design):
    """No out-of-bounds write in any forward or backward instantiation used by ``op``
    (RoIs outside the map, offsets pushing bins off it, the last image)."""
    case = CASES["sampling_ratio_2"]
    inputs = make_inputs(case, op, dtype, seed=11)
    with emulator.mode("memcheck"):
        check_against_reference(op, inputs, case.params(op, design), dtype)


# --------------------------------------------------------------------------- #
# Bad input.
# --------------------------------------------------------------------------- #


def _bad(**changes):
    """A valid modulated_deform_roi_pool call on ``adaptive_grid`` with some arguments replaced."""
    case = CASES["adaptive_grid"]
    op = "modulated_deform_roi_pool"
    arguments = dict(make_inputs(case, op, torch.float32), **case.params(op))
    arguments.update(changes)
    return arguments


def _rois_with(k: int, column: int, value: float) -> torch.Tensor:
    rois = _bad()["rois"].clone()
    rois[k, column] = value
    return rois


BAD_ARGUMENTS = {
    "rois_not_k_by_5": (_bad(rois=torch.zeros(9, 4)), ValueError, r"rois must have shape \(K, 5\)"),
    "rois_1d": (_bad(rois=torch.zeros(5)), ValueError, r"rois must be 2-D"),
    "design": (
        _bad(design="nhwc"),
        ValueError,
        r"design must be one of 'pw_fastest', 'channels_fastest', got 'nhwc'",
    ),
    "batch_index_out_of_range": (
        _bad(rois=_rois_with(3, 0, 2.0)),
        ValueError,
        r"integer batch indices in \[0, 2\) .* got 2.0 in RoI 3",
    ),
    "batch_index_negative": (_bad(rois=_rois_with(0, 0, -1.0)), ValueError, r"got -1.0 in RoI 0"),
    "batch_index_fraction": (_bad(rois=_rois_with(2, 0, 0.5)), ValueError, r"got 0.5 in RoI 2"),
    "nan_coordinate": (
        _bad(rois=_rois_with(4, 2, float("nan"))),
        ValueError,
        r"rois\[:, 1:\] must be finite coordinates, .* in RoI 4",
    ),
    "inf_coordinate": (
        _bad(rois=_rois_with(1, 3, float("inf"))),
        ValueError,
        r"finite coordinates",
    ),
    "offset_shape": (
        _bad(offset=torch.zeros(9, 2, 2, 3)),
        ValueError,
        r"offset must have shape \(9, 2, 3, 2\) \(K, 2, pooled_h, pooled_w\), got \(9, 2, 2, 3\)",
    ),
    "mask_shape": (
        _bad(mask=torch.zeros(9, 2, 3, 2)),
        ValueError,
        r"mask must have shape \(9, 1, 3, 2\)",
    ),
    "input_ndim": (_bad(input=torch.zeros(3, 7, 9)), ValueError, r"input must be 4-D"),
    "int64": (
        {**_bad(), "input": _bad()["input"].long()},
        TypeError,
        r"input has dtype torch.int64; supported: torch.float32, torch.float16, torch.bfloat16, "
        r"torch.float64",
    ),
    "rois_dtype": (
        _bad(rois=_bad()["rois"].half()),
        TypeError,
        r"rois has dtype torch.float16, expected input's dtype torch.float32$",
    ),
    "rois_dtype_of_half_input": (
        {**_bad(input=_bad()["input"].half(), offset=None, mask=_bad()["mask"].half()),
         "rois": _bad()["rois"].bfloat16()},
        TypeError,
        r"rois has dtype torch.bfloat16, expected input's dtype torch.float16 or torch.float32",
    ),
    "offset_device": (
        _bad(offset=torch.zeros(9, 2, 3, 2, device="meta")),
        ValueError,
        r"offset is on meta, expected input's device cpu",
    ),
    "pooled_h": (_bad(pooled_h=0), ValueError, r"pooled_h must be an int >= 1, got 0"),
    "sampling_ratio_type": (_bad(sampling_ratio=1.5), TypeError, r"sampling_ratio must be an int"),
    "sampling_ratio_too_large": (
        _bad(sampling_ratio=1025),
        ValueError,
        r"sampling_ratio must be at most 1024 .* got 1025",
    ),
    "adaptive_grid_too_large": (
        _bad(rois=torch.tensor([[0, 0.0, 0.0, 1e7, 1.0]]), offset=None, mask=torch.ones(1, 1, 3, 2)),
        ValueError,
        r"RoI 0 needs an adaptive sampling grid of 1 x 2500000 samples per bin .*"
        r"MAX_SAMPLES_PER_BIN = 1048576",
    ),
    "rois_list_of_wrong_shape": (
        _bad(rois=[torch.zeros(2, 4), torch.zeros(3, 5)]),
        ValueError,
        r"rois\[1\] must have shape \(L, 4\) \(x1, y1, x2, y2\), got \(3, 5\)",
    ),
    "rois_list_mixed_dtypes": (
        _bad(rois=[torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.float64)]),
        ValueError,
        r"rois\[1\] is torch.float64 on cpu, expected rois\[0\]'s torch.float32 on cpu",
    ),
    "rois_empty_list": (_bad(rois=[]), ValueError, r"one \[L, 4\] tensor per image, got an empty"),
    "rois_not_a_tensor": (_bad(rois="boxes"), TypeError, r"rois must be a \[K, 5\] torch.Tensor or"),
    "output_size_and_pooled_h": (
        _bad(output_size=3),
        TypeError,
        r"give output_size or pooled_h / pooled_w, not both",
    ),
    "no_output_size": (
        _bad(pooled_h=None),
        TypeError,
        r"give output_size \(an int or \(h, w\)\) or both pooled_h and pooled_w",
    ),
    "output_size_triple": (
        _bad(output_size=(3, 2, 1), pooled_h=None, pooled_w=None),
        ValueError,
        r"output_size must be an int or an \(h, w\) pair, got \(3, 2, 1\)",
    ),
    "output_size_zero": (
        _bad(output_size=(3, 0), pooled_h=None, pooled_w=None),
        ValueError,
        r"output_size\[1\] must be an int >= 1, got 0",
    ),
    "input_zero_width": (
        _bad(input=torch.zeros(2, 3, 7, 0)),
        ValueError,
        r"input must have H, W >= 1, got shape \(2, 3, 7, 0\)",
    ),
    "spatial_scale": (_bad(spatial_scale=0.0), ValueError, r"spatial_scale must be a positive"),
    "gamma": (_bad(gamma=float("nan")), ValueError, r"gamma must be a finite number"),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_arguments(name):
    arguments, error, message = BAD_ARGUMENTS[name]
    with pytest.raises(error, match=message):
        ops.modulated_deform_roi_pool(**arguments)


def test_bad_aligned():
    inputs = make_inputs(CASES["adaptive_grid"], "roi_align", torch.float32)
    with pytest.raises(TypeError, match=r"aligned must be a bool, got 1"):
        ops.roi_align(inputs["input"], inputs["rois"], 2, aligned=1)


def test_value_check_is_one_function_a_harness_can_call_once_per_case():
    """check_values (the host synchronisation) on its own: what the op runs
    before every launch, callable once per case outside a timed call."""
    arguments = _bad()
    g = ops.check_arguments(arguments["input"], arguments["rois"], arguments["offset"],
                            arguments["mask"], 3, 2, 0.5, 0, 0.0917, True)
    ops.check_values(arguments["rois"], g.batch, g)
    with pytest.raises(ValueError, match=r"got 2.0 in RoI 3"):
        ops.check_values(_rois_with(3, 0, 2.0), g.batch, g)
    huge = torch.tensor([[0, 0.0, 0.0, 1e7, 1.0]])
    with pytest.raises(ValueError, match=r"RoI 0 needs an adaptive sampling grid"):
        ops.check_values(huge, g.batch, g)
    ops.check_values(huge, g.batch, None)  # an explicit sampling_ratio: no grid to check


def test_missing_mask():
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        ops.modulated_deform_roi_pool(**_bad(mask=None))


# --------------------------------------------------------------------------- #
# torch.library.
# --------------------------------------------------------------------------- #


def _tiny_op_arguments(with_offset: bool, with_mask: bool, aligned: bool = True,
                       design: str = "pw_fastest"):
    case = Case(N=2, C=2, H=4, W=5, pooled_h=2, pooled_w=2)
    inputs = make_inputs(case, "modulated_deform_roi_pool", torch.float32, seed=12)
    input = inputs["input"].requires_grad_()
    offset = inputs["offset"].requires_grad_() if with_offset else None
    mask = inputs["mask"].requires_grad_() if with_mask else None
    return (input, inputs["rois"], offset, mask, 2, 2, 0.5, 0, 0.1, aligned, design)


@pytest.mark.parametrize(
    "with_offset, with_mask, aligned",
    [(False, False, True), (False, False, False), (True, False, True), (True, True, True)],
    ids=[OPS[0], "roi_align_not_aligned", *OPS[1:]],
)
@pytest.mark.parametrize("design", DESIGNS)
def test_opcheck(with_offset, with_mask, aligned, design):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of our op."""
    torch.library.opcheck(
        torch.ops.dcnbench.deform_roi_pool.default,
        _tiny_op_arguments(with_offset, with_mask, aligned, design),
    )


@pytest.mark.parametrize("design", DESIGNS)
def test_opcheck_backward(design):
    input, rois, offset, mask, *params = (
        a.detach() if isinstance(a, torch.Tensor) else a
        for a in _tiny_op_arguments(True, True, design=design)
    )
    grad_output = torch.randn(rois.shape[0], 2, 2, 2)
    torch.library.opcheck(
        torch.ops.dcnbench.deform_roi_pool_backward.default,
        (grad_output, input, rois, offset, mask, *params, [True, True, True]),
    )


def test_torch_compile_fullgraph():
    """A function using the op compiles with fullgraph=True and matches eager, forward and backward."""
    case = CASES["sampling_ratio_2"]
    op = "modulated_deform_roi_pool"
    inputs = make_inputs(case, op, torch.float32, seed=14)

    def pooled_sum(input, offset, mask):
        out = ops.modulated_deform_roi_pool(input, inputs["rois"], offset, mask, **case.params(op))
        return out.square().sum()

    tensors = [inputs[n].clone().requires_grad_() for n in ("input", "offset", "mask")]
    eager = pooled_sum(*tensors)
    eager_grads = torch.autograd.grad(eager, tensors)
    compiled = torch.compile(pooled_sum, fullgraph=True, backend="aot_eager")
    result = compiled(*tensors)
    torch.testing.assert_close(result, eager, rtol=1e-6, atol=1e-6)
    for grad, expected in zip(torch.autograd.grad(result, tensors), eager_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- #
# On a GPU.
# --------------------------------------------------------------------------- #


def _gpu_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_unavailable() is not None, reason=str(_gpu_unavailable()))
class TestOnGPU:
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    @pytest.mark.parametrize("op", OPS)
    @pytest.mark.parametrize("case_name", list(CASES))
    @pytest.mark.parametrize("design", DESIGNS)
    def test_against_reference(self, case_name, op, dtype, design):
        case = CASES[case_name]
        inputs = {
            n: None if t is None else t.cuda() for n, t in make_inputs(case, op, dtype).items()
        }
        check_against_reference(op, inputs, case.params(op, design), dtype)

    @pytest.mark.parametrize("design", DESIGNS)
    def test_roi_align_against_torchvision(self, design):
        """A larger case (many RoIs, 256 channels) vs torchvision's CUDA roi_align."""
        case = Case(N=2, C=256, H=38, W=50, pooled_h=7, pooled_w=7, spatial_scale=1 / 16)
        generator = torch.Generator().manual_seed(13)
        rois = torch.cat([make_rois(case, generator) for _ in range(30)]).cuda()
        x = torch.randn(case.N, case.C, case.H, case.W, generator=generator).cuda()
        ours = ops.roi_align(x, rois, **case.params("roi_align", design))
        expected = torchvision.ops.roi_align(
            x, rois, (7, 7), case.spatial_scale, case.sampling_ratio, aligned=True
        )
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
