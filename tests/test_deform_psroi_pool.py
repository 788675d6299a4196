"""Our deformable PSRoI pooling kernels (``kernels.ops.deform_psroi_pool``) against the float64 reference.

On the CPU the very CUDA source the GPU runs goes through ``kernels.emulator``;
outputs are poisoned with NaN, so an unwritten element fails. The oracle is
``kernels.reference.deform_psroi_pool`` (from the contract) in float64 on the
same (already rounded) inputs. ``TestOnGPU`` is skipped without a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

# The RoI pooling tests' tolerances and comparison (pytest puts tests/ on sys.path).
from test_deform_roi_pool import DTYPES, assert_close

from kernels import emulator, launch
from kernels.ops import deform_psroi_pool as ops
from kernels.reference import deform_psroi_pool as reference

# Every kernel output starts as NaN: an unwritten element fails its comparison.
pytestmark = pytest.mark.usefixtures("poisoned_outputs")


@dataclasses.dataclass(frozen=True)
class Case:
    N: int = 2
    H: int = 8
    W: int = 9
    output_dim: int = 4
    group_size: int = 2
    pooled_size: int = 3
    part_size: int = 0
    sample_per_part: int = 2
    # Not 0.1: see test_deform_roi_pool.Case.gamma (samples on integer positions).
    trans_std: float = 0.0917
    num_classes: int = 2
    # Not a power of 2: RoI corners are rounded to integers, so with a dyadic
    # scale and no trans, samples fall exactly on B2's skip borders (x = -0.5,
    # W - 0.5), where counting flips with the last bit of the position (float32
    # here, float64 in the reference): a true discontinuity, not a kernel error.
    spatial_scale: float = 0.37
    no_trans: bool = False
    design: str = "pw_fastest"

    def params(self) -> dict:
        """Our function's keyword arguments; the reference's are :meth:`reference_params`."""
        return dict(self.reference_params(), design=self.design)

    def reference_params(self) -> dict:
        return dict(
            spatial_scale=self.spatial_scale,
            output_dim=self.output_dim,
            group_size=self.group_size,
            pooled_size=self.pooled_size,
            part_size=self.part_size,
            sample_per_part=self.sample_per_part,
            trans_std=self.trans_std,
            no_trans=self.no_trans,
        )


CASES = {
    "basic": Case(),
    "no_trans": Case(no_trans=True),
    "part_cells_shared_by_bins": Case(
        pooled_size=5, part_size=3, group_size=3, output_dim=2, num_classes=1
    ),
    "pooled_1x1": Case(pooled_size=1, group_size=1, sample_per_part=3, num_classes=4),
    "pooled_7x7_one_sample": Case(
        N=1, pooled_size=7, group_size=3, output_dim=2, sample_per_part=1
    ),
    # Two chunks of 32 output channels in the channels-fastest design (8 dead
    # lanes in the second), class 3 of 10 channels split across them.
    "channels_40": Case(N=1, H=5, W=6, output_dim=40, num_classes=4, sample_per_part=3),
    # 36 samples a bin: the samples-fastest design's 32 lanes loop (lanes 0-3 twice).
    "samples_36": Case(N=1, pooled_size=2, group_size=2, output_dim=2, sample_per_part=6),
}
DESIGNS = ops.DESIGNS


def make_rois(case: Case, generator: torch.Generator) -> torch.Tensor:
    """Inside, partly outside, wholly outside, tiny (max(·, 0.1) side), halves
    that C's round takes away from zero, the last image, plus random ones."""
    image_h, image_w = case.H / case.spatial_scale, case.W / case.spatial_scale
    last = case.N - 1
    fixed = torch.tensor(
        [
            [0, 1.3, 2.2, image_w - 3.1, image_h - 1.7],
            [last, -0.4 * image_w, -3.5, 0.6 * image_w, 0.5 * image_h],
            [last, 1.7 * image_w, 1.2 * image_h, 2.3 * image_w, 1.9 * image_h],
            [0, 4.5, 6.5, 2.5, 3.5],  # x2 < x1: roi_w = max(end - start, 0.1)
            [last, -2.5, 0.5, 5.5, 7.5],
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


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    rois = make_rois(case, generator)
    part = case.part_size or case.pooled_size
    channels = case.output_dim * case.group_size**2
    inputs = {
        "input": torch.randn(case.N, channels, case.H, case.W, generator=generator),
        "rois": rois,
        # up to ±3·trans_std of the RoI: some bins pushed off the map
        "trans": None
        if case.no_trans
        else torch.rand(rois.shape[0], 2 * case.num_classes, part, part, generator=generator) * 6
        - 3,
    }
    return {name: None if t is None else t.to(dtype) for name, t in inputs.items()}


def check_against_reference(
    case: Case, inputs: dict, dtype: torch.dtype, requires_grad=("input", "trans")
) -> torch.Tensor:
    leaves = {
        n: None if t is None else t.detach().clone().requires_grad_(n in requires_grad)
        for n, t in inputs.items()
    }
    references = {
        n: None if t is None else t.detach().double().requires_grad_(n in requires_grad)
        for n, t in inputs.items()
    }
    out = ops.deform_psroi_pool(leaves["input"], leaves["rois"], leaves["trans"], **case.params())
    expected = reference.deform_psroi_pool(
        references["input"], references["rois"], references["trans"], **case.reference_params()
    )
    assert_close("output", out, expected, dtype)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    names = [n for n in requires_grad if leaves.get(n) is not None]
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_output)
    expected_grads = torch.autograd.grad(
        expected, [references[n] for n in names], grad_output.double()
    )
    for name, grad, expected_grad in zip(names, grads, expected_grads, strict=True):
        assert_close(f"grad_{name}", grad, expected_grad, dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("design", DESIGNS)
def test_forward_and_gradients(case_name, dtype, design):
    case = dataclasses.replace(CASES[case_name], design=design)
    check_against_reference(case, make_inputs(case, dtype), dtype)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("case_name", ["basic", "part_cells_shared_by_bins"])
def test_float64_kernels(case_name, design):
    """The float64 instantiations compute in float64: the reference to ~1e-15."""
    case = dataclasses.replace(CASES[case_name], design=design)
    check_against_reference(case, make_inputs(case, torch.float64), torch.float64)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("no_trans", [False, True], ids=["trans", "no_trans"])
def test_gradcheck_on_the_kernels(no_trans, design):
    """torch.autograd.gradcheck of the emulated kernels in float64, input and
    trans; RoIs and trans keep every sample off B2's borders and kinks."""
    generator = torch.Generator().manual_seed(15)
    x = torch.randn(2, 2 * 4, 5, 6, dtype=torch.float64, generator=generator).requires_grad_()
    rois = torch.tensor([[0, 1.0, 2.0, 8.0, 7.0], [1, 3.0, 1.0, 9.0, 8.0]], dtype=torch.float64)
    trans = (torch.rand(2, 2, 2, 2, dtype=torch.float64, generator=generator) * 0.4 - 0.2
             ).requires_grad_()
    arguments = dict(spatial_scale=0.53, output_dim=2, group_size=2, pooled_size=2, part_size=2,
                     sample_per_part=2, trans_std=0.13, no_trans=no_trans, design=design)
    if no_trans:
        assert torch.autograd.gradcheck(
            lambda i: ops.deform_psroi_pool(i, rois, None, **arguments), (x,))
    else:
        assert torch.autograd.gradcheck(
            lambda i, t: ops.deform_psroi_pool(i, rois, t, **arguments), (x, trans))


def test_c_round_and_minimum_roi_size():
    """Halves round away from zero (2.5 -> 3, -2.5 -> -3, not to even), and a
    RoI whose rounded corners cross still has sides of 0.1 on the map."""
    case = dataclasses.replace(CASES["basic"], no_trans=True)
    inputs = make_inputs(case, torch.float32, seed=2)
    inputs["rois"] = torch.tensor([[0, 2.5, -2.5, 9.5, 7.5], [1, 10.5, 9.5, 3.5, 1.5]])
    out = check_against_reference(case, inputs, torch.float32)
    shifted = dict(inputs, rois=torch.tensor([[0, 2.0, -2.0, 9.0, 7.0], [1, 10.0, 9.0, 3.0, 1.0]]))
    assert not torch.equal(
        out, ops.deform_psroi_pool(shifted["input"], shifted["rois"], None, **case.params())
    )


@pytest.mark.parametrize(
    "min_channels, waves",
    [(1, 10**6), (3, 10**6), (8, 0)],
    ids=["slice_per_channel", "uneven", "one_slice"],
)
def test_channel_slices(monkeypatch, min_channels, waves):
    """The trans gradient's per-slice partial sums (5 channels per class: 1,
    2+2+1 ... slices) add up to the reference's."""
    monkeypatch.setattr(launch, "MIN_CHANNELS_PER_THREAD", min_channels)
    monkeypatch.setattr(launch, "TARGET_WAVES", waves)
    case = dataclasses.replace(CASES["basic"], output_dim=10, num_classes=2)
    check_against_reference(case, make_inputs(case, torch.float32, seed=3), torch.float32)


@pytest.mark.parametrize("design", DESIGNS)
def test_rois_in_several_launches(monkeypatch, design):
    monkeypatch.setattr(launch, "MAX_GRID_DIM", (2**31 - 1, 4, 65535))
    case = dataclasses.replace(CASES["part_cells_shared_by_bins"], design=design)
    check_against_reference(case, make_inputs(case, torch.float32, seed=4), torch.float32)


@pytest.mark.parametrize("requires_grad", [("input",), ("trans",)], ids="+".join)
@pytest.mark.parametrize("design", DESIGNS)
def test_only_requested_gradients(requires_grad, design):
    case = dataclasses.replace(CASES["basic"], design=design)
    check_against_reference(
        case, make_inputs(case, torch.float32, seed=5), torch.float32, requires_grad
    )


def test_no_trans_ignores_trans():
    case = CASES["basic"]
    inputs = make_inputs(case, torch.float32, seed=6)
    params = dict(case.params(), no_trans=True)
    ignored = ops.deform_psroi_pool(inputs["input"], inputs["rois"], inputs["trans"], **params)
    none = ops.deform_psroi_pool(inputs["input"], inputs["rois"], None, **params)
    torch.testing.assert_close(ignored, none, rtol=0, atol=0)


@pytest.mark.parametrize("design", DESIGNS)
def test_memcheck(design):
    """No out-of-bounds write in the forward or backward (trans and no_trans)."""
    with emulator.mode("memcheck"):
        for name in ("basic", "no_trans"):
            case = dataclasses.replace(CASES[name], design=design)
            check_against_reference(case, make_inputs(case, torch.float32, seed=7), torch.float32)


def _bad(**changes):
    case = CASES["basic"]
    arguments = dict(make_inputs(case, torch.float32), **case.params())
    arguments.update(changes)
    return arguments


def _rois_with(k: int, column: int, value: float) -> torch.Tensor:
    rois = _bad()["rois"].clone()
    rois[k, column] = value
    return rois


BAD_ARGUMENTS = {
    "rois_not_k_by_5": (_bad(rois=torch.zeros(9, 6)), ValueError, r"rois must have shape \(K, 5\)"),
    "design": (
        _bad(design="nhwc"),
        ValueError,
        r"design must be one of 'pw_fastest', 'channels_fastest', 'samples_fastest', got 'nhwc'",
    ),
    "batch_index": (
        _bad(rois=_rois_with(5, 0, 7.0)),
        ValueError,
        r"in \[0, 2\) .* got 7.0 in RoI 5",
    ),
    "nan_coordinate": (
        _bad(rois=_rois_with(0, 4, float("nan"))),
        ValueError,
        r"finite coordinates",
    ),
    "channels_not_output_dim_group_size_squared": (
        _bad(input=torch.zeros(2, 15, 8, 9)),
        ValueError,
        r"input must have output_dim·group_size² = 4·2² = 16 channels, got 15",
    ),
    "trans_odd_channels": (
        _bad(trans=torch.zeros(9, 3, 3, 3)),
        ValueError,
        r"2·num_classes channels",
    ),
    "num_classes_not_dividing": (
        _bad(trans=torch.zeros(9, 6, 3, 3)),
        ValueError,
        r"num_classes = 3, which must divide output_dim \(4\)",
    ),
    "trans_shape": (
        _bad(trans=torch.zeros(9, 4, 2, 2)),
        ValueError,
        r"trans must have shape \(9, 4, 3, 3\) \(K, 2·num_classes, part_size, part_size\)",
    ),
    "trans_missing": (_bad(trans=None), TypeError, r"trans must be a torch.Tensor unless no_trans"),
    "trans_dtype": (
        _bad(trans=torch.zeros(9, 4, 3, 3, dtype=torch.bfloat16)),
        TypeError,
        r"trans has dtype torch.bfloat16, expected input's dtype torch.float32",
    ),
    "rois_device": (
        _bad(rois=torch.zeros(9, 5, device="meta")),
        ValueError,
        r"rois is on meta, expected input's device cpu",
    ),
    "group_size": (_bad(group_size=0), ValueError, r"group_size must be an int >= 1"),
    "sample_per_part": (
        _bad(sample_per_part=0),
        ValueError,
        r"sample_per_part must be an int >= 1",
    ),
    "part_size": (_bad(part_size=-1), ValueError, r"part_size must be an int >= 0"),
    "trans_std": (_bad(trans_std=float("inf")), ValueError, r"trans_std must be a finite number"),
    "no_trans_type": (_bad(no_trans=1), TypeError, r"no_trans must be a bool"),
    "sample_per_part_too_large": (
        _bad(sample_per_part=1025),
        ValueError,
        r"sample_per_part must be at most 1024 .* got 1025",
    ),
    "output_dim_negative": (_bad(output_dim=-1), ValueError, r"output_dim must be an int >= 0"),
    "rois_list_of_wrong_shape": (
        _bad(rois=[torch.zeros(3, 5)]),
        ValueError,
        r"rois\[0\] must have shape \(L, 4\)",
    ),
    "rois_float64": (
        _bad(rois=_bad()["rois"].double()),
        TypeError,
        r"rois has dtype torch.float64, expected input's dtype torch.float32$",
    ),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_arguments(name):
    arguments, error, message = BAD_ARGUMENTS[name]
    with pytest.raises(error, match=message):
        ops.deform_psroi_pool(**arguments)


def test_defaults_are_mmdets():
    """mmdet v1's deform_roi_pooling defaults: spatial_scale 1, group_size 1,
    part_size = pooled_size, sample_per_part 4, trans_std 0 (trans then moves
    nothing: the same as no_trans), with the reference at those values."""
    case = Case(group_size=1, spatial_scale=1.0, sample_per_part=4, trans_std=0.0)
    inputs = make_inputs(case, torch.float32, seed=9)
    ours = ops.deform_psroi_pool(inputs["input"], inputs["rois"], inputs["trans"], output_dim=4,
                                 pooled_size=3)
    expected = reference.deform_psroi_pool(
        inputs["input"].double(), inputs["rois"].double(), inputs["trans"].double(),
        **case.reference_params())
    assert_close("output", ours, expected, torch.float32)
    no_trans = ops.deform_psroi_pool(inputs["input"], inputs["rois"], output_dim=4, pooled_size=3,
                                     no_trans=True)
    torch.testing.assert_close(ours, no_trans, rtol=0, atol=0)


def test_boxes_per_image_and_float32_boxes_with_half_features():
    """A list of [L_i, 4] boxes pools as the [K, 5] rows; float32 boxes are
    accepted with half features (autocast)."""
    case = CASES["basic"]
    inputs = make_inputs(case, torch.float32, seed=10)
    rows = inputs["rois"][:5].clone()
    rows[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    boxes = [rows[:2, 1:], rows[2:, 1:]]
    trans = inputs["trans"][:5]
    expected = ops.deform_psroi_pool(inputs["input"], rows, trans, **case.params())
    torch.testing.assert_close(
        ops.deform_psroi_pool(inputs["input"], boxes, trans, **case.params()), expected,
        rtol=0, atol=0)
    half = {"input": inputs["input"].half(), "rois": rows, "trans": trans.half()}
    with torch.autocast("cpu", dtype=torch.float16):
        out = check_against_reference(case, half, torch.float16)
    assert out.dtype == torch.float16


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("empty", ["K", "output_dim"])
def test_empty_output_and_zero_gradients(empty, design):
    """K = 0 RoIs or output_dim = 0: an empty output of the right shape and
    zero gradients, in ours and in the reference."""
    case = dataclasses.replace(CASES["basic"], design=design) if empty == "K" else dataclasses.replace(
        CASES["basic"], output_dim=0, num_classes=1, design=design)
    inputs = make_inputs(case, torch.float32, seed=11)
    if empty == "K":
        inputs = {n: t if n == "input" else t[:0] for n, t in inputs.items()}
    for module, params in ((ops, case.params()), (reference, case.reference_params())):
        leaves = {n: t.clone().requires_grad_(n != "rois") for n, t in inputs.items()}
        out = module.deform_psroi_pool(leaves["input"], leaves["rois"], leaves["trans"], **params)
        assert out.shape == (inputs["rois"].shape[0], case.output_dim, 3, 3)
        grads = torch.autograd.grad(out.sum(), [leaves["input"], leaves["trans"]])
        for name, grad in zip(("input", "trans"), grads, strict=True):
            assert grad.shape == inputs[name].shape and not grad.any(), name


def test_module_is_the_function():
    case = CASES["basic"]
    inputs = make_inputs(case, torch.float32, seed=12)
    module = ops.DeformPSRoIPool(case.spatial_scale, case.pooled_size, case.output_dim, False,
                                 case.group_size, case.part_size, case.sample_per_part,
                                 case.trans_std)
    torch.testing.assert_close(
        module(inputs["input"], inputs["rois"], inputs["trans"]),
        ops.deform_psroi_pool(inputs["input"], inputs["rois"], inputs["trans"], **case.params()),
        rtol=0, atol=0)
    assert "sample_per_part=2" in repr(module)
    no_trans = ops.DeformPSRoIPool(case.spatial_scale, case.pooled_size, case.output_dim, True,
                                   case.group_size, sample_per_part=case.sample_per_part,
                                   trans_std=case.trans_std)
    torch.testing.assert_close(
        no_trans(inputs["input"], inputs["rois"], inputs["trans"]),
        ops.deform_psroi_pool(inputs["input"], inputs["rois"], **dict(case.params(), no_trans=True)),
        rtol=0, atol=0)


def test_a_new_pack_is_the_no_trans_pooling_and_learns_its_trans():
    """Zero-initialised last layer (mmdet v1): a new Pack pools as no_trans; the
    layers get gradients through trans and one SGD step moves the bins. An
    empty list of boxes gives an empty output and zero gradients."""
    torch.manual_seed(13)
    case = dataclasses.replace(CASES["basic"], num_classes=1, trans_std=0.1)
    inputs = make_inputs(case, torch.float32, seed=13)
    pack = ops.DeformPSRoIPoolPack(case.spatial_scale, case.pooled_size, case.output_dim,
                                   group_size=case.group_size, sample_per_part=2,
                                   trans_std=case.trans_std, deform_fc_channels=16)
    out = pack(inputs["input"], inputs["rois"])
    expected = ops.deform_psroi_pool(inputs["input"], inputs["rois"], None,
                                     **dict(case.params(), no_trans=True))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(14)))
    assert pack.offset_fc[-1].weight.grad.abs().sum() > 0
    torch.optim.SGD(pack.parameters(), lr=1.0).step()
    assert (pack(inputs["input"], inputs["rois"]) - out).abs().max() > 1e-3
    pack.zero_grad(set_to_none=False)
    empty = pack(inputs["input"], [torch.zeros(0, 4), torch.zeros(0, 4)])
    assert empty.shape == (0, case.output_dim, case.pooled_size, case.pooled_size)
    empty.sum().backward()
    assert all(not p.grad.any() for p in pack.parameters())


def test_pack_needs_one_trans_cell_per_bin():
    with pytest.raises(ValueError, match=r"part_size must be 0 or pooled_size: .* got part_size=2, "
                                         r"pooled_size=3"):
        ops.DeformPSRoIPoolPack(0.5, 3, 4, part_size=2)


def _tiny_op_arguments(with_trans: bool, design: str = "pw_fastest"):
    case = Case(N=2, H=4, W=5, output_dim=2, group_size=2, pooled_size=2, num_classes=1)
    inputs = make_inputs(case, torch.float32, seed=8)
    trans = inputs["trans"].requires_grad_() if with_trans else None
    return (inputs["input"].requires_grad_(), inputs["rois"], trans, 0.5, 2, 2, 2, 2, 2, 0.1,
            design)


@pytest.mark.parametrize("with_trans", [True, False], ids=["trans", "no_trans"])
@pytest.mark.parametrize("design", DESIGNS)
def test_opcheck(with_trans, design):
    torch.library.opcheck(
        torch.ops.dcnbench.deform_psroi_pool.default, _tiny_op_arguments(with_trans, design)
    )


@pytest.mark.parametrize("design", DESIGNS)
def test_opcheck_backward(design):
    input, rois, trans, *params = (
        a.detach() if isinstance(a, torch.Tensor) else a for a in _tiny_op_arguments(True, design)
    )
    torch.library.opcheck(
        torch.ops.dcnbench.deform_psroi_pool_backward.default,
        (torch.randn(rois.shape[0], 2, 2, 2), input, rois, trans, *params, [True, True]),
    )


def _no_gpu() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_no_gpu() is not None, reason=str(_no_gpu()))
class TestOnGPU:
    @pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    @pytest.mark.parametrize("case_name", list(CASES))
    @pytest.mark.parametrize("design", DESIGNS)
    def test_against_reference(self, case_name, dtype, design):
        case = dataclasses.replace(CASES[case_name], design=design)
        inputs = {n: None if t is None else t.cuda() for n, t in make_inputs(case, dtype).items()}
        check_against_reference(case, inputs, dtype)
