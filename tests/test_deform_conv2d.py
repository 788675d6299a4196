"""Our DCNv1 / DCNv2 kernels (``kernels.ops.deform_conv2d``) against the float64 reference.

On the CPU the very CUDA source the GPU runs goes through ``kernels.emulator``;
GEMMs are PyTorch's. Every kernel call here runs with outputs poisoned with
NaN, so an element a kernel forgets to write fails the comparison. The oracle
is the float64 reference (``kernels.reference.deform_conv2d``, from the
contract) on the same (already rounded) inputs; errors are relative L2 and
max-abs relative to max |ref|.

``TestOnGPU`` compares with torchvision on CUDA; it is skipped without a GPU.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np
import pytest
import torch
from kernel_checks import close_to_reference

from kernels import launch
from kernels.ops import deform_conv2d as dcn
from kernels.reference import deform_conv2d as reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Relative L2 bound per dtype: a few units of the dtype's rounding (columns
# and outputs are rounded once each; float32 is far below its bound on the
# CPU, the slack is for TF32-free cuBLAS reduction orders).
REL_L2 = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-13}
MAX_ABS = {dtype: 2 * bound for dtype, bound in REL_L2.items()}
GRADIENTS = ("input", "offset", "mask", "weight", "bias")


# Every kernel output starts as NaN: an unwritten element fails its comparison.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")

# The design ``ours`` runs: every test of this file runs once per design.
DESIGN = "im2col"


@pytest.fixture(autouse=True, params=dcn.DESIGNS)
def design(request, monkeypatch) -> str:
    monkeypatch.setattr(sys.modules[__name__], "DESIGN", request.param)
    return request.param


@dataclasses.dataclass(frozen=True)
class Case:
    N: int = 2
    C_in: int = 4
    C_out: int = 6
    H: int = 5
    W: int = 6
    kernel: tuple[int, int] = (3, 3)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (1, 1)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    offset_groups: int = 1
    bias: bool = True

    @property
    def taps(self) -> int:
        return self.kernel[0] * self.kernel[1]

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(
            (size + 2 * pad - dil * (k - 1) - 1) // s + 1
            for size, k, s, pad, dil in zip(
                (self.H, self.W), self.kernel, self.stride, self.padding, self.dilation, strict=True
            )
        )

    def params(self) -> dict:
        return dict(
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            offset_groups=self.offset_groups,
        )


CASES = {
    "basic": Case(),
    "grouped_strided_dilated_2x3": Case(
        N=3,
        C_in=6,
        C_out=4,
        H=6,
        W=5,
        kernel=(2, 3),
        stride=(2, 1),
        padding=(1, 2),
        dilation=(1, 2),
        groups=2,
        offset_groups=3,
    ),
    # 36 channels: the implicit GEMM's grad_sampling splits a 1x1 block's channels
    # over a pixel's 4 threads, each with its own partial sums.
    "one_sample_1x1_no_bias": Case(
        N=1,
        C_in=36,
        C_out=2,
        H=4,
        W=5,
        kernel=(1, 1),
        stride=(2, 2),
        padding=(0, 0),
        offset_groups=3,
        bias=False,
    ),
    "tall_kernel_3x1": Case(
        N=1, C_in=2, C_out=3, H=7, W=3, kernel=(3, 1), padding=(2, 0), dilation=(2, 1)
    ),
    # Across the implicit GEMM's 64 x 64 tiles and 16-deep steps: 70 channels (two
    # channel tiles, an offset group of 10 split by the tile edge), 66 output
    # channels, 2·6·7 = 84 output pixels (a sample split by a pixel tile's edge).
    "across_tiles": Case(N=2, C_in=70, C_out=66, H=6, W=7, offset_groups=7),
    # 72 taps: more than the implicit GEMM's point table holds (9, 5 in float64)
    # and than a float64 grad_sampling block's 64 rows, so both go tap chunk by chunk.
    "wide_kernel_9x8": Case(N=1, C_in=3, C_out=2, H=9, W=8, kernel=(9, 8), padding=(4, 4)),
}


def make_inputs(case: Case, dtype: torch.dtype, modulated: bool, seed: int = 0) -> dict:
    """Inputs in ``dtype``; offsets = integer + fraction in [0.15, 0.85], so that
    no sample sits on a kink of B0 (gradients are checked)."""
    generator = torch.Generator().manual_seed(seed)
    out_h, out_w = case.out_size

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    offset_shape = (case.N, 2 * case.offset_groups * case.taps, out_h, out_w)
    whole = torch.randint(-2, 3, offset_shape, generator=generator).float()
    fraction = 0.15 + 0.7 * torch.rand(offset_shape, generator=generator)
    inputs = {
        "input": randn(case.N, case.C_in, case.H, case.W),
        "offset": whole + fraction,
        "mask": torch.rand(
            case.N, case.offset_groups * case.taps, out_h, out_w, generator=generator
        )
        if modulated
        else None,
        "weight": randn(case.C_out, case.C_in // case.groups, *case.kernel) / case.taps,
        "bias": randn(case.C_out) if case.bias else None,
    }
    return {name: None if t is None else t.to(dtype) for name, t in inputs.items()}


def ours(inputs: dict, params: dict, **kwargs) -> torch.Tensor:
    kwargs.setdefault("design", DESIGN)
    if inputs["mask"] is None:
        return dcn.deform_conv2d(
            inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"], **params, **kwargs
        )
    return dcn.modulated_deform_conv2d(
        inputs["input"],
        inputs["offset"],
        inputs["mask"],
        inputs["weight"],
        inputs["bias"],
        **params,
        **kwargs,
    )


def theirs(inputs: dict, params: dict) -> torch.Tensor:
    """The float64 reference (``kernels.reference``) on the same (rounded) values."""
    if inputs["mask"] is None:
        return reference.deform_conv2d(
            inputs["input"], inputs["offset"], inputs["weight"], inputs["bias"], **params
        )
    return reference.modulated_deform_conv2d(
        inputs["input"],
        inputs["offset"],
        inputs["mask"],
        inputs["weight"],
        inputs["bias"],
        **params,
    )


assert_close = close_to_reference(REL_L2, MAX_ABS)
# TF32 keeps float16's 10 mantissa bits: float16's bounds, for float32 tensors.
assert_close_tf32 = close_to_reference({torch.float32: REL_L2[torch.float16]},
                                       {torch.float32: MAX_ABS[torch.float16]})


def check_against_reference(
    inputs: dict, params: dict, dtype: torch.dtype, requires_grad: tuple[str, ...] = GRADIENTS
):
    """Forward and the requested gradients of ours vs the float64 reference."""
    leaves = {
        name: None if t is None else t.detach().clone().requires_grad_(name in requires_grad)
        for name, t in inputs.items()
    }
    references = {
        name: None if t is None else t.detach().double().requires_grad_(name in requires_grad)
        for name, t in inputs.items()
    }
    out = ours(leaves, params)
    expected = theirs(references, params)
    assert_close("output", out, expected, dtype)

    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(
        out.device, dtype
    )
    differentiable = [n for n in requires_grad if leaves.get(n) is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in differentiable], grad_output)
    expected_grads = torch.autograd.grad(
        expected, [references[n] for n in differentiable], grad_output.double()
    )
    for name, grad, expected_grad in zip(differentiable, grads, expected_grads, strict=True):
        assert_close(f"grad_{name}", grad, expected_grad, dtype)


# --------------------------------------------------------------------------- #
# Forward and gradients vs the reference.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case_name", list(CASES))
def test_forward_and_gradients(case_name, dtype, modulated):
    case = CASES[case_name]
    check_against_reference(make_inputs(case, dtype, modulated), case.params(), dtype)


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
@pytest.mark.parametrize("case_name", ["basic", "grouped_strided_dilated_2x3", "wide_kernel_9x8"])
def test_float64_kernels(case_name, modulated):
    """The float64 instantiations compute in double: the reference's numbers to 1e-13."""
    case = CASES[case_name]
    check_against_reference(make_inputs(case, torch.float64, modulated), case.params(), torch.float64)


@pytest.mark.usefixtures("deterministic_algorithms")
@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
def test_gradcheck_on_the_emulated_kernels(modulated):
    """torch.autograd.gradcheck (float64, as torchvision's and mmcv's tests run it)
    on every input of the kernels, offsets away from B0's kinks. In deterministic
    mode: gradcheck also requires two backwards to agree exactly, which float
    atomics do not (else pass it ``nondet_tol``)."""
    case = Case(N=2, C_in=4, C_out=2, H=4, W=5, kernel=(2, 3), padding=(1, 1), groups=2,
                offset_groups=2)
    inputs = make_inputs(case, torch.float64, modulated, seed=18)
    names = [n for n, t in inputs.items() if t is not None]
    leaves = [inputs[n].requires_grad_() for n in names]

    def function(*tensors):
        return ours(dict(inputs, **dict(zip(names, tensors, strict=True))), case.params())

    with launch.poisoned_outputs():
        assert torch.autograd.gradcheck(function, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "min_channels, waves, budget_samples",
    [(1, 10**6, 5), (3, 10**6, 2), (4, 0, 2), (4, 0, 1)],
    ids=["slice_per_channel", "uneven_slices", "one_slice_chunks_of_2", "one_slice_chunks_of_1"],
)
def test_channel_slices_and_batch_chunks(monkeypatch, min_channels, waves, budget_samples):
    """Every way the host splits the work gives the reference's results:
    channel slices (1, 3 of 3+3+1 channels, 7 of 1) and N=5 in chunks that
    do not divide it."""
    case = Case(N=5, C_in=7, C_out=3, H=4, W=5, offset_groups=1)
    monkeypatch.setattr(launch, "MIN_CHANNELS_PER_THREAD", min_channels)
    monkeypatch.setattr(launch, "TARGET_WAVES", waves)
    columns_per_sample = case.C_in * case.taps * case.out_size[0] * case.out_size[1] * 4
    monkeypatch.setattr(dcn, "WORKSPACE_BUDGET_BYTES", budget_samples * columns_per_sample)
    inputs = make_inputs(case, torch.float32, modulated=True, seed=3)
    check_against_reference(inputs, case.params(), torch.float32)


@pytest.mark.parametrize(
    "requires_grad",
    [("offset", "mask"), ("input",), ("weight", "bias"), ("mask",)],
    ids=lambda names: "+".join(names),
)
def test_only_requested_gradients(requires_grad):
    """Subsets of gradients (no grad_input: the scatter is skipped; no
    sampling gradients: only the weight GEMM runs)."""
    case = CASES["grouped_strided_dilated_2x3"]
    inputs = make_inputs(case, torch.float32, modulated=True, seed=4)
    check_against_reference(inputs, case.params(), torch.float32, requires_grad)


def test_zero_mask():
    """A zero mask zeroes its taps' contributions and offset gradients, not its own gradient."""
    case = CASES["basic"]
    inputs = make_inputs(case, torch.float32, modulated=True, seed=5)
    inputs["mask"][:, ::2] = 0
    check_against_reference(inputs, case.params(), torch.float32)


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
@pytest.mark.parametrize(
    "N, C_in, C_out", [(0, 4, 6), (2, 0, 6), (2, 4, 0), (0, 0, 0)],
    ids=["batch_0", "no_input_channels", "no_output_channels", "all_empty"],
)  # fmt: skip
def test_empty_batch_and_channels(N, C_in, C_out, modulated):
    """As torchvision: an empty output (or the bias alone, for C_in = 0) and zero
    gradients of the right shapes, equal to the reference's."""
    case = Case(N=N, C_in=C_in, C_out=C_out, offset_groups=1)
    params = {**case.params(), "groups": 1 if C_in == 0 else None}
    inputs = make_inputs(case, torch.float32, modulated, seed=13)
    leaves = {n: None if t is None else t.clone().requires_grad_() for n, t in inputs.items()}
    references = {
        n: None if t is None else t.double().requires_grad_() for n, t in inputs.items()
    }
    out = ours(leaves, params)
    expected = theirs(references, params)
    assert out.shape == expected.shape == (N, C_out, *case.out_size)
    torch.testing.assert_close(out.double(), expected)
    names = [n for n, t in leaves.items() if t is not None]
    grad_output = torch.ones(out.shape)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_output)
    expected_grads = torch.autograd.grad(
        expected, [references[n] for n in names], grad_output.double()
    )
    for name, grad, expected_grad in zip(names, grads, expected_grads, strict=True):
        assert grad.shape == inputs[name].shape, name
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad.double(), expected_grad, msg=name)
    if C_in == 0 and N > 0:  # only the bias contributes: its gradient is the sum
        assert grads[-1].eq(N * case.out_size[0] * case.out_size[1]).all()


def test_groups_and_offset_groups_inferred_from_shapes():
    """groups = C_in / weight.shape[1] and offset_groups = offset.shape[1] / (2·kh·kw),
    as torchvision infers them, here and in the reference."""
    case = CASES["grouped_strided_dilated_2x3"]
    inputs = make_inputs(case, torch.float32, modulated=True, seed=14)
    params = {**case.params(), "groups": None, "offset_groups": None}
    expected = theirs({n: t.double() for n, t in inputs.items()}, case.params())
    assert_close("output", ours(inputs, params), expected, torch.float32)
    assert_close("reference", theirs(inputs, params), expected, torch.float32)


def gradients(inputs: dict, params: dict, grad_output: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every gradient of ours, for ``grad_output``."""
    leaves = {n: None if t is None else t.detach().clone().requires_grad_() for n, t in inputs.items()}
    out = ours(leaves, params)
    return torch.autograd.grad(out, [t for t in leaves.values() if t is not None], grad_output)


@pytest.mark.usefixtures("deterministic_algorithms")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_deterministic_backward(monkeypatch, dtype):
    """Under torch.use_deterministic_algorithms(True): as accurate, and the same bits twice
    (one sample a chunk: one fixed-point accumulator, with its own scale, each)."""
    monkeypatch.setattr(dcn, "WORKSPACE_BUDGET_BYTES", 1)
    case = CASES["grouped_strided_dilated_2x3"]
    inputs = make_inputs(case, dtype, modulated=True, seed=9)
    check_against_reference(inputs, case.params(), dtype)
    out_shape = (case.N, case.C_out, *case.out_size)
    grad_output = torch.randn(out_shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    first = gradients(inputs, case.params(), grad_output)
    second = gradients(inputs, case.params(), grad_output)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_deterministic_backward_takes_the_fixed_point_path(deterministic_algorithms):
    """One NaN in grad_output: float atomics spread it to the inputs it samples,
    the fixed-point sums (no NaN in fixed point) make all of grad_input NaN."""
    case = CASES["basic"]
    inputs = make_inputs(case, torch.float32, modulated=True, seed=10)
    grad_output = torch.ones(case.N, case.C_out, *case.out_size)
    grad_output[0, 0, 0, 0] = float("nan")
    assert gradients(inputs, case.params(), grad_output)[0].isnan().all()
    torch.use_deterministic_algorithms(False)
    assert not gradients(inputs, case.params(), grad_output)[0].isnan().all()


def border_offsets(case: Case, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Offsets that put samples exactly on B0's borders (y = -1, H - 1, H,
    halves next to them), on integer grid points and far outside."""
    out_h, out_w = case.out_size
    kernel_h, kernel_w = case.kernel
    H, W = case.H, case.W
    targets_y = torch.tensor(
        [-1, -0.75, -0.5, 0, 2, 2.5, H - 1, H - 0.5, H, H + 0.25, -16384, 16384]
    )
    targets_x = torch.tensor(
        [-1, -0.75, -0.5, 0, 1, 1.5, W - 1, W - 0.5, W, W + 0.25, -16384, 16384]
    )
    generator = torch.Generator().manual_seed(seed)
    shape = (case.N, case.offset_groups, kernel_h, kernel_w, out_h, out_w)
    y = targets_y[torch.randint(len(targets_y), shape, generator=generator)]
    x = targets_x[torch.randint(len(targets_x), shape, generator=generator)]
    ho = torch.arange(out_h).view(-1, 1)
    wo = torch.arange(out_w).view(1, -1)
    i = torch.arange(kernel_h).view(-1, 1, 1, 1)
    j = torch.arange(kernel_w).view(1, -1, 1, 1)
    base_y = ho * case.stride[0] - case.padding[0] + i * case.dilation[0]
    base_x = wo * case.stride[1] - case.padding[1] + j * case.dilation[1]
    offset = torch.stack((y - base_y, x - base_x), dim=4)  # [N, G, kh, kw, 2, Ho, Wo]
    return offset.reshape(case.N, -1, out_h, out_w).to(dtype)


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_forward_on_borders_and_far_outside(dtype, modulated):
    case = CASES["grouped_strided_dilated_2x3"]
    inputs = make_inputs(case, dtype, modulated, seed=6)
    inputs["offset"] = border_offsets(case, dtype, seed=7)
    expected = theirs(
        {n: None if t is None else t.double() for n, t in inputs.items()}, case.params()
    )
    assert_close("output", ours(inputs, case.params()), expected, dtype)


def test_integer_offsets_match_plain_convolution():
    """Zero offsets: exactly a (grouped, strided, dilated) convolution."""
    case = CASES["grouped_strided_dilated_2x3"]
    inputs = make_inputs(case, torch.float32, modulated=False, seed=8)
    inputs["offset"] = torch.zeros_like(inputs["offset"])
    expected = torch.nn.functional.conv2d(
        inputs["input"].double(),
        inputs["weight"].double(),
        inputs["bias"].double(),
        case.stride,
        case.padding,
        case.dilation,
        case.groups,
    )
    assert_close("output", ours(inputs, case.params()), expected, torch.float32)


# --------------------------------------------------------------------------- #
# API: argument handling, out=, modules, torch.library, torch.compile.
# --------------------------------------------------------------------------- #


def test_int_parameters_inferred_offset_groups_and_noncontiguous_inputs():
    case = CASES["basic"]
    inputs = make_inputs(case, torch.float32, modulated=True, seed=9)
    expected = ours(inputs, case.params())
    transposed = {
        name: t.transpose(2, 3).contiguous().transpose(2, 3)
        if t is not None and t.dim() == 4
        else t
        for name, t in inputs.items()
    }
    assert not transposed["input"].is_contiguous()
    actual = dcn.modulated_deform_conv2d(
        transposed["input"],
        transposed["offset"],
        transposed["mask"],
        transposed["weight"],
        transposed["bias"],
        stride=1,
        padding=1,
        dilation=1,
        design=DESIGN,
    )
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_out_argument():
    case = CASES["basic"]
    inputs = make_inputs(case, torch.float32, modulated=False, seed=10)
    out = torch.empty(case.N, case.C_out, *case.out_size)
    returned = ours(inputs, case.params(), out=out)
    assert returned is out
    torch.testing.assert_close(out, ours(inputs, case.params()), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"out must have shape"):
        ours(inputs, case.params(), out=torch.empty(1, 2, 3, 4))
    inputs["weight"].requires_grad_()
    with pytest.raises(RuntimeError, match="does not support automatic differentiation"):
        ours(inputs, case.params(), out=out)


def _bad(**changes):
    """A valid DCNv2 call on ``basic`` with some arguments replaced."""
    inputs = make_inputs(CASES["basic"], torch.float32, modulated=True)
    arguments = dict(inputs, **CASES["basic"].params())
    arguments.update(changes)
    return arguments


BAD_ARGUMENTS = {
    "input_ndim": (
        _bad(input=torch.zeros(4, 5, 6)),
        ValueError,
        r"input must be 4-D, got shape \(4, 5, 6\)",
    ),
    "bias_ndim": (_bad(bias=torch.zeros(6, 1)), ValueError, r"bias must be 1-D"),
    "not_a_tensor": (_bad(offset=[1.0]), TypeError, r"offset must be a torch.Tensor"),
    "integer_dtype": (
        {**_bad(), **{n: t.int() for n, t in _bad().items() if isinstance(t, torch.Tensor)}},
        TypeError,
        r"input has dtype torch.int32; supported: .*torch.float64",
    ),
    "dtype_mismatch": (
        _bad(weight=torch.zeros(6, 4, 3, 3, dtype=torch.float16)),
        TypeError,
        r"weight has dtype torch.float16, expected input's dtype torch.float32",
    ),
    "device_mismatch": (
        _bad(mask=torch.zeros(2, 9, 5, 6, device="meta")),
        ValueError,
        r"mask is on meta, expected input's device cpu",
    ),
    "weight_channels": (
        _bad(weight=torch.zeros(6, 3, 3, 3)),
        ValueError,
        r"weight must have shape \(6, 4, 3, 3\)",
    ),
    "groups_divide": (_bad(groups=3), ValueError, r"groups=3 must divide"),
    "groups_type": (_bad(groups=1.0), TypeError, r"groups must be an int, got 1.0"),
    "groups_inferred": (
        _bad(weight=torch.zeros(6, 3, 3, 3), groups=None),
        ValueError,
        r"weight's 3 input channels per group must divide input's 4 channels",
    ),
    "offset_groups_divide": (
        _bad(offset_groups=3, offset=torch.zeros(2, 54, 5, 6), mask=torch.zeros(2, 27, 5, 6)),
        ValueError,
        r"offset_groups=3 must divide input's channels \(4\)",
    ),
    "offset_channels": (
        _bad(offset=torch.zeros(2, 17, 5, 6), offset_groups=None),
        ValueError,
        r"offset must have a positive multiple of 2·kh·kw = 18 channels, got 17",
    ),
    "offset_groups_mismatch": (
        _bad(offset_groups=2),
        ValueError,
        r"offset must have shape \(2, 36, 5, 6\).*got \(2, 18, 5, 6\)",
    ),
    "offset_spatial": (
        _bad(offset=torch.zeros(2, 18, 5, 5)),
        ValueError,
        r"offset must have shape \(2, 18, 5, 6\)",
    ),
    "mask_shape": (
        _bad(mask=torch.zeros(2, 18, 5, 6)),
        ValueError,
        r"mask must have shape \(2, 9, 5, 6\)",
    ),
    "bias_shape": (_bad(bias=torch.zeros(5)), ValueError, r"bias must have shape \(6,\)"),
    "stride": (_bad(stride=(0, 1)), ValueError, r"stride must be >= 1, got \(0, 1\)"),
    "padding": (_bad(padding=-1), ValueError, r"padding must be >= 0"),
    "dilation": (_bad(dilation=(1, 0)), ValueError, r"dilation must be >= 1"),
    "pair_type": (_bad(stride=(1.0, 1)), TypeError, r"stride must be an int or a pair of ints"),
    "empty_output": (_bad(padding=0, dilation=3), ValueError, r"the output would be"),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_arguments(name):
    arguments, error, message = BAD_ARGUMENTS[name]
    with pytest.raises(error, match=message):
        dcn.modulated_deform_conv2d(**arguments)


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
def test_allow_tf32(design, modulated):
    """allow_tf32=True: the implicit GEMM's float32 products on TF32 tensor cores,
    forward and gradients within float16's bounds (both keep 10 mantissa bits) and
    the output's error above float32's bound (so the TF32 path ran). The im2col
    design refuses it (its cuBLAS GEMMs follow torch's flag)."""
    case = CASES["across_tiles"]
    inputs = make_inputs(case, torch.float32, modulated, seed=21)
    if design == "im2col":
        with pytest.raises(ValueError, match="allow_tf32=True needs design='implicit_gemm'"):
            ours(inputs, case.params(), allow_tf32=True)
        return
    leaves = {n: None if t is None else t.clone().requires_grad_() for n, t in inputs.items()}
    references = {
        n: None if t is None else t.double().requires_grad_() for n, t in inputs.items()
    }
    out = ours(leaves, case.params(), allow_tf32=True)
    expected = theirs(references, case.params())
    assert_close_tf32("output", out, expected, torch.float32)
    assert (out.double() - expected).norm() > REL_L2[torch.float32] * expected.norm()
    names = [n for n, t in leaves.items() if t is not None]
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(22))
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_output)
    expected_grads = torch.autograd.grad(
        expected, [references[n] for n in names], grad_output.double()
    )
    for name, grad, expected_grad in zip(names, grads, expected_grads, strict=True):
        assert_close_tf32(f"grad_{name}", grad, expected_grad, torch.float32)


def test_unknown_design():
    inputs = make_inputs(CASES["basic"], torch.float32, modulated=False)
    with pytest.raises(ValueError, match="design must be one of 'im2col', 'implicit_gemm', "
                                         "got 'winograd'"):
        ours(inputs, CASES["basic"].params(), design="winograd")


def test_missing_mask():
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        dcn.modulated_deform_conv2d(**_bad(mask=None))


def test_launch_rejects_python_scalars_and_bad_configurations():
    kernel = launch.module(dcn.SOURCE, "cpu").function("deform_im2col<float, false>")
    with pytest.raises(TypeError, match="argument 1 is a int"):
        kernel((1, 1), 32, (torch.zeros(1), 3))
    with pytest.raises(ValueError, match="1025 threads"):
        kernel((1, 1), 1025, ())
    with pytest.raises(ValueError, match="dimension 1 must be in 1..65535"):
        kernel((1, 65536), 32, ())
    with pytest.raises(OverflowError):
        launch.int32(2**31)
    assert isinstance(launch.int32(5), np.int32) and isinstance(launch.int64(5), np.int64)
    with pytest.raises(KeyError, match="not a registered name expression"):
        launch.module(dcn.SOURCE, "cpu").function("deform_im2col<int, false>")


def test_new_output_is_poisoned():
    assert launch.outputs_poisoned()  # the autouse fixture
    assert launch.new_output((3, 2), torch.bfloat16, "cpu").isnan().all()


@pytest.mark.parametrize("modulated", [False, True], ids=["DeformConv2d", "ModulatedDeformConv2d"])
def test_modules(modulated):
    torch.manual_seed(11)
    module_class = dcn.ModulatedDeformConv2d if modulated else dcn.DeformConv2d
    layer = module_class(4, 6, (2, 3), stride=(1, 2), padding=1, groups=2, offset_groups=2)
    assert layer.weight.shape == (6, 2, 2, 3) and layer.bias.shape == (6,)
    assert "offset_groups=2" in repr(layer)
    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    offset = torch.randn(2, 2 * 2 * 6, 6, 3)
    args = (x, offset, torch.rand(2, 2 * 6, 6, 3)) if modulated else (x, offset)
    out = layer(*args)
    expected = theirs(
        {
            "input": x.double(),
            "offset": offset.double(),
            "mask": args[2].double() if modulated else None,
            "weight": layer.weight.double(),
            "bias": layer.bias.double(),
        },
        dict(stride=(1, 2), padding=(1, 1), dilation=(1, 1), groups=2, offset_groups=2),
    )
    assert_close("output", out, expected.detach(), torch.float32)
    out.sum().backward()  # an expanded (stride-0) grad_output
    assert layer.weight.grad is not None and layer.bias.grad is not None and x.grad is not None
    assert torch.isfinite(layer.weight.grad).all()


def test_deform_conv2d_module_takes_an_optional_mask():
    """DeformConv2d(input, offset, mask) is DCNv2, as torchvision's; without a mask DCNv1."""
    torch.manual_seed(16)
    layer = dcn.DeformConv2d(4, 6, 3, padding=1)
    modulated = dcn.ModulatedDeformConv2d(4, 6, 3, padding=1)
    modulated.load_state_dict(layer.state_dict())
    inputs = make_inputs(CASES["basic"], torch.float32, modulated=True, seed=17)
    x, offset, mask = inputs["input"], inputs["offset"], inputs["mask"]
    assert torch.equal(layer(x, offset, mask), modulated(x, offset, mask))
    assert torch.equal(layer(x, offset), layer(x, offset, torch.ones_like(mask)))
    assert layer.offset_groups is None  # inferred from the offset, as torchvision


def _tiny_op_arguments(modulated: bool):
    inputs = make_inputs(
        Case(N=2, C_in=2, C_out=2, H=3, W=3, kernel=(2, 2), padding=(0, 0)),
        torch.float32,
        modulated,
        seed=12,
    )
    tensors = [None if t is None else t.requires_grad_() for t in inputs.values()]
    return (*tensors, 1, 1, 0, 0, 1, 1, 1, 1, DESIGN, False)


@pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
def test_opcheck(modulated):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of our torch.library op."""
    torch.library.opcheck(torch.ops.dcnbench.deform_conv2d.default, _tiny_op_arguments(modulated))


def test_opcheck_backward():
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _tiny_op_arguments(True)]
    input, offset, mask, weight, _bias, *params = args
    grad_output = torch.randn(2, 2, 2, 2)
    torch.library.opcheck(
        torch.ops.dcnbench.deform_conv2d_backward.default,
        (grad_output, input, offset, mask, weight, *params, [True, True, True, True, False]),
    )


def test_torch_compile_traces_a_model():
    """A model using the module compiles with fullgraph=True and matches eager, forward and backward."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.offset = torch.nn.Conv2d(3, 2 * 9, 3, padding=1)
            self.mask = torch.nn.Conv2d(3, 9, 3, padding=1)
            self.dcn = dcn.ModulatedDeformConv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.dcn(x, self.offset(x), torch.sigmoid(self.mask(x))).relu().sum()

    torch.manual_seed(13)
    model = Model()
    x = torch.randn(2, 3, 4, 5)
    eager = model(x)
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    result = compiled(x)
    result.backward()
    torch.testing.assert_close(result, eager, rtol=1e-5, atol=1e-5)
    for p, expected in zip(model.parameters(), eager_grads, strict=True):
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- #
# On a GPU: CuPy launches, against torchvision on CUDA.
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
    @pytest.fixture(autouse=True)
    def no_tf32(self):
        flags = torch.backends.cuda.matmul
        saved = (
            flags.allow_tf32,
            flags.allow_fp16_reduced_precision_reduction,
            flags.allow_bf16_reduced_precision_reduction,
        )
        flags.allow_tf32 = False
        flags.allow_fp16_reduced_precision_reduction = False
        flags.allow_bf16_reduced_precision_reduction = False
        yield
        (
            flags.allow_tf32,
            flags.allow_fp16_reduced_precision_reduction,
            flags.allow_bf16_reduced_precision_reduction,
        ) = saved

    @pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    @pytest.mark.parametrize("case_name", list(CASES))
    def test_against_reference(self, case_name, dtype, modulated):
        case = CASES[case_name]
        inputs = {
            n: None if t is None else t.cuda()
            for n, t in make_inputs(case, dtype, modulated).items()
        }
        check_against_reference(inputs, case.params(), dtype)

    @pytest.mark.parametrize("modulated", [False, True], ids=["dcnv1", "dcnv2"])
    def test_against_torchvision_on_a_side_stream(self, modulated):
        """A larger case on a non-default stream, vs torchvision's CUDA kernels."""
        import torchvision

        case = Case(N=3, C_in=32, C_out=16, H=20, W=24, groups=2, offset_groups=4)
        inputs = make_inputs(case, torch.float32, modulated, seed=14)
        inputs = {n: None if t is None else t.cuda().requires_grad_() for n, t in inputs.items()}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = ours(inputs, case.params())
            out.square().sum().backward()
        torch.cuda.current_stream().wait_stream(stream)
        grads = {n: t.grad for n, t in inputs.items() if t is not None}
        expected_inputs = {
            n: None if t is None else t.detach().clone().requires_grad_() for n, t in inputs.items()
        }
        expected = torchvision.ops.deform_conv2d(
            expected_inputs["input"],
            expected_inputs["offset"],
            expected_inputs["weight"],
            expected_inputs["bias"],
            case.stride,
            case.padding,
            case.dilation,
            mask=expected_inputs["mask"],
        )
        expected.square().sum().backward()
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        for name, grad in grads.items():
            torch.testing.assert_close(
                grad, expected_inputs[name].grad, rtol=1e-3, atol=1e-3, msg=f"grad_{name}"
            )


def test_cupy_launch_glue_with_a_stand_in_cupy(monkeypatch):
    """The GPU-only launch path (device, torch's current stream, error
    wrapping) with a stand-in for CuPy, so a machine without a GPU checks it too."""
    events = []

    class Context:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            events.append(f"enter {self.name}")

        def __exit__(self, *exc):
            events.append(f"exit {self.name}")

    class DriverError(Exception):
        pass

    cuda = types.SimpleNamespace(
        Device=lambda index: Context(f"device {index}"),
        Stream=types.SimpleNamespace(
            from_external=lambda handle: Context(f"stream {handle.__cuda_stream__()}")),
        driver=types.SimpleNamespace(CUDADriverError=DriverError),
    )
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(
        torch.cuda, "current_stream", lambda index: types.SimpleNamespace(cuda_stream=77)
    )
    launch._cupy_stream.cache_clear()

    def function(grid, block, args, shared_mem):
        events.append(f"launch {grid} {block} {args} {shared_mem}")

    kernel = launch.Kernel("k<float>", function, torch.device("cuda", 1))
    kernel._launch_cupy((2, 1, 1), (256, 1, 1), (np.uint64(4096), np.int32(3)), 0)
    assert events == [
        "enter device 1",
        "enter stream (0, 77)",
        "launch (2, 1, 1) (256, 1, 1) (np.uint64(4096), np.int32(3)) 0",
        "exit stream (0, 77)",
        "exit device 1",
    ]

    def failing(grid, block, args, shared_mem):
        raise DriverError("CUDA_ERROR_INVALID_VALUE")

    with pytest.raises(RuntimeError, match=r"launching k<float> on cuda:1 with grid \(2, 1, 1\)"):
        launch.Kernel("k<float>", failing, torch.device("cuda", 1))._launch_cupy(
            (2, 1, 1), (256, 1, 1), (), 0
        )
    launch._cupy_stream.cache_clear()
