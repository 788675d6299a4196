"""Edge cases of our DCNv3 / DCNv4 kernels that the main matrix (tests/test_dcnv3.py) misses.

Each test targets one behaviour a single-change bug in ``kernels/cuda/dcnv3_*``
got through (issue 17's mutation probe): ``offset_scale`` != 1 on kernels
whose taps are not at 0, a dominant softmax logit on every tap position,
B0's borders with the other coordinate inside the map (forward and
gradients), and the float16 / bfloat16 rounding of the output, bit-exact.
The oracle is the float64 reference (``kernels.reference.dcnv3``); every
kernel output starts as NaN.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_checks import close_to_reference

from kernels import emulator
from kernels.ops import dcnv3 as ops
from kernels.ops.dcnv4 import dcnv4
from kernels.reference import dcnv3 as reference

# The bounds of tests/test_dcnv3.py.
REL_L2 = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 5e-3}
MAX_ABS = {dtype: 2 * bound for dtype, bound in REL_L2.items()}
KINDS = ("dcnv3", "dcnv3_softmax", "dcnv4")

assert_close = close_to_reference(REL_L2, MAX_ABS)
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


@dataclasses.dataclass(frozen=True)
class Case:
    N: int = 1
    H: int = 5
    W: int = 6
    group: int = 2
    group_channels: int = 4
    kernel_h: int = 3
    kernel_w: int = 3
    stride_h: int = 1
    stride_w: int = 1
    pad_h: int = 1
    pad_w: int = 1
    dilation_h: int = 1
    dilation_w: int = 1
    offset_scale: float = 1.0
    remove_center: bool = False

    @property
    def geometry(self) -> reference.Geometry:
        return reference.Geometry.from_params(dataclasses.asdict(self))

    @property
    def taps(self) -> int:
        return self.geometry.taps

    @property
    def out_size(self) -> tuple[int, int]:
        return self.geometry.output_size(self.H, self.W)

    def params(self) -> dict:
        params = dataclasses.asdict(self)
        for size in ("N", "H", "W"):
            del params[size]
        return params


def offsets_for(case: Case, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The offsets [N, H_out, W_out, G·P·2] that make every tap sample at the
    absolute positions ``y``, ``x`` [N, H_out, W_out, G, P] (float64, exact
    for positions and scales that are short binary fractions)."""
    g = case.geometry
    out_h, out_w = case.out_size
    tap_y, tap_x = g.tap_grid(dtype=torch.float64, device="cpu")
    base_y, base_x = g.window_origin(out_h, out_w, dtype=torch.float64, device="cpu")
    dx = (x - base_x[None, None, :, None, None]) / g.offset_scale - tap_x
    dy = (y - base_y[None, :, None, None, None]) / g.offset_scale - tap_y
    return torch.stack((dx, dy), dim=-1).reshape(case.N, out_h, out_w, -1)


def modulation_inputs(kind: str, case: Case, offset: torch.Tensor, mask: torch.Tensor) -> dict:
    """``offset`` and ``mask`` (dcnv3), or dcnv4's ``offset_mask`` packed from
    them (padding columns 0)."""
    if kind != "dcnv4":
        return {"offset": offset, "mask": mask}
    pixel = offset.shape[:3]
    fused = torch.cat(
        (offset.view(*pixel, case.group, -1), mask.view(*pixel, case.group, -1)), dim=-1
    ).reshape(*pixel, -1)
    padding = reference.offset_mask_channels(case.group, case.taps) - fused.shape[-1]
    return {"offset_mask": torch.nn.functional.pad(fused, (0, padding))}


def run(module, kind: str, inputs: dict, case: Case, design: str | None = None) -> torch.Tensor:
    """``kind`` of ``module`` (``ops``/``dcnv4`` when ``design`` is given, else the reference)."""
    params = case.params()
    if design is not None:
        params["design"] = design
    if kind == "dcnv4":
        function = dcnv4 if design is not None else reference.dcnv4
        return function(inputs["input"], inputs["offset_mask"], **params)
    function = ops.dcnv3 if design is not None else reference.dcnv3
    return function(
        inputs["input"], inputs["offset"], inputs["mask"], **params, softmax=kind == "dcnv3_softmax"
    )


def check_against_reference(kind: str, inputs: dict, case: Case, design: str,
                            dtype: torch.dtype = torch.float32,
                            differentiable: tuple[str, ...] | None = None) -> torch.Tensor:
    """Forward and the gradients of ``differentiable`` (default: every input),
    ours vs float64; returns the reference output."""
    differentiable = tuple(inputs) if differentiable is None else differentiable
    leaves = {n: t.to(dtype).requires_grad_(n in differentiable) for n, t in inputs.items()}
    references = {
        n: t.to(dtype).double().requires_grad_(n in differentiable) for n, t in inputs.items()
    }
    out = run(ops, kind, leaves, case, design)
    expected = run(reference, kind, references, case)
    assert_close("output", out, expected, dtype)
    if not differentiable:
        return expected
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, [leaves[n] for n in differentiable], grad_output)
    expected_grads = torch.autograd.grad(
        expected, [references[n] for n in differentiable], grad_output.double()
    )
    for name, grad, expected_grad in zip(differentiable, grads, expected_grads, strict=True):
        assert_close(f"grad_{name}", grad, expected_grad, dtype)
    return expected


def off_kink_positions(case: Case, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute sampling positions, [N, H_out, W_out, G, P] each: an integer in
    [-2, size] plus a fraction in [0.15, 0.85], so that no sample is near a
    kink of B0 (gradients are compared)."""
    out_h, out_w = case.out_size
    shape = (case.N, out_h, out_w, case.group, case.taps)

    def positions(size: int) -> torch.Tensor:
        whole = torch.randint(-2, size + 1, shape, generator=generator).double()
        return whole + 0.15 + 0.7 * torch.rand(shape, generator=generator, dtype=torch.float64)

    return positions(case.H), positions(case.W)


def random_inputs(kind: str, case: Case, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    out_h, out_w = case.out_size
    y, x = off_kink_positions(case, generator)
    mask = torch.rand(case.N, out_h, out_w, case.group * case.taps, generator=generator)
    if kind == "dcnv3_softmax":
        mask = 3 * torch.randn(mask.shape, generator=generator)  # logits
    channels = case.group * case.group_channels
    return {
        "input": torch.randn(case.N, case.H, case.W, channels, generator=generator),
        **modulation_inputs(kind, case, offsets_for(case, y, x).float(), mask),
    }


# --------------------------------------------------------------------------- #
# offset_scale != 1 where the taps are not at 0: (tap + d) · scale, not tap + d · scale.
# --------------------------------------------------------------------------- #

SCALED_CASES = {
    "3x3_offset_scale_0.75": Case(offset_scale=0.75),
    "3x5_dilation2_offset_scale_1.5": Case(
        H=6, W=9, group=1, group_channels=8, kernel_h=3, kernel_w=5, pad_h=2, pad_w=4,
        dilation_h=2, dilation_w=2, offset_scale=1.5,
    ),  # fmt: skip
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("design", ops.DESIGNS)
@pytest.mark.parametrize("case_name", list(SCALED_CASES))
def test_offset_scale_on_wide_kernels(case_name, design, kind):
    case = SCALED_CASES[case_name]
    check_against_reference(kind, random_inputs(kind, case, seed=21), case, design)


# --------------------------------------------------------------------------- #
# The fused softmax with one logit far above the others, at every tap position.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_softmax_with_a_dominant_logit_on_every_tap(design, dtype):
    """(pixel, group) item i has its tap i mod P 120 above the rest: every tap
    position, the last included, is the maximum somewhere (a max that skips a
    tap gives exp(120) = inf there)."""
    case = Case()
    inputs = random_inputs("dcnv3_softmax", case, seed=22)
    logits = inputs["mask"].view(-1, case.taps)  # one row per (pixel, group)
    dominant = torch.arange(logits.shape[0]) % case.taps
    assert set(dominant.tolist()) == set(range(case.taps))
    logits[torch.arange(logits.shape[0]), dominant] += 120
    check_against_reference("dcnv3_softmax", inputs, case, design, dtype, ("input", "offset"))
    # The logits' true gradient is below 1e-50 (the softmax is one-hot to
    # float32): compared in absolute terms, it must come out finite and ~0.
    typed = {n: t.to(dtype).requires_grad_(n == "mask") for n, t in inputs.items()}
    out = run(ops, "dcnv3_softmax", typed, case, design)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (grad_logits,) = torch.autograd.grad(out, [typed["mask"]], grad_output)
    assert torch.isfinite(grad_logits).all(), "grad_mask: NaN or Inf"
    assert grad_logits.abs().max().item() <= 1e-6


# --------------------------------------------------------------------------- #
# B0's borders, torchvision-style: y and x drawn independently, each border
# value paired with in-map values of the other coordinate.
# --------------------------------------------------------------------------- #

BORDER_CASE = Case(N=1, H=4, W=5, group=2, group_channels=4)


def border_positions(case: Case, borders_y: list[float], borders_x: list[float],
                     inside_y: list[float], inside_x: list[float],
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, H_out, W_out, G, P] positions: first every border value of one
    coordinate with every in-map value of the other, then independent draws
    from border and in-map values alike; the slots are shuffled."""
    out_h, out_w = case.out_size
    shape = (case.N, out_h, out_w, case.group, case.taps)
    slots = torch.Size(shape).numel()
    pairs = [(y, x) for y in borders_y for x in inside_x]
    pairs += [(y, x) for y in inside_y for x in borders_x]
    assert len(pairs) <= slots, "the case has too few sampling slots for every pair"
    generator = torch.Generator().manual_seed(seed)
    values_y = torch.tensor(borders_y + inside_y, dtype=torch.float64)
    values_x = torch.tensor(borders_x + inside_x, dtype=torch.float64)
    rest = slots - len(pairs)
    y = torch.cat((torch.tensor([p[0] for p in pairs], dtype=torch.float64),
                   values_y[torch.randint(len(values_y), (rest,), generator=generator)]))
    x = torch.cat((torch.tensor([p[1] for p in pairs], dtype=torch.float64),
                   values_x[torch.randint(len(values_x), (rest,), generator=generator)]))
    order = torch.randperm(slots, generator=generator)
    return y[order].view(shape), x[order].view(shape)


def border_inputs(kind: str, case: Case, y: torch.Tensor, x: torch.Tensor, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    out_h, out_w = case.out_size
    mask = 0.25 + torch.rand(case.N, out_h, out_w, case.group * case.taps, generator=generator)
    channels = case.group * case.group_channels
    return {
        "input": torch.randn(case.N, case.H, case.W, channels, generator=generator),
        **modulation_inputs(kind, case, offsets_for(case, y, x).float(), mask),
    }


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_exact_borders_with_the_other_coordinate_inside(design, kind):
    """Samples exactly on -1, -0.5, 0, H-1, H-0.5, H (W likewise) with the
    other coordinate inside: the output there is not all zero, and the
    gradients are compared too. The positions are short binary fractions with
    offset_scale 1, exact in float32 and float64 alike, so kernel and
    reference take the same side of every kink and the slopes must agree."""
    case = BORDER_CASE
    H, W = case.H, case.W
    y, x = border_positions(
        case,
        borders_y=[-1.0, -0.5, 0.0, H - 1.0, H - 0.5, float(H)],
        borders_x=[-1.0, -0.5, 0.0, W - 1.0, W - 0.5, float(W)],
        inside_y=[0.25, 1.5, H - 1.75],
        inside_x=[0.75, 2.25, W - 1.5],
        seed=23,
    )
    expected = check_against_reference(kind, border_inputs(kind, case, y, x, seed=24), case,
                                       design)
    assert (expected != 0).double().mean() > 0.9, "the samples are mostly outside the map"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_gradients_next_to_the_borders(design, kind):
    """Samples an eighth of a pixel inside and outside every border (away from
    the kinks), each with the other coordinate inside: forward and gradients."""
    case = BORDER_CASE
    H, W = case.H, case.W

    def near(size: int) -> list[float]:
        return [-1.125, -0.875, -0.125, 0.125, size - 1.125, size - 0.875, size - 0.125,
                size + 0.125]

    y, x = border_positions(
        case,
        borders_y=near(H),
        borders_x=near(W),
        inside_y=[0.375, 1.625, H - 1.625],
        inside_x=[0.625, 2.375, W - 1.375],
        seed=25,
    )
    check_against_reference(kind, border_inputs(kind, case, y, x, seed=26), case, design)


# --------------------------------------------------------------------------- #
# float16 / bfloat16 output rounding, bit-exact.
# --------------------------------------------------------------------------- #


def exactly_representable_values(shape: tuple[int, ...], dtype: torch.dtype,
                                 generator: torch.Generator) -> torch.Tensor:
    """Random values with every significand bit of ``dtype`` in use and
    magnitudes below 4, on one fixed grid: (integer of the dtype's significand
    width) · 2^-k, so blends of them with short binary weights sum exactly in
    float32."""
    bits = {torch.float16: 11, torch.bfloat16: 8}[dtype]
    whole = torch.randint(-(2**bits) + 1, 2**bits, shape, generator=generator)
    return whole.double() * 2.0 ** (2 - bits)


def assert_rounded_to_nearest_even(name: str, actual: torch.Tensor, exact: torch.Tensor,
                                   dtype: torch.dtype) -> None:
    """``actual`` is ``exact`` (a float64 value exact in float32) rounded once to
    ``dtype`` by round-to-nearest-even (PyTorch's conversion), bit for bit."""
    assert torch.equal(exact, exact.float().double()), f"{name}: the float32 result is not exact"
    expected = exact.float().to(dtype)
    rounded = (expected.double() != exact).double().mean().item()
    assert rounded > 0.25, f"{name}: only {rounded:.0%} of the values need rounding"
    assert actual.dtype == dtype
    mismatched = (actual.view(torch.int16) != expected.view(torch.int16)).sum().item()
    assert mismatched == 0, (
        f"{name}: {mismatched} of {actual.numel()} values are not the round-to-nearest-even "
        f"{dtype} of the exact result"
    )


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("kind", ("dcnv3", "dcnv4"))
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_half_precision_output_is_rounded_to_nearest_even(design, kind, dtype):
    """Inputs on a grid, offsets in quarters, masks in {0.5, 0.75, 1}: the
    float32 sum is exact, so the stored output must be exactly its
    round-to-nearest-even. D = 8: one 16-byte vector per lane (vectorized)."""
    case = Case(N=1, H=4, W=5, group=2, group_channels=8)
    generator = torch.Generator().manual_seed(27)
    out_h, out_w = case.out_size
    shape = (case.N, out_h, out_w, case.group, case.taps)
    y = torch.randint(-1, case.H, shape, generator=generator) + 0.25 * torch.randint(
        4, shape, generator=generator
    )
    x = torch.randint(-1, case.W, shape, generator=generator) + 0.25 * torch.randint(
        4, shape, generator=generator
    )
    masks = torch.tensor([0.5, 0.75, 1.0])
    mask = masks[torch.randint(3, (case.N, out_h, out_w, case.group * case.taps),
                               generator=generator)]
    channels = case.group * case.group_channels
    inputs = {
        "input": exactly_representable_values((case.N, case.H, case.W, channels), dtype,
                                              generator),
        **modulation_inputs(kind, case, offsets_for(case, y.double(), x.double()), mask.double()),
    }
    typed = {n: t.to(dtype) for n, t in inputs.items()}
    assert all(torch.equal(typed[n].double(), t) for n, t in inputs.items())
    out = run(ops, kind, typed, case, design)
    exact = run(reference, kind, inputs, case)
    assert_rounded_to_nearest_even("output", out, exact, dtype)


# --------------------------------------------------------------------------- #
# Under AddressSanitizer: the vectors' local arrays and every global access.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("group_channels", [8, 6], ids=["16_byte_vectors", "scalar_path"])
@pytest.mark.parametrize("kind", ("dcnv3", "dcnv3_softmax"))
def test_vectorized_design_under_asan(kind, group_channels, dtype):
    """Forward and backward of the vectorized design in the emulator's asan
    mode: a vector loop that runs one element too far reads and writes past a
    thread's local arrays (or a tensor's end), which the normal build may
    silently survive. D = 8 packs 16-byte vectors; D = 6 takes the scalar path.
    (Not dcnv4: it passes one buffer as both grad_offset and grad_mask, and
    the asan mode's separate copy of each array argument loses one of the two
    writers' results; the vector code is the same.)"""
    case = Case(N=1, H=3, W=4, group=2, group_channels=group_channels)
    with emulator.mode("asan"):
        check_against_reference(kind, random_inputs(kind, case, seed=28), case, "vectorized",
                                dtype)
