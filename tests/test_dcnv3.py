"""Our DCNv3 kernels (``kernels.ops.dcnv3``), both designs, against the float64 reference.

On the CPU the very CUDA sources the GPU runs go through ``kernels.emulator``.
Every kernel call runs with outputs poisoned with NaN, so an element a kernel
forgets to write fails the comparison. The oracle is the float64 reference
(``kernels.reference.dcnv3``, from the contract) on the same (already rounded)
inputs, its gradients by autograd; errors are relative L2 and max-abs
relative to max |ref|. The helpers here serve ``tests/test_dcnv4.py`` too.

``TestOnGPU`` runs the same comparisons on CUDA; it is skipped without a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_checks import close_to_reference

from kernels import emulator, launch
from kernels.ops import dcnv3 as ops
from kernels.ops.dcnv4 import dcnv4
from kernels.reference import dcnv3 as reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Relative L2 bound per dtype: a few units of the dtype's rounding (inputs are
# already rounded, outputs and gradients are rounded once; all sums float32).
REL_L2 = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 5e-3, torch.float64: 1e-13}
MAX_ABS = {dtype: 2 * bound for dtype, bound in REL_L2.items()}
# The operator variants the kernels are instantiated for.
KINDS = ("dcnv3", "dcnv3_softmax", "dcnv4")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Every kernel output starts as NaN: an unwritten element fails its comparison.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


@dataclasses.dataclass(frozen=True)
class Case:
    N: int = 2
    H: int = 5
    W: int = 6
    group: int = 2
    group_channels: int = 8
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

    def params(self) -> dict:
        """Keyword arguments of dcnv3 / dcnv4 (without softmax and design)."""
        params = dataclasses.asdict(self)
        for size in ("N", "H", "W"):
            del params[size]
        return params


CASES = {
    "basic_3x3": Case(),
    "5x5_remove_center_D24": Case(
        N=1,
        H=6,
        W=5,
        group=1,
        group_channels=24,
        kernel_h=5,
        kernel_w=5,
        pad_h=2,
        pad_w=2,
        remove_center=True,
    ),
    "3x5_stride2_dilation2_G3_D16": Case(
        N=1,
        H=7,
        W=8,
        group=3,
        group_channels=16,
        kernel_h=3,
        kernel_w=5,
        stride_h=2,
        stride_w=2,
        pad_h=2,
        pad_w=3,
        dilation_h=2,
        dilation_w=2,
    ),
    "1x1_D3_offset_scale_2": Case(
        N=2,
        H=3,
        W=4,
        group=2,
        group_channels=3,
        kernel_h=1,
        kernel_w=1,
        pad_h=0,
        pad_w=0,
        offset_scale=2.0,
    ),
    "tiny_map_1x1": Case(N=1, H=1, W=1, group=1, group_channels=8),
    "tiny_map_2x3_D1_G4": Case(N=1, H=2, W=3, group=4, group_channels=1),
    # Vectorized: more vectors than a warp's lanes (several per lane); direct:
    # more channels than a block's threads.
    "wide_D300": Case(N=1, H=2, W=2, group=1, group_channels=300),
    # Vectorized: idle lanes (20 vectors of 8 halves on 32 lanes); direct:
    # one 160-thread segment per block, 96 threads outside every segment.
    "D160": Case(N=1, H=2, W=3, group=2, group_channels=160),
    # The staged design's other tap counts (basic_3x3 has 9): 8 and 25, several
    # blocks of items, the last one partial; 5x5 with G = 3 pads offset_mask.
    "3x3_remove_center_stride2_G3_D16": Case(
        N=1, H=9, W=8, group=3, group_channels=16, stride_h=2, stride_w=2, remove_center=True
    ),
    "5x5_G3_D16": Case(
        N=1, H=6, W=7, group=3, group_channels=16, kernel_h=5, kernel_w=5, pad_h=2, pad_w=2
    ),
}


def make_inputs(
    case: Case, kind: str, dtype: torch.dtype, seed: int = 0, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Inputs in ``dtype``: ``input`` and ``offset`` + ``mask`` (dcnv3) or ``offset_mask`` (dcnv4).

    Sampling points are an integer plus a fraction in [0.15, 0.85] from the
    undeformed tap, so no sample sits on a kink of B0 (gradients are checked):
    (tap + dx)·offset_scale = tap·offset_scale + u, dx = u / offset_scale.
    """
    generator = torch.Generator().manual_seed(seed)
    out_h, out_w = case.geometry.output_size(case.H, case.W)
    taps = case.geometry.taps
    pixel = (case.N, out_h, out_w)
    shift = torch.randint(-2, 3, (*pixel, case.group * taps * 2), generator=generator).float()
    shift += 0.15 + 0.7 * torch.rand(shift.shape, generator=generator)
    offset = shift / case.offset_scale
    mask = torch.rand(*pixel, case.group * taps, generator=generator)
    if kind == "dcnv3_softmax":
        mask = 3 * torch.randn(mask.shape, generator=generator)  # logits
    inputs = {
        "input": torch.randn(
            case.N, case.H, case.W, case.group * case.group_channels, generator=generator
        )
    }
    if kind == "dcnv4":
        inputs["offset_mask"] = pack_offset_mask(offset, mask, case.group, taps, generator)
    else:
        inputs |= {"offset": offset, "mask": mask}
    return {name: t.to(device, dtype) for name, t in inputs.items()}


def pack_offset_mask(offset, mask, group, taps, generator) -> torch.Tensor:
    """dcnv4's offset_mask from dcnv3's offset and mask; random padding columns
    (which every implementation must ignore)."""
    pixel = offset.shape[:3]
    fused = torch.cat(
        (offset.view(*pixel, group, 2 * taps), mask.view(*pixel, group, taps)), dim=-1
    ).view(*pixel, group * 3 * taps)
    padding = reference.offset_mask_channels(group, taps) - group * 3 * taps
    return torch.cat((fused, torch.randn(*pixel, padding, generator=generator)), dim=-1)


def run_ours(kind: str, inputs: dict, params: dict, design: str) -> torch.Tensor:
    if kind == "dcnv4":
        return dcnv4(inputs["input"], inputs["offset_mask"], **params, design=design)
    return ops.dcnv3(
        inputs["input"],
        inputs["offset"],
        inputs["mask"],
        **params,
        softmax=kind == "dcnv3_softmax",
        design=design,
    )


def run_reference(kind: str, inputs: dict, params: dict) -> torch.Tensor:
    if kind == "dcnv4":
        return reference.dcnv4(inputs["input"], inputs["offset_mask"], **params)
    return reference.dcnv3(
        inputs["input"], inputs["offset"], inputs["mask"], **params, softmax=kind == "dcnv3_softmax"
    )


assert_close = close_to_reference(REL_L2, MAX_ABS)


def check_against_reference(
    kind: str,
    inputs: dict,
    params: dict,
    design: str,
    dtype: torch.dtype,
    differentiable: tuple[str, ...] | None = None,
):
    """Forward and the gradients of ``differentiable`` (default: every input)
    of ours vs the float64 reference."""
    differentiable = tuple(inputs) if differentiable is None else differentiable
    leaves = {n: t.detach().clone().requires_grad_(n in differentiable) for n, t in inputs.items()}
    references = {
        n: t.detach().double().requires_grad_(n in differentiable) for n, t in inputs.items()
    }
    out = run_ours(kind, leaves, params, design)
    expected = run_reference(kind, references, params)
    assert_close("output", out, expected, dtype)
    if not differentiable:
        return
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(
        out.device, dtype
    )
    grads = torch.autograd.grad(out, [leaves[n] for n in differentiable], grad_output)
    expected_grads = torch.autograd.grad(
        expected, [references[n] for n in differentiable], grad_output.double()
    )
    for name, grad, expected_grad in zip(differentiable, grads, expected_grads, strict=True):
        assert_close(f"grad_{name}", grad, expected_grad, dtype)


# --------------------------------------------------------------------------- #
# Forward and gradients vs the reference (dcnv4 runs through the same helper
# here: the kernels are one family, so one matrix covers every instantiation).
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("design", ops.DESIGNS)
@pytest.mark.parametrize("case_name", list(CASES))
def test_forward_and_gradients(case_name, design, dtype, kind):
    case = CASES[case_name]
    check_against_reference(kind, make_inputs(case, kind, dtype), case.params(), design, dtype)


@pytest.mark.parametrize("design", ops.DESIGNS)
def test_input_gradient_not_requested(design):
    """No grad_input: the kernel skips the scatter; the other gradients are unchanged."""
    case = CASES["basic_3x3"]
    check_against_reference(
        "dcnv3_softmax",
        make_inputs(case, "dcnv3_softmax", torch.float32),
        case.params(),
        design,
        torch.float32,
        ("offset", "mask"),
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("design", ops.DESIGNS)
@pytest.mark.parametrize("case_name", ["basic_3x3", "5x5_remove_center_D24"])
def test_float64_kernels(case_name, design, kind):
    """The float64 instantiations compute in double: the reference's numbers to 1e-13."""
    case = CASES[case_name]
    inputs = make_inputs(case, kind, torch.float64)
    check_against_reference(kind, inputs, case.params(), design, torch.float64)


@pytest.mark.usefixtures("deterministic_algorithms")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_gradcheck_on_the_emulated_kernels(design, kind):
    """torch.autograd.gradcheck (float64, as InternImage's and DCNv4's tests run it) on
    every input of both designs' kernels, sampling points away from B0's kinks. In
    deterministic mode: gradcheck also requires two backwards to agree exactly,
    which float atomics do not (else pass it ``nondet_tol``)."""
    case = Case(N=1, H=3, W=4, group=2, group_channels=3, offset_scale=2.0)
    inputs = make_inputs(case, kind, torch.float64, seed=8)
    names = list(inputs)

    def function(*tensors):
        return run_ours(kind, dict(zip(names, tensors, strict=True)), case.params(), design)

    leaves = [inputs[n].requires_grad_() for n in names]
    assert torch.autograd.gradcheck(function, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def gradients(kind: str, inputs: dict, params: dict, design: str, grad_output) -> tuple:
    """Every gradient of ours, for ``grad_output``."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    out = run_ours(kind, leaves, params, design)
    return torch.autograd.grad(out, list(leaves.values()), grad_output)


@pytest.mark.usefixtures("deterministic_algorithms")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("design", ops.DESIGNS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
# 15 taps run every design's runtime-tap kernels, 8 the staged design's own.
@pytest.mark.parametrize(
    "case_name", ["3x5_stride2_dilation2_G3_D16", "3x3_remove_center_stride2_G3_D16"]
)
def test_deterministic_backward(case_name, dtype, design, kind):
    """Under torch.use_deterministic_algorithms(True): as accurate, and the same bits twice."""
    case = CASES[case_name]
    inputs = make_inputs(case, kind, dtype, seed=2)
    check_against_reference(kind, inputs, case.params(), design, dtype)
    out_h, out_w = case.geometry.output_size(case.H, case.W)
    grad_output = torch.randn(
        case.N, out_h, out_w, case.group * case.group_channels,
        generator=torch.Generator().manual_seed(3),
    ).to(dtype)  # fmt: skip
    first = gradients(kind, inputs, case.params(), design, grad_output)
    second = gradients(kind, inputs, case.params(), design, grad_output)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("design", ops.DESIGNS)
def test_deterministic_backward_takes_the_fixed_point_path(design, deterministic_algorithms):
    """One NaN in grad_output: float atomics spread it to the inputs it samples,
    the fixed-point sums (no NaN in fixed point) make all of grad_input NaN."""
    case = CASES["basic_3x3"]
    inputs = make_inputs(case, "dcnv4", torch.float32, seed=4)
    grad_output = torch.ones(case.N, case.H, case.W, case.group * case.group_channels)
    grad_output[0, 0, 0, 0] = float("nan")
    assert gradients("dcnv4", inputs, case.params(), design, grad_output)[0].isnan().all()
    torch.use_deterministic_algorithms(False)
    assert not gradients("dcnv4", inputs, case.params(), design, grad_output)[0].isnan().all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("design", ops.DESIGNS)
@pytest.mark.parametrize("N, group_channels", [(0, 8), (2, 0)], ids=["batch_0", "no_channels"])
def test_empty_batch_and_channels(N, group_channels, design, kind):
    """An empty output and zero gradients of the right shapes, as the reference's."""
    case = dataclasses.replace(CASES["basic_3x3"], N=N, group_channels=group_channels)
    inputs = make_inputs(case, kind, torch.float32)
    leaves = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    references = {n: t.double().requires_grad_() for n, t in inputs.items()}
    out = run_ours(kind, leaves, case.params(), design)
    expected = run_reference(kind, references, case.params())
    assert out.shape == expected.shape == (N, case.H, case.W, case.group * group_channels)
    grads = torch.autograd.grad(out, list(leaves.values()), torch.ones(out.shape))
    expected_grads = torch.autograd.grad(
        expected, list(references.values()), torch.ones(out.shape, dtype=torch.float64)
    )
    for name, grad, expected_grad in zip(leaves, grads, expected_grads, strict=True):
        assert grad.shape == inputs[name].shape and not grad.isnan().any(), name
        assert torch.equal(grad.double(), expected_grad), name
        assert not grad.any(), name


@pytest.mark.usefixtures("deterministic_algorithms")  # bitwise-comparable grad_input
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_non_contiguous_and_channels_last_strided_inputs(design):
    """A permuted NCHW input, a sliced offset and a transposed-memory mask are
    copied to dense channels-last: the same bits as contiguous ones, gradients
    included; the reference takes them as they are."""
    case = CASES["basic_3x3"]
    inputs = make_inputs(case, "dcnv3_softmax", torch.float32, seed=5)
    strided = {
        "input": inputs["input"].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
        "offset": torch.cat((inputs["offset"], inputs["offset"]), dim=-1)[..., : inputs["offset"].shape[-1]],
        "mask": inputs["mask"].transpose(1, 2).contiguous().transpose(1, 2),
    }  # fmt: skip
    assert not any(t.is_contiguous() for t in strided.values())
    for name, t in strided.items():
        assert torch.equal(t, inputs[name]), name
    grad_output = torch.randn(2, case.H, case.W, 16, generator=torch.Generator().manual_seed(6))
    expected = gradients("dcnv3_softmax", inputs, case.params(), design, grad_output)
    got = gradients("dcnv3_softmax", strided, case.params(), design, grad_output)
    for name, a, b in zip(inputs, got, expected, strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(
        run_reference("dcnv3_softmax", strided, case.params()),
        run_reference("dcnv3_softmax", inputs, case.params()),
    )


@pytest.mark.parametrize(
    "case_name, kernel, threads",
    [
        # 8 channels of float32: 2 vectors, 2 lanes an item, 32 items a block.
        ("basic_3x3", "dcnv3_staged_backward<float, 0, 4, 9>", 64),
        # 16: 4 lanes an item.
        ("3x3_remove_center_stride2_G3_D16", "dcnv3_staged_backward<float, 0, 4, 8>", 128),
        ("5x5_G3_D16", "dcnv3_staged_backward<float, 0, 4, 25>", 128),
        # 300 channels: 75 vectors on 32 lanes, 8 items a block.
        ("wide_D300", "dcnv3_staged_backward<float, 0, 4, 9>", 256),
        ("3x5_stride2_dilation2_G3_D16", "dcnv3_vectorized_backward<float, 0, 4>", 256),
    ],
)
def test_staged_design_runs_its_tap_counts_and_says_why_not(case_name, kernel, threads):
    """The staged design has kernels for STAGED_TAPS; other tap counts run the
    vectorized ones, the reason in the launch log; blocks of at most STAGED_ITEMS items."""
    case = CASES[case_name]
    inputs = make_inputs(case, "dcnv3", torch.float32)
    leaves = {n: t.requires_grad_() for n, t in inputs.items()}
    with launch.recorded_launches() as log:
        run_ours("dcnv3", leaves, case.params(), "staged").sum().backward()
    assert [(r.kernel, r.block[0]) for r in log][-1] == (kernel, threads)
    staged = "staged" in kernel
    assert ("vectorized kernels: 15 taps" in log[-1].variant_reason) != staged


@pytest.mark.parametrize("design, itemsize", [("vectorized", 4), ("staged", 2)])
def test_half_gradients_of_offset_and_mask_written_by_the_kernel(design, itemsize):
    """In float16 the staged backward stores grad_offset / grad_mask as float16,
    each element once (no float32 buffer and no conversion pass after it); the
    vectorized one stores float32 buffers (the contrast makes the check bite)."""
    case = CASES["basic_3x3"]
    inputs = make_inputs(case, "dcnv3", torch.float16)
    leaves = {n: t.requires_grad_() for n, t in inputs.items()}
    with emulator.mode("counters"), emulator.recording() as launches:
        run_ours("dcnv3", leaves, case.params(), design).sum().backward()
    backward = next(r for r in launches if "backward" in r.kernel)
    for name in ("offset", "mask"):
        [written] = [b for b in backward.buffers if b.name == f"grad_{name}"]
        assert written.nbytes == written.access["store"].bytes_useful == (
            inputs[name].numel() * itemsize
        )
        assert leaves[name].grad.dtype == torch.float16


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=dtype_id)
def test_misaligned_input_takes_the_scalar_path(dtype):
    """A contiguous input whose data is not 16-byte aligned (a view one element
    in) runs the vectorized design's scalar instantiation, correctly."""
    case = CASES["basic_3x3"]
    inputs = make_inputs(case, "dcnv3", dtype)
    storage = torch.empty(inputs["input"].numel() + 1, dtype=dtype)
    inputs["input"] = storage[1:].view(inputs["input"].shape).copy_(inputs["input"])
    assert inputs["input"].data_ptr() % ops.VECTOR_BYTES != 0
    call = ops.check_arguments(
        inputs["input"],
        {"offset": (inputs["offset"], lambda p: 2 * case.group * p)},
        {k: v for k, v in case.params().items() if k not in ("group", "group_channels")},
        case.group,
        case.group_channels,
    )
    vector, why = ops._vector(ops._DESIGN_TABLE["vectorized"], call, dtype, inputs["input"])
    assert vector == 1 and "16-byte boundary" in why
    check_against_reference("dcnv3", inputs, case.params(), "vectorized", dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("design", ops.DESIGNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_on_borders_and_far_outside(dtype, design, kind):
    """Points exactly on the borders (-1, 0, H-1, H and between), half a pixel
    outside and far outside (+-1e4; 3e9, beyond int range, where the dtype has it)."""
    case = Case(N=1, H=4, W=5, group=2, group_channels=8)
    inputs = make_inputs(case, kind, dtype)
    name = "offset_mask" if kind == "dcnv4" else "offset"
    taps = case.geometry.taps
    far = 6e4 if dtype == torch.float16 else 3e9
    values = torch.tensor([-1.0, 0.0, 3.0, 4.0, 5.0, -0.5, 4.5, 5.5, -1e4, 1e4, far, 0.25])
    positions = values[torch.arange(2 * case.group * taps * 20) % len(values)]
    out_h, out_w = case.geometry.output_size(case.H, case.W)
    # Absolute positions p become offsets p - (base + tap) by the same geometry.
    tap_y, tap_x = case.geometry.tap_grid(dtype=torch.float32, device="cpu")
    base_y, base_x = case.geometry.window_origin(out_h, out_w, dtype=torch.float32, device="cpu")
    target = positions[: out_h * out_w * case.group * taps * 2].view(
        1, out_h, out_w, case.group, taps, 2
    )
    dx = target[..., 0] - base_x[None, None, :, None, None] - tap_x
    dy = target[..., 1] - base_y[None, :, None, None, None] - tap_y
    offset = torch.stack((dx, dy), dim=-1).view(1, out_h, out_w, -1)
    if kind == "dcnv4":
        generator = torch.Generator().manual_seed(2)
        mask = reference.unpack_offset_mask(inputs["offset_mask"].float(), case.group, taps)[1]
        inputs[name] = pack_offset_mask(offset, mask, case.group, taps, generator).to(dtype)
    else:
        inputs[name] = offset.to(dtype)
    check_against_reference(kind, inputs, case.params(), design, dtype, differentiable=())


# --------------------------------------------------------------------------- #
# The shared-scatter backward's tiles (docs/kernels/dcnv3.md). The cases above
# fit in one tile whose shared region holds every sample; these cut the map
# into many tiles (uneven ones, regions clamped at the map's far edges),
# shrink the halo below the offsets' reach (corners outside the region take
# the global atomics), or leave no region at all.
# --------------------------------------------------------------------------- #

SCATTER_TILES = {
    "2x2_tiles_no_halo": {"SHARED_SCATTER_TILES": (2,), "SHARED_SCATTER_HALO": 0},
    "uneven_3x3_tiles_halo_1": {"SHARED_SCATTER_TILES": (3,), "SHARED_SCATTER_HALO": 1},
    "no_region": {"SHARED_SCATTER_BYTES": 0},
}
SCATTER_CASES = {
    "9x11_G2_D8": Case(N=2, H=9, W=11, group=2, group_channels=8),
    "3x5_stride2_dilation2_G3_D16": CASES["3x5_stride2_dilation2_G3_D16"],
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=dtype_id)
@pytest.mark.parametrize("case_name", list(SCATTER_CASES))
@pytest.mark.parametrize("tiles", list(SCATTER_TILES))
def test_shared_scatter_tiles_and_fallbacks(
    monkeypatch, request, tiles, case_name, dtype, kind, deterministic
):
    for name, value in SCATTER_TILES[tiles].items():
        monkeypatch.setattr(ops, name, value)
    if deterministic:
        request.getfixturevalue("deterministic_algorithms")
    case = SCATTER_CASES[case_name]
    inputs = make_inputs(case, kind, dtype, seed=9)
    check_against_reference(kind, inputs, case.params(), "shared_scatter", dtype)


@pytest.mark.parametrize(
    "case, accumulator_bytes, expected",
    [
        # InternImage-T stage 1 (D = 16): 56 = 4 tiles of 14; region 14 + 2 + 2·3.
        (Case(N=1, H=56, W=56, group=4, group_channels=16), 4, (14, 14, 22, 22)),
        # int64 sums: 22² · 16 · 8 bytes exceed 48 KiB; tiles of 8, regions of 16.
        (Case(N=1, H=56, W=56, group=4, group_channels=16), 8, (8, 8, 16, 16)),
        # Stage 4: one tile, the region the whole 7 x 7 map.
        (Case(N=1, H=7, W=7, group=32, group_channels=16), 4, (7, 7, 7, 7)),
        # Stride 2, dilation 2, a 3 x 5 kernel: 4 x 3 outputs, one tile; its
        # region, 3·2 + 2·2 + 1 + 6 rows, 2·2 + 4·2 + 1 + 6 columns, clamped to 7 x 8.
        (CASES["3x5_stride2_dilation2_G3_D16"], 4, (4, 3, 7, 8)),
        # 9 · 9 · 4096 · 4 bytes do not fit even for a one-pixel tile: no region.
        (Case(N=1, H=10, W=10, group=1, group_channels=4096), 4, (1, 1, 0, 0)),
    ],
    ids=["stage1", "stage1_fixed_point", "stage4", "stride2_dilation2", "no_region"],
)
def test_scatter_tile_is_the_largest_that_fits(case, accumulator_bytes, expected):
    call = ops.Call(
        case.geometry, case.N, case.H, case.W, case.group, case.group_channels,
        *case.geometry.output_size(case.H, case.W),
    )  # fmt: skip
    tile = ops.scatter_tile(call, accumulator_bytes)
    assert (tile.tile_h, tile.tile_w, tile.region_h, tile.region_w) == expected
    assert tile.shared_bytes(call, accumulator_bytes) <= ops.SHARED_SCATTER_BYTES


# --------------------------------------------------------------------------- #
# Bad arguments.
# --------------------------------------------------------------------------- #


def _bad(**changes):
    """dcnv3's arguments for the basic case, with ``changes`` applied."""
    case = CASES["basic_3x3"]
    inputs = make_inputs(case, "dcnv3", torch.float32)
    arguments = {**inputs, **case.params(), "softmax": False, "design": "vectorized"}
    return {**arguments, **changes}


BAD_ARGUMENTS = {
    "channels_not_group_times_group_channels": (
        _bad(group_channels=7),
        ValueError,
        r"input must have group·group_channels = 2·7 = 14",
    ),
    "offset_last_dim": (
        _bad(offset=torch.zeros(2, 5, 6, 35)),
        ValueError,
        r"offset must have shape .*36.*got \(2, 5, 6, 35\)",
    ),
    "mask_last_dim": (
        _bad(mask=torch.zeros(2, 5, 6, 9)),
        ValueError,
        r"mask must have shape .*18.*got \(2, 5, 6, 9\)",
    ),
    "offset_spatial_size": (
        _bad(offset=torch.zeros(2, 4, 6, 36)),
        ValueError,
        r"offset must have shape .*\(2, 5, 6, 36\)",
    ),
    "input_not_4d": (_bad(input=torch.zeros(5, 6, 16)), ValueError, r"input must be 4-D"),
    "group_channels_negative": (
        _bad(group_channels=-1),
        ValueError,
        r"group_channels must be >= 0, got -1",
    ),
    "mask_dtype": (
        _bad(mask=torch.zeros(2, 5, 6, 18, dtype=torch.float16)),
        ValueError,
        r"mask must be torch.float32 .* got torch.float16",
    ),
    "unsupported_dtype": (
        _bad(input=torch.zeros(2, 5, 6, 16, dtype=torch.int32)),
        TypeError,
        r"input has dtype torch.int32; supported: .*torch.float64",
    ),
    "mask_device": (
        _bad(mask=torch.zeros(2, 5, 6, 18, device="meta")),
        ValueError,
        r"mask must be .* on cpu",
    ),
    "remove_center_even_kernel": (
        _bad(remove_center=True, kernel_h=2, kernel_w=2),
        ValueError,
        r"remove_center needs an odd",
    ),
    "stride_zero": (_bad(stride_h=0), ValueError, r"stride_h"),
    "float_kernel_size": (_bad(kernel_w=3.0), TypeError, r"kernel_w must be an int"),
    "unknown_design": (_bad(design="fast"), ValueError, r"design must be one of"),
    "mask_none": (_bad(mask=None), TypeError, r"mask must be a torch.Tensor"),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_arguments(name):
    arguments, error, message = BAD_ARGUMENTS[name]
    arguments = dict(arguments)
    tensors = [arguments.pop(n) for n in ("input", "offset", "mask")]
    with pytest.raises(error, match=message):
        ops.dcnv3(*tensors, **arguments)


# --------------------------------------------------------------------------- #
# torch.library, torch.compile, memcheck.
# --------------------------------------------------------------------------- #


def _op_arguments(kind: str):
    case = CASES["basic_3x3"]
    inputs = make_inputs(case, kind, torch.float32)
    g = case.geometry
    params = (
        g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.pad_h, g.pad_w, g.dilation_h,
        g.dilation_w, g.offset_scale, g.remove_center, case.group, case.group_channels,
    )  # fmt: skip
    if kind == "dcnv4":
        tensors = (inputs["input"], inputs["offset_mask"], None)
    else:
        tensors = (inputs["input"], inputs["offset"], inputs["mask"])
    return tensors, params, kind == "dcnv3_softmax"


@pytest.mark.parametrize("kind", ("dcnv3_softmax", "dcnv4"))
def test_opcheck(kind):
    tensors, params, softmax = _op_arguments(kind)
    tensors = tuple(t if t is None else t.requires_grad_() for t in tensors)
    torch.library.opcheck(
        torch.ops.dcnbench.dcnv3.default, (*tensors, *params, softmax, "vectorized")
    )


@pytest.mark.parametrize("input_grad", (True, False))
@pytest.mark.parametrize("kind", ("dcnv3", "dcnv4"))
def test_opcheck_backward(kind, input_grad):
    tensors, params, softmax = _op_arguments(kind)
    grad_output = torch.randn(tensors[0].shape[0], *tensors[1].shape[1:3], tensors[0].shape[3])
    torch.library.opcheck(
        torch.ops.dcnbench.dcnv3_backward.default,
        (grad_output, *tensors, *params, softmax, "direct", input_grad),
    )


def test_torch_compile_traces_both_operators():
    """dcnv3 and dcnv4 in one function compile with fullgraph=True and match eager,
    forward and backward."""
    case = CASES["basic_3x3"]
    v3 = make_inputs(case, "dcnv3_softmax", torch.float32)
    v4 = make_inputs(case, "dcnv4", torch.float32, seed=1)

    def model(input, offset, mask, offset_mask):
        a = ops.dcnv3(input, offset, mask, **case.params(), softmax=True)
        b = dcnv4(input, offset_mask, **case.params(), design="direct")
        return (a * b).sum()

    arguments = (v3["input"], v3["offset"], v3["mask"], v4["offset_mask"])
    eager_leaves = [t.clone().requires_grad_() for t in arguments]
    compiled_leaves = [t.clone().requires_grad_() for t in arguments]
    eager = model(*eager_leaves)
    eager.backward()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(*compiled_leaves)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_leaves, eager_leaves, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("design", ops.DESIGNS)
def test_memcheck(design, kind):
    """Every kernel, forward and backward, once under the emulator's memcheck
    (out-of-bounds writes), in float16 (16-byte vectors) on a D = 24 case
    (scalar tail of the vectorized design)."""
    for case_name in ("basic_3x3", "5x5_remove_center_D24"):
        case = CASES[case_name]
        with emulator.mode("memcheck"):
            check_against_reference(
                kind, make_inputs(case, kind, torch.float16), case.params(), design, torch.float16
            )


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
    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
    @pytest.mark.parametrize("design", ops.DESIGNS)
    @pytest.mark.parametrize("case_name", list(CASES))
    def test_against_reference(self, case_name, design, dtype, kind):
        case = CASES[case_name]
        inputs = make_inputs(case, kind, dtype, device="cuda")
        check_against_reference(kind, inputs, case.params(), design, dtype)

    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("design", ops.DESIGNS)
    def test_larger_case_on_a_side_stream(self, design, kind):
        """InternImage-like sizes (G=4, D=16, 3x3) on a non-default stream."""
        case = Case(N=2, H=24, W=20, group=4, group_channels=16)
        inputs = make_inputs(case, kind, torch.float32, device="cuda")
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            check_against_reference(kind, inputs, case.params(), design, torch.float32)
        torch.cuda.synchronize()
