"""Registrations of conv2d, deform_conv2d and modulated_deform_conv2d.

Parameters and validation, the input generators and what each mode promises,
FLOP and byte counts on a case worked out by hand, the tolerance table, and
the registered implementations run through the registry on the CPU.
"""

from __future__ import annotations

import io
import sys
import textwrap
import types

import pytest
import torch
from rich.console import Console

from harness import cli, counters, results, runner, suites
from harness.cases import make_case
from harness.checking import TensorError, judge, measure
from harness.operators.deform_conv2d import TF32_TOLERANCE
from harness.registry import DTYPES, get_implementation, get_operator, implementations_of
from kernels.peers import torchvision_ops
from kernels.reference.deform_conv2d import sample_coordinates

DEFORM_OPS = ("deform_conv2d", "modulated_deform_conv2d")
CONV_OPS = ("conv2d", *DEFORM_OPS)
CONTRACT_PARAMS = ["N", "C_in", "C_out", "H", "W", "kernel_h", "kernel_w", "stride_h", "stride_w",
                   "pad_h", "pad_w", "dilation_h", "dilation_w", "groups"]


def inputs(op, overrides=None, dtype="float32", mode="random", seed=0):
    operator = get_operator(op)
    params = operator.resolve(overrides or {})
    generator = torch.Generator().manual_seed(seed)
    return params, operator.make_inputs(params, DTYPES[dtype], "cpu", generator, mode)


def coordinates(params, offset):
    return sample_coordinates(
        offset.double(), (params["kernel_h"], params["kernel_w"]),
        (params["stride_h"], params["stride_w"]), (params["pad_h"], params["pad_w"]),
        (params["dilation_h"], params["dilation_w"]), params["offset_groups"])


# --- the registrations ---------------------------------------------------------

def test_parameters_are_the_contracts():
    assert list(get_operator("conv2d").params) == [*CONTRACT_PARAMS, "bias"]
    for op in DEFORM_OPS:
        assert list(get_operator(op).params) == [*CONTRACT_PARAMS, "offset_groups", "bias",
                                                 "allow_tf32"]


def test_implementations_and_baselines():
    kinds = {op: {impl.name: impl.kind for impl in implementations_of(op)} for op in CONV_OPS}
    # At least these: plugins may add more.
    assert kinds["conv2d"].items() >= {"reference": "reference", "pytorch": "baseline"}.items()
    for op in DEFORM_OPS:
        assert kinds[op].items() >= {"reference": "reference", "torchvision": "peer",
                                     "cupy": "kernel", "cupy_implicit_gemm": "kernel"}.items()
        assert get_operator(op).baseline == "torchvision"
        assert get_implementation(op, "cupy").emulated_on == ("cpu",)
    assert get_operator("conv2d").baseline == "pytorch"
    assert "mask" in [t.name for t in get_operator("modulated_deform_conv2d").tensors]
    assert "mask" not in [t.name for t in get_operator("deform_conv2d").tensors]


@pytest.mark.parametrize("op", CONV_OPS)
@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"groups": 3}, ["'groups'", "C_in % groups == 0", "C_in=16", "groups=3"]),
        ({"C_out": 12, "groups": 8}, ["'groups'", "C_out % groups == 0", "C_out=12", "groups=8"]),
        ({"N": -1}, ["'N'", ">= 0", "got -1"]),
        ({"C_in": 0}, ["'C_in'", ">= 1", "got 0"]),
        ({"kernel_w": 0}, ["'kernel_w'", ">= 1", "got 0"]),
        ({"pad_h": -1}, ["'pad_h'", ">= 0", "got -1"]),
        ({"H": 2, "pad_h": 0}, ["H_out >= 1", "H_out=0"]),
        ({"W": 4, "dilation_w": 3, "pad_w": 0}, ["W_out >= 1", "W_out=-2", "spans 7"]),
    ],
)
def test_validation_names_parameter_expected_and_actual(op, overrides, words):
    with pytest.raises(ValueError) as error:
        get_operator(op).resolve(overrides)
    for word in words:
        assert word in str(error.value)


@pytest.mark.parametrize("op", DEFORM_OPS)
def test_offset_groups_must_divide_c_in(op):
    with pytest.raises(ValueError, match=r"'offset_groups' must divide C_in.*C_in=16, offset_groups=3"):
        get_operator(op).resolve({"offset_groups": 3})


# --- generated inputs ------------------------------------------------------------

@pytest.mark.parametrize("op", CONV_OPS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_inputs_have_the_specs_shapes_dtype_and_are_reproducible(op, dtype):
    overrides = {"N": 2, "C_in": 4, "C_out": 6, "H": 7, "W": 5, "groups": 2, "stride_w": 2}
    if op != "conv2d":
        overrides["offset_groups"] = 2
    params, tensors = inputs(op, overrides, dtype)
    _, again = inputs(op, overrides, dtype)
    out_h, out_w = 7, 3
    expected = {"input": (2, 4, 7, 5), "weight": (6, 2, 3, 3), "bias": (6,),
                "offset": (2, 2 * 2 * 9, out_h, out_w), "mask": (2, 2 * 9, out_h, out_w)}
    assert list(tensors) == [t.name for t in get_operator(op).tensors]
    for name, tensor in tensors.items():
        assert tuple(tensor.shape) == expected[name], name
        assert tensor.dtype == DTYPES[dtype] and tensor.device.type == "cpu"
        assert torch.equal(tensor, again[name]), f"{name} is not reproducible"
        assert tensor.abs().max() > 0, f"{name} is all zeros"
    _, without_bias = inputs(op, {**overrides, "bias": False}, dtype)
    assert "bias" not in without_bias


@pytest.mark.parametrize("op", CONV_OPS)
def test_outputs_are_order_one(op):
    params, tensors = inputs(op, {"C_in": 64, "C_out": 32, "H": 12, "W": 12}, "float64")
    out = get_implementation(op, "reference").forward(tensors, params)
    assert 0.2 < float(out.std()) < 3.0


def test_random_offsets_stay_off_kinks_and_reach_outside():
    for dtype in ("float32", "float16", "bfloat16"):
        params, tensors = inputs("modulated_deform_conv2d", {"H": 20, "W": 20}, dtype)
        offset = tensors["offset"].double()
        assert ((offset - offset.round()).abs() >= 2.0**-10).all(), dtype
        assert (offset.abs() > 1).float().mean() > 0.3, "offsets should move samples by pixels"
        y, x = coordinates(params, offset)
        outside = (y <= -1) | (y >= params["H"]) | (x <= -1) | (x >= params["W"])
        assert outside.any() and not outside.all(), dtype
        mask = tensors["mask"]
        assert ((mask > 0) & (mask <= 1)).all() and (mask < 1).float().mean() > 0.99


def test_integer_offsets_are_integers():
    params, tensors = inputs("deform_conv2d", mode="integer_offsets", dtype="bfloat16")
    offset = tensors["offset"].double()
    assert torch.equal(offset, offset.round()) and offset.abs().max() >= 2


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("overrides", [{}, {"H": 6, "W": 11, "stride_h": 2, "dilation_w": 2, "pad_h": 2}])
def test_border_samples_land_exactly_on_the_boundary(dtype, overrides):
    params, tensors = inputs("modulated_deform_conv2d", overrides, dtype, "border")
    y, x = coordinates(params, tensors["offset"])
    height, width = params["H"], params["W"]
    on_y = sum(y == v for v in (-1, 0, height - 1, height)).bool()
    on_x = sum(x == v for v in (-1, 0, width - 1, width)).bool()
    assert (on_y | on_x).all()
    assert (on_y & on_x).any() and (on_y & ~on_x).any() and (on_x & ~on_y).any()
    for value in (-1, 0, height - 1, height):
        assert (y == value).any(), f"y never {value}"
    for value in (-1, 0, width - 1, width):
        assert (x == value).any(), f"x never {value}"


def test_border_refuses_offsets_the_dtype_cannot_hold():
    with pytest.raises(ValueError, match="cannot hold exactly.*H=600"):
        inputs("deform_conv2d", {"N": 1, "C_in": 1, "C_out": 1, "H": 600, "W": 3}, "bfloat16", "border")


def test_far_offsets_put_half_the_samples_far_outside():
    params, tensors = inputs("deform_conv2d", {"H": 8, "W": 10, "pad_h": 2}, "bfloat16", "far")
    y, x = coordinates(params, tensors["offset"])
    reach = 8 + 10 + 2 * (2 + 1)
    far = tensors["offset"].double().abs().view(y.shape[0], -1, 2, *y.shape[-2:]).min(2).values >= 1.9 * reach
    far = far.view(y.shape)
    assert 0.4 < far.float().mean() < 0.6
    assert ((y[far] < -1) | (y[far] > params["H"])).all() and ((x[far] < -1) | (x[far] > params["W"])).all()
    inside = (y > -1) & (y < params["H"]) & (x > -1) & (x < params["W"])
    assert inside[~far].float().mean() > 0.5


def test_zero_mask_zeroes_a_tap_per_group_and_some_entries():
    params, tensors = inputs("modulated_deform_conv2d", {"offset_groups": 4}, "float16", "zero_mask")
    mask = tensors["mask"].view(params["N"], 4, 9, -1)
    dead_tap = (mask == 0).all(dim=3).all(dim=0)  # [group, tap]
    assert (dead_tap.sum(dim=1) >= 1).all()
    alive = mask[:, ~dead_tap]
    assert 0.15 < (alive == 0).float().mean() < 0.35
    assert ((alive == 0) | ((alive > 0) & (alive < 1))).all()
    assert "zero_mask" not in get_operator("deform_conv2d").input_modes


def test_forward_only_modes_are_the_kinks():
    for op in DEFORM_OPS:
        assert get_operator(op).forward_only_modes == ("integer_offsets", "border")


# --- counts --------------------------------------------------------------------

# N=1, C_in=2, C_out=4, H=W=3, 3x3, pad 1: H_out = W_out = 3, 9 pixels, 9 taps.
TINY = {"N": 1, "C_in": 2, "C_out": 4, "H": 3, "W": 3}


def test_counts_by_hand():
    gemm = 2 * 1 * 4 * 9 * (2 * 9)  # 1296
    bias = 4 * 9  # 36
    points, samples = 1 * 1 * 9 * 9, 1 * 2 * 9 * 9  # 81, 162
    conv, v1, v2 = (get_operator(op) for op in CONV_OPS)
    params = conv.resolve(TINY)
    assert conv.flops(params) == gemm + bias == 1332
    assert conv.bytes(params, 4) == 4 * (18 + 72 + 4 + 36)
    assert conv.backward_flops(params) == 2 * gemm + bias
    assert conv.backward_bytes(params, 2) == 2 * ((18 + 72 + 36) + (18 + 72 + 4))

    params = v1.resolve(TINY)
    assert v1.flops(params) == gemm + 10 * points + 7 * samples + bias == 3276
    assert v1.bytes(params, 4) == 4 * (18 + 162 + 72 + 4 + 36)
    assert v1.backward_flops(params) == 2 * gemm + 10 * points + 29 * samples + bias
    assert v1.backward_bytes(params, 4) == 4 * ((18 + 162 + 72 + 36) + (18 + 162 + 72 + 4))

    params = v2.resolve(TINY)
    assert v2.flops(params) == gemm + 10 * points + 8 * samples + bias == 3438
    assert v2.bytes(params, 2) == 2 * (18 + 162 + 81 + 72 + 4 + 36)
    assert v2.backward_flops(params) == 2 * gemm + 12 * points + 33 * samples + bias
    assert v2.backward_bytes(params, 4) == 4 * ((18 + 162 + 81 + 72 + 36) + (18 + 162 + 81 + 72 + 4))

    no_bias = v2.resolve({**TINY, "bias": False, "offset_groups": 2})
    assert v2.flops(no_bias) == gemm + 10 * 2 * points + 8 * samples


def test_tolerances_cover_every_dtype_and_say_why():
    unit_roundoff = {"float16": 2.0**-11, "bfloat16": 2.0**-8}
    for op in CONV_OPS:
        table = get_operator(op).tolerances
        assert set(table) == {"float64", "float32", "float16", "bfloat16"}
        assert table["float64"].rel_l2 < table["float32"].rel_l2 < table["float16"].rel_l2 < table["bfloat16"].rel_l2
        for dtype, u in unit_roundoff.items():
            assert table[dtype].rel_l2 == 4 * u and table[dtype].max_abs == 8 * u
        assert all(len(t.why) > 50 and t.max_abs >= t.rel_l2 for t in table.values())


# --- implementations through the registry ----------------------------------------

def run(op, impl, params, tensors, backward, seed=1):
    """Output and, with ``backward``, gradients of every input for one implementation."""
    leaves = {k: v.clone().requires_grad_(backward) for k, v in tensors.items()}
    out = get_implementation(op, impl).forward(leaves, params)
    if not backward:
        return {"output": out.detach()}
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output)
    return {"output": out.detach(), **{f"grad_{k}": g for k, g in zip(leaves, grads, strict=True)}}


# Small, with every geometry parameter away from its default and asymmetric.
GEOMETRY = {"N": 2, "C_in": 8, "C_out": 6, "H": 7, "W": 9, "groups": 2, "offset_groups": 2,
            "pad_h": 2, "stride_h": 2, "dilation_w": 2, "kernel_w": 2}


def check_against_reference(op, impl, overrides, dtype, mode):
    operator = get_operator(op)
    params, tensors = inputs(op, overrides, dtype, mode)
    backward = mode not in operator.forward_only_modes
    got = run(op, impl, params, tensors, backward)
    ref = run(op, "reference", params, {k: v.double() for k, v in tensors.items()}, backward)
    for direction, names in (("forward", ["output"]), ("backward", [n for n in got if n != "output"])):
        if names:
            errors = {n: measure(got[n], ref[n], DTYPES[dtype], n) for n in names}
            verdict = judge(errors, operator.tolerance(dtype, direction))
            assert verdict.passed, f"{op}/{impl} {dtype} {mode} {direction}: {verdict.reason}"


@pytest.mark.parametrize("op", DEFORM_OPS)
def test_torchvision_meets_the_float32_tolerance_in_every_mode(op):
    for mode in get_operator(op).input_modes:
        check_against_reference(op, "torchvision", GEOMETRY, "float32", mode)


@pytest.mark.parametrize("wrong", [{"groups": 2}, {"offset_groups": 2}])
def test_torchvision_adapter_refuses_groups_its_shapes_contradict(wrong):
    """torchvision infers both group counts from shapes; the adapter checks they are ours."""
    params, tensors = inputs("deform_conv2d", dtype="float64")
    arguments = {"groups": 1, "offset_groups": 1, **wrong}
    with pytest.raises(ValueError, match=next(iter(wrong)) + "|offset must have"):
        torchvision_ops.deform_conv2d(tensors["input"], tensors["offset"], tensors["weight"], **arguments)


def test_torchvision_adapter_infers_groups_takes_an_empty_batch_and_refuses_no_channels():
    params, tensors = inputs("deform_conv2d", dtype="float64")
    x, offset, weight = tensors["input"], tensors["offset"], tensors["weight"]
    padding = (params["pad_h"], params["pad_w"])
    inferred = torchvision_ops.deform_conv2d(x, offset, weight, padding=padding)
    given = torchvision_ops.deform_conv2d(x, offset, weight, padding=padding, groups=1,
                                          offset_groups=1)
    assert torch.equal(inferred, given)
    assert torchvision_ops.deform_conv2d(x[:0], offset[:0], weight, padding=padding).shape[0] == 0
    with pytest.raises(ValueError, match="cannot take input with 0 channels"):
        torchvision_ops.deform_conv2d(x[:, :0], offset, weight[:, :0], padding=padding)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pytorch_conv2d_meets_the_tolerance(dtype):
    overrides = {"groups": 2, "stride_h": 2, "dilation_w": 2, "pad_w": 2, "kernel_h": 2}
    check_against_reference("conv2d", "pytorch", overrides, dtype, "random")


def test_conv2d_implementations_are_f_conv2d_with_the_contract_parameters():
    """Spelled out here rather than through the helper both implementations share."""
    overrides = {"groups": 2, "stride_h": 2, "stride_w": 1, "pad_h": 0, "pad_w": 2,
                 "dilation_h": 1, "dilation_w": 2, "kernel_h": 2, "kernel_w": 3}
    params, tensors = inputs("conv2d", overrides, "float64")
    expected = torch.nn.functional.conv2d(
        tensors["input"], tensors["weight"], tensors["bias"], stride=(2, 1), padding=(0, 2),
        dilation=(1, 2), groups=2)
    for impl in ("reference", "pytorch"):
        assert torch.equal(get_implementation("conv2d", impl).forward(tensors, params), expected), impl


@pytest.mark.parametrize("op", CONV_OPS)
def test_reference_returns_the_case_dtype_and_gradients_reach_the_inputs(op):
    params, tensors = inputs(op, dtype="float16")
    got = run(op, "reference", params, tensors, backward=True)
    assert all(t.dtype == torch.float16 for t in got.values())


@pytest.mark.parametrize("impl", ["cupy", "cupy_implicit_gemm"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("op", DEFORM_OPS)
def test_cupy_kernel_through_the_registry(op, dtype, impl):
    """Our kernels (through the CPU emulator here) in every mode; skipped, saying why,
    while kernels.ops.deform_conv2d or the emulator is missing."""
    reason = get_implementation(op, impl).available("cpu")
    if reason is not None:
        assert isinstance(reason, str) and reason
        pytest.skip(reason)
    for mode in get_operator(op).input_modes:
        check_against_reference(op, impl, GEOMETRY, dtype, mode)


def test_kernel_availability_reports_a_missing_piece(monkeypatch):
    # None in sys.modules makes any import of cupy fail, whether or not an earlier test
    # imported it already (an __import__ hook would miss the cached module).
    monkeypatch.setitem(sys.modules, "cupy", None)
    reason = get_implementation("deform_conv2d", "cupy").available("cuda")
    assert reason is not None and "cupy is not importable" in reason


def test_kernel_availability_reports_a_missing_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = get_implementation("modulated_deform_conv2d", "cupy").available("cuda")
    if reason is not None and "kernels.ops.deform_conv2d" in reason:
        pytest.skip(reason)
    assert reason == "no CUDA GPU visible to torch"


# --- allow_tf32: float32 on TF32, a case of its own ------------------------------

@pytest.mark.parametrize("op", DEFORM_OPS)
def test_tf32_is_named_in_the_id_only_when_true_and_takes_float32_only(op):
    operator = get_operator(op)
    plain = make_case(operator, {}, "float32", "random")
    tf32 = make_case(operator, {"allow_tf32": True}, "float32", "random")
    assert tf32.id == plain.id.replace("_bias/", "_bias_tf32/") != plain.id
    assert "tf32" not in plain.id
    for dtype in ("float16", "bfloat16", "float64"):
        with pytest.raises(ValueError, match=f"parameter 'allow_tf32' must be false for dtype "
                                             f"{dtype}.*got allow_tf32=true with {dtype}"):
            make_case(operator, {"allow_tf32": "true"}, dtype, "random")


def test_a_suite_asking_tf32_of_a_half_type_names_the_point(tmp_path):
    path = tmp_path / "tf32.toml"
    path.write_text(textwrap.dedent("""
        description = "x"
        [[sweep]]
        op = "deform_conv2d"
        dtypes = ["float32", "float16"]
        [sweep.params]
        allow_tf32 = true
    """))
    with pytest.raises(suites.SuiteError, match=r"sweep\[0\]: point \{'allow_tf32': True\}: "
                       "parameter 'allow_tf32' must be false for dtype float16"):
        suites.load(str(path))


@pytest.mark.parametrize("op", DEFORM_OPS)
def test_tf32_cases_are_judged_by_tf32_bounds_and_list_shows_them(op):
    operator = get_operator(op)
    tf32 = operator.resolve({"allow_tf32": True})
    plain = operator.resolve({})
    for direction in ("forward", "backward"):
        assert operator.tolerance("float32", direction, tf32) is TF32_TOLERANCE
        assert operator.tolerance("float32", direction, plain) is operator.tolerances["float32"]
    # TF32 keeps float16's 10 mantissa bits: float16's bounds, 20x float32's.
    assert (TF32_TOLERANCE.rel_l2, TF32_TOLERANCE.max_abs) == (4 * 2.0**-11, 8 * 2.0**-11)
    assert TF32_TOLERANCE.rel_l2 == operator.tolerances["float16"].rel_l2
    listed = cli._operator_info(operator)["case_tolerances"]
    assert listed == [{"params": {"allow_tf32": True}, "dtype": "float32",
                       "forward": vars(TF32_TOLERANCE), "backward": vars(TF32_TOLERANCE)}]


def test_list_names_the_tf32_bounds_and_the_cases_they_judge():
    out = io.StringIO()
    assert cli.cmd_list(type("Args", (), {"json": False})(), Console(file=out, width=400)) == 0
    assert "float32, allow_tf32=true" in out.getvalue()
    assert "TF32's 10 mantissa bits" in out.getvalue()


def test_torchvision_runs_its_call_with_cublas_tf32_on_and_restores_the_flag(monkeypatch):
    """The flag is on inside the call only, and restored when the call raises (that
    torchvision's cuBLAS GEMMs then round to TF32 only a GPU shows)."""
    seen = []

    def fake_deform_conv2d(*args, **kwargs):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        if kwargs["mask"] is not None:
            raise RuntimeError("planted")
        return "out"

    monkeypatch.setattr(torchvision_ops.torchvision.ops, "deform_conv2d", fake_deform_conv2d)
    params, tensors = inputs("modulated_deform_conv2d")
    x, offset, mask, weight = (tensors[n] for n in ("input", "offset", "mask", "weight"))
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        # The registered implementation passes the case's allow_tf32 on.
        tf32 = get_operator("deform_conv2d").resolve({"allow_tf32": True})
        without_mask = {name: t for name, t in tensors.items() if name != "mask"}
        call = get_implementation("deform_conv2d", "torchvision").prepare(without_mask, tf32)
        assert call() == "out" and seen == [True]
        assert matmul.allow_tf32 is False
        failing = torchvision_ops.prepare_deform_conv2d(x, offset, mask, weight, allow_tf32=True)
        with pytest.raises(RuntimeError, match="planted"):
            failing()
        assert seen == [True, True] and matmul.allow_tf32 is False
        torchvision_ops.prepare_deform_conv2d(x, offset, None, weight)()
        assert seen == [True, True, False]
    finally:
        matmul.allow_tf32 = before


@pytest.mark.parametrize("op", DEFORM_OPS)
def test_tf32_declines_say_which_implementations_have_a_tf32_path(op):
    case = make_case(get_operator(op), {"allow_tf32": True}, "float32", "random")
    declined = {(impl.name, device, direction):
                impl.declined(case.op, case.params, device, direction)
                for impl in implementations_of(op) for device in ("cpu", "cuda")
                for direction in ("forward", "backward")}
    runs = {key for key, reason in declined.items() if reason is None}
    assert runs == {("cupy_implicit_gemm", device, direction) for device in ("cpu", "cuda")
                    for direction in ("forward", "backward")} | {("torchvision", "cuda", "forward")}
    assert all("does not honour allow_tf32=true" in reason or "does not say it honours" in reason
               for reason in declined.values() if reason is not None)
    assert "im2col design" in declined[("cupy", "cuda", "forward")]
    # dcnbench counters skips the same rows.
    assert counters.skip_reason(case, get_implementation(op, "cupy"), "backward") == declined[
        ("cupy", "cpu", "backward")]
    assert counters.skip_reason(case, get_implementation(op, "cupy_implicit_gemm"),
                                "backward") is None
    assert "outside the torch.backends.cuda.matmul.allow_tf32" in declined[
        ("torchvision", "cuda", "backward")]


# The TF32 path's error (~0.6u, u = 2^-11) lies between float32's bound and TF32's.
TF32_RUN_SUITE = """
    description = "a TF32 case and its float32 twin"
    [[sweep]]
    op = ["deform_conv2d", "modulated_deform_conv2d"]
    impls = ["reference", "torchvision", "cupy", "cupy_implicit_gemm"]
    backward = true
    [sweep.params]
    N = 1
    C_in = 16
    C_out = 16
    H = 6
    W = 7
    [sweep.axes]
    allow_tf32 = [true, false]
"""


def test_tf32_case_through_the_runner_passes_tf32_bounds_and_fails_float32s(tmp_path):
    """cupy_implicit_gemm (emulated) on a TF32 case: ok under the TF32 bounds the rows
    record, with errors float32's bounds reject (so the TF32 path ran); the same case
    without TF32 within float32's. The implementations without a TF32 path are skipped."""
    path = tmp_path / "tf32.toml"
    path.write_text(textwrap.dedent(TF32_RUN_SUITE))
    options = runner.RunOptions(suite=suites.load(str(path)), device="cpu",
                                out=tmp_path / "run", timing=None)
    assert runner.run_suite(options, Console(file=io.StringIO())) == 0
    rows = results.read_rows(tmp_path / "run")
    assert len(rows) == 2 * 2 * 4 * 2  # ops × allow_tf32 × implementations × directions
    for row in rows:
        tf32 = row["params"]["allow_tf32"]
        float32 = get_operator(row["op"]).tolerances["float32"]
        if tf32 and row["impl"] != "cupy_implicit_gemm":
            assert row["status"] == "skipped" and "allow_tf32=true" in row["reason"], row
            continue
        assert row["status"] == "ok", row
        if row["impl"] != "cupy_implicit_gemm":
            continue
        bounds = TF32_TOLERANCE if tf32 else float32
        assert (row["tol_rel_l2"], row["tol_max_abs"]) == (bounds.rel_l2, bounds.max_abs)
        as_float32 = judge({name: TensorError(**e) for name, e in row["tensors"].items()},
                           float32)
        assert as_float32.passed is not tf32, (row["case_id"], row["direction"], row["rel_l2"])
        if tf32:  # every tensor with a GEMM in it carries TF32's error
            assert all(e["rel_l2"] > float32.rel_l2 for name, e in row["tensors"].items()
                       if name != "grad_bias"), row["tensors"]

