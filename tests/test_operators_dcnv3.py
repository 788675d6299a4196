"""Registrations of dcnv3, dcnv4 and dcnv3_layer.

Parameters and validation, what each input mode promises, FLOP and byte
counts on a case worked out by hand, the tolerance tables, the DCNv3 layer
(shapes, center_feature_scale, the same layer on different cores), and every
registered implementation run through the registry on the CPU.
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from harness.checking import judge, measure
from harness.operators import dcnv3 as dcnv3_operators
from harness.operators.dcnv4 import PADDING_GARBAGE
from harness.registry import DTYPES, get_implementation, get_operator, implementations_of
from kernels.ops.dcnv3_layer import DCNv3Layer, dcnv3_layer
from kernels.peers import dcnv3_gridsample
from kernels.reference import dcnv3 as ref
from kernels.reference.dcnv3 import Geometry, unpack_offset_mask

CORE_OPS = ("dcnv3", "dcnv4")
ALL_OPS = (*CORE_OPS, "dcnv3_layer")
CONTRACT_PARAMS = ["N", "H", "W", "group", "group_channels", "kernel_h", "kernel_w", "stride_h", "stride_w",
                   "pad_h", "pad_w", "dilation_h", "dilation_w", "offset_scale", "remove_center"]
# Away from the defaults and asymmetric: remove_center, stride 2x1, dilation 1x2, offset_scale 0.5.
GEOMETRY = {"N": 2, "H": 7, "W": 9, "group": 3, "group_channels": 4, "kernel_h": 3, "kernel_w": 5,
            "stride_h": 2, "pad_w": 3, "dilation_w": 2, "offset_scale": 0.5, "remove_center": True}


def inputs(op, overrides=None, dtype="float32", mode="random", seed=0):
    operator = get_operator(op)
    params = operator.resolve(overrides or {})
    generator = torch.Generator().manual_seed(seed)
    return params, operator.make_inputs(params, DTYPES[dtype], "cpu", generator, mode)


def positions(op, params, tensors):
    """(y, x) [N, H_out, W_out, G, P] of every sample, in float64."""
    geometry = Geometry.from_params(params)
    offset = tensors["offset"] if op == "dcnv3" else unpack_offset_mask(
        tensors["offset_mask"], params["group"], geometry.taps)[0]
    return geometry.sample_positions(offset.double().contiguous(), params["group"])


def masks(op, params, tensors):
    if op == "dcnv3":
        return tensors["mask"].double()
    return unpack_offset_mask(tensors["offset_mask"].double(), params["group"], Geometry.from_params(params).taps)[1]


# --- the registrations ------------------------------------------------------------

def test_parameters_are_the_contracts():
    assert list(get_operator("dcnv3").params) == [*CONTRACT_PARAMS, "softmax"]
    assert list(get_operator("dcnv4").params) == CONTRACT_PARAMS
    layer = list(get_operator("dcnv3_layer").params)
    assert layer == [p for p in CONTRACT_PARAMS if p[:-2] not in ("stride", "pad")] + [
        "dw_kernel_size", "center_feature_scale"]


# Our kernels' designs, registered for dcnv3, dcnv4 and dcnv3_layer.
KERNEL_IMPLEMENTATIONS = ("cupy_direct", "cupy_vectorized", "cupy_staged", "cupy_shared_scatter")


def test_implementations_kinds_and_devices():
    for op in ALL_OPS:
        impls = {impl.name: impl for impl in implementations_of(op)}
        expected = {"reference", "pytorch_gridsample", *KERNEL_IMPLEMENTATIONS}
        # At least these: plugins may add more.
        assert set(impls) >= expected | ({"torch_compile"} if op != "dcnv3_layer" else set())
        assert get_operator(op).baseline == "pytorch_gridsample"
        for design in KERNEL_IMPLEMENTATIONS:
            assert impls[design].kind == "kernel" and impls[design].emulated_on == ("cpu",)
            assert not impls[design].known_inaccurate
        assert set(impls["pytorch_gridsample"].known_inaccurate) == {"float16", "bfloat16"}
        if op != "dcnv3_layer":
            assert impls["torch_compile"].devices == ("cuda",)
            assert "GPU peer" in impls["torch_compile"].available("cpu")


@pytest.mark.parametrize("op, overrides, words", [
    ("dcnv3", {"group": 0}, ["group", ">= 1", "got 0"]),
    ("dcnv3", {"kernel_h": 4, "remove_center": True}, ["remove_center", "kernel_h=4"]),
    ("dcnv4", {"H": 2, "pad_h": 0}, ["output is empty", "H_out=0"]),
    ("dcnv4", {"dilation_w": 0}, ["dilation_w", ">= 1"]),
    ("dcnv3_layer", {"kernel_w": 4}, ["kernel_w", "odd", "got 4"]),
    ("dcnv3_layer", {"dw_kernel_size": 2}, ["dw_kernel_size", "odd"]),
    ("dcnv3", {"softmax": "maybe"}, ["softmax", "bool"]),
])
def test_validation_names_parameter_expected_and_actual(op, overrides, words):
    with pytest.raises(ValueError) as error:
        get_operator(op).resolve(overrides)
    for word in words:
        assert word in str(error.value)


# --- input modes -------------------------------------------------------------------

@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_inputs_have_the_specs_shapes_dtype_and_are_reproducible(op, dtype):
    overrides = {"center_feature_scale": True} if op == "dcnv3_layer" else GEOMETRY
    params, tensors = inputs(op, overrides, dtype)
    _, again = inputs(op, overrides, dtype)
    names = [spec.name for spec in get_operator(op).tensors]
    assert list(tensors) == names
    for name, tensor in tensors.items():
        assert tensor.dtype == DTYPES[dtype] and tensor.is_contiguous() and torch.equal(tensor, again[name])
    output = get_implementation(op, "reference").forward(tensors, params)
    assert 0.1 < output.double().std() < 10


def test_dcnv4_offset_mask_width_and_padding_garbage():
    params, tensors = inputs("dcnv4", GEOMETRY)
    packed = 3 * 14 * 3  # G = 3, P = 3·5 − 1
    assert tensors["offset_mask"].shape[-1] == 128 and packed == 126
    padding = tensors["offset_mask"][..., packed:]
    assert torch.isfinite(padding).all() and (padding.abs() >= 1e3).all()  # loud if read, never NaN
    assert torch.all(padding == PADDING_GARBAGE)


@pytest.mark.parametrize("op", CORE_OPS)
@pytest.mark.parametrize("scale", [1.0, 0.5, 1.3])
def test_random_positions_stay_off_kinks_and_reach_outside(op, scale):
    params, tensors = inputs(op, {**GEOMETRY, "offset_scale": scale})
    y, x = positions(op, params, tensors)
    for coordinate in (y, x):
        assert ((coordinate - coordinate.round()).abs() >= dcnv3_operators.KINK_MARGIN).all()
    assert (x < 0).any() and (x > params["W"] - 1).any()
    assert (masks(op, params, tensors) > 0).all()


def test_softmax_masks_are_logits_of_both_signs():
    params, tensors = inputs("dcnv3", {**GEOMETRY, "softmax": True})
    assert (tensors["mask"] < 0).any() and (tensors["mask"] > 1).any()


@pytest.mark.parametrize("op", CORE_OPS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_integer_offsets_put_every_sample_on_an_integer(op, dtype, scale):
    params, tensors = inputs(op, {**GEOMETRY, "offset_scale": scale}, dtype, "integer_offsets")
    for coordinate in positions(op, params, tensors):
        assert torch.equal(coordinate, coordinate.round())


@pytest.mark.parametrize("op", CORE_OPS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_border_samples_land_exactly_on_the_boundary(op, dtype, scale):
    params, tensors = inputs(op, {**GEOMETRY, "offset_scale": scale}, dtype, "border")
    y, x = positions(op, params, tensors)
    on_y = sum(y == v for v in (-1.0, 0.0, params["H"] - 1.0, float(params["H"])))
    on_x = sum(x == v for v in (-1.0, 0.0, params["W"] - 1.0, float(params["W"])))
    assert ((on_y + on_x) > 0).all()
    assert (on_y & on_x).any() and (on_y & ~on_x).any() and (~on_y & on_x).any()


@pytest.mark.parametrize("mode", ["border", "integer_offsets"])
def test_exact_modes_refuse_what_the_dtype_cannot_hold(mode):
    with pytest.raises(ValueError, match=f"input mode '{mode}'.*offset_scale=0.3"):
        inputs("dcnv3", {**GEOMETRY, "offset_scale": 0.3}, "float32", mode)


def test_border_refuses_a_map_too_wide_for_bfloat16():
    """bfloat16 holds integers up to 256 exactly: pinning to x = W on a 300-wide map needs more."""
    with pytest.raises(ValueError, match="bfloat16.*H=300, W=300"):
        inputs("dcnv3", {"N": 1, "H": 300, "W": 300, "group": 1, "group_channels": 1}, "bfloat16", "border")


@pytest.mark.parametrize("op", CORE_OPS)
def test_far_puts_half_the_sample_points_far_outside(op):
    params, tensors = inputs(op, GEOMETRY, mode="far")
    y, x = positions(op, params, tensors)
    reach = params["H"] + params["W"] + 2 * (params["pad_h"] + params["pad_w"])
    far = (x.abs() > 1.5 * reach) & (y.abs() > 1.5 * reach)
    assert 0.35 < far.double().mean() < 0.65
    assert ((x.abs() > 1.5 * reach) == far).all()  # whole (x, y) pairs


@pytest.mark.parametrize("softmax", [False, True])
def test_zero_mask_kills_a_tap_per_group_and_some_entries(softmax):
    params, tensors = inputs("dcnv3", {**GEOMETRY, "softmax": softmax}, mode="zero_mask")
    mask = tensors["mask"].view(*tensors["mask"].shape[:3], params["group"], -1)
    dead = mask == (dcnv3_operators.ZERO_MASK_LOGIT if softmax else 0.0)
    assert dead.all(dim=(0, 1, 2)).sum(-1).ge(1).all()  # a whole tap in every group
    assert 0.2 < dead.double().mean() < 0.45
    if softmax:
        weights = torch.softmax(mask.float(), -1)
        assert (weights[dead] == 0).all()


def test_forward_only_modes_are_the_kinks():
    for op in CORE_OPS:
        assert get_operator(op).forward_only_modes == ("integer_offsets", "border")
    assert get_operator("dcnv3_layer").input_modes == ("random",)


# --- counts -----------------------------------------------------------------------

def test_counts_by_hand():
    """N=1, 4×5 map, G=2, D=3, 3×3 remove_center, pad 1: H_out×W_out = 4×5, P = 8,
    points = 20·2·8 = 320, channel samples = 960, outputs = 20·6 = 120."""
    params = {"N": 1, "H": 4, "W": 5, "group": 2, "group_channels": 3, "remove_center": True}
    dcnv3, dcnv4 = get_operator("dcnv3"), get_operator("dcnv4")
    p3 = dcnv3.resolve(params)
    assert dcnv3.flops(p3) == 14 * 320 + 9 * 960
    assert dcnv3.flops({**p3, "softmax": True}) == (14 + 5) * 320 + 9 * 960
    assert dcnv3.bytes(p3, 4) == 4 * (120 + 2 * 320 + 320 + 120)  # input, offset, mask, output
    assert dcnv3.backward_flops(p3) == 18 * 320 + 32 * 960
    assert dcnv3.backward_bytes(p3, 2) == 2 * (2 * (120 + 3 * 320) + 120)
    p4 = dcnv4.resolve(params)
    # offset_mask: 2·8·3 = 48 columns, already a multiple of 8: no padding
    assert dcnv4.bytes(p4, 4) == dcnv3.bytes(p3, 4)
    # G = 1, D = 6, 3×3: P = 9, 27 columns padded to 32: 5 more per output pixel read
    one_group = {**params, "remove_center": False, "group": 1, "group_channels": 6}
    assert dcnv4.bytes(dcnv4.resolve(one_group), 4) == 4 * (120 + 20 * 27 + 120 + 20 * 5)
    assert dcnv4.flops(dcnv4.resolve(one_group)) == 14 * 180 + 9 * 1080


def test_layer_counts_by_hand():
    """N=1, 2×3 map, G=1, D=4 (C=4), 3×3, dw 3, no centre-feature scale: 6 pixels, P = 9."""
    op = get_operator("dcnv3_layer")
    params = op.resolve({"N": 1, "H": 2, "W": 3, "group": 1, "group_channels": 4})
    gemm = 2 * 6 * (4 * 4 + 18 * 4 + 9 * 4 + 4 * 4) + 2 * 6 * 4 * 9
    elementwise = 6 * (4 + 4 + 18 + 9 + 4) + 13 * 6 * 4
    core = (14 + 5) * 6 * 9 + 9 * 6 * 9 * 4
    assert op.flops(params) == gemm + elementwise + core
    weights = 16 + 4 + 36 + 4 + 4 + 4 + 72 + 18 + 36 + 9 + 16 + 4
    assert op.bytes(params, 4) == 4 * (2 * 24 + weights)


def test_tolerances_cover_every_dtype_and_say_why():
    for op in ALL_OPS:
        operator = get_operator(op)
        for direction in ("forward", "backward"):
            for dtype in ("float64", "float32", "float16", "bfloat16"):
                tolerance = operator.tolerance(dtype, direction)
                assert len(tolerance.why) > 40 and tolerance.max_abs >= tolerance.rel_l2


# --- the layer -----------------------------------------------------------------------

def layer_case(center_feature_scale=False, dtype="float64", **overrides):
    params, tensors = inputs("dcnv3_layer", {"group": 2, "group_channels": 4, "H": 5, "W": 6,
                                             "center_feature_scale": center_feature_scale, **overrides}, dtype)
    weights = {k: v for k, v in tensors.items() if k != "input"}
    options = {k: params[k] for k in ("group", "group_channels", "kernel_h", "kernel_w", "dilation_h",
                                      "dilation_w", "offset_scale", "remove_center", "dw_kernel_size")}
    return tensors["input"], weights, options


@pytest.mark.parametrize("center_feature_scale", [False, True])
def test_layer_is_the_same_on_every_core(center_feature_scale):
    input, weights, options = layer_case(center_feature_scale, remove_center=True, offset_scale=2.0)
    expected = dcnv3_layer(input, weights, core=ref.dcnv3, **options)
    assert expected.shape == input.shape
    got = dcnv3_layer(input, weights, core=dcnv3_gridsample.dcnv3, **options)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_layer_softmax_is_the_contracts_softmax_then_core():
    """The layer's fused-softmax call equals softmax over P per group, then the core with the mask as given."""
    input, weights, options = layer_case()

    def unfused(input, offset, mask, *, softmax, group, **geometry):
        shape = mask.shape
        normalised = torch.softmax(mask.view(*shape[:3], group, -1), -1).reshape(shape)
        return ref.dcnv3(input, offset, normalised, group=group, softmax=False, **geometry)

    torch.testing.assert_close(dcnv3_layer(input, weights, core=unfused, **options),
                               dcnv3_layer(input, weights, **options), rtol=1e-13, atol=1e-13)


def test_center_feature_scale_blends_towards_the_projected_input():
    input, weights, options = layer_case(center_feature_scale=True)
    weights["center_feature_scale_weight"] = torch.zeros_like(weights["center_feature_scale_weight"])
    weights["center_feature_scale_bias"] = torch.full_like(weights["center_feature_scale_bias"], 50.0)
    # s = sigmoid(50) = 1 - 2e-22: out = output_proj(x_proj)
    x_proj = torch.nn.functional.linear(input, weights["input_proj_weight"], weights["input_proj_bias"])
    expected = torch.nn.functional.linear(x_proj, weights["output_proj_weight"], weights["output_proj_bias"])
    torch.testing.assert_close(dcnv3_layer(input, weights, **options), expected, rtol=1e-12, atol=1e-12)
    weights["center_feature_scale_bias"] = torch.full_like(weights["center_feature_scale_bias"], -50.0)
    without = {k: v for k, v in weights.items() if not k.startswith("center_feature_scale")}
    torch.testing.assert_close(dcnv3_layer(input, weights, **options), dcnv3_layer(input, without, **options),
                               rtol=1e-12, atol=1e-12)


def test_layer_module_runs_forward_and_backward():
    layer = DCNv3Layer(16, 2, dw_kernel_size=5, center_feature_scale=True, remove_center=True).double()
    input = torch.randn(2, 6, 7, 16, dtype=torch.float64, requires_grad=True)
    out = layer(input)
    assert out.shape == input.shape
    out.square().sum().backward()
    assert input.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.parameters())
    with pytest.raises(ValueError, match="group must divide channels"):
        DCNv3Layer(10, 3)


def test_layer_bad_weights_are_named():
    input, weights, options = layer_case()
    with pytest.raises(ValueError, match=r"offset_weight must have shape \(36, 8\), got \(36, 7\)"):
        dcnv3_layer(input, {**weights, "offset_weight": torch.zeros(36, 7, dtype=torch.float64)}, **options)
    with pytest.raises(ValueError, match="weights has no 'mask_bias'"):
        dcnv3_layer(input, {k: v for k, v in weights.items() if k != "mask_bias"}, **options)
    with pytest.raises(ValueError, match="dw_weight must be torch.float64"):
        dcnv3_layer(input, {**weights, "dw_weight": weights["dw_weight"].float()}, **options)


# --- implementations through the registry ---------------------------------------------

def run(op, impl, params, tensors, backward, seed=1):
    """Output and, with ``backward``, gradients of every input for one implementation."""
    leaves = {k: v.clone().requires_grad_(backward) for k, v in tensors.items()}
    out = get_implementation(op, impl).forward(leaves, params)
    if not backward:
        return {"output": out.detach()}
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_output)
    return {"output": out.detach(), **{f"grad_{k}": g for k, g in zip(leaves, grads, strict=True)}}


def check_against_reference(op, impl, overrides, dtype, mode):
    operator = get_operator(op)
    params, tensors = inputs(op, overrides, dtype, mode)
    backward = mode not in operator.forward_only_modes
    got = run(op, impl, params, tensors, backward)
    expected = run(op, "reference", params, {k: v.double() for k, v in tensors.items()}, backward)
    for direction, names in (("forward", ["output"]), ("backward", [n for n in got if n != "output"])):
        if names:
            errors = {n: measure(got[n], expected[n], DTYPES[dtype], n) for n in names}
            verdict = judge(errors, operator.tolerance(dtype, direction))
            assert verdict.passed, f"{op}/{impl} {dtype} {mode} {direction}: {verdict.reason}"


@pytest.mark.parametrize("op", CORE_OPS)
def test_gridsample_meets_the_float32_tolerance_in_every_mode(op):
    for softmax in ([False, True] if op == "dcnv3" else [None]):
        overrides = GEOMETRY if softmax is None else {**GEOMETRY, "softmax": softmax}
        for mode in get_operator(op).input_modes:
            check_against_reference(op, "pytorch_gridsample", overrides, "float32", mode)


def test_gridsample_layer_meets_the_float32_tolerance():
    check_against_reference("dcnv3_layer", "pytorch_gridsample",
                            {"center_feature_scale": True, "remove_center": True}, "float32", "random")


@pytest.mark.parametrize("op", ALL_OPS)
def test_reference_returns_the_case_dtype_and_gradients_reach_the_inputs(op):
    params, tensors = inputs(op, dtype="bfloat16")
    got = run(op, "reference", params, tensors, backward=True)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert all(g.abs().sum() > 0 for name, g in got.items() if name != "grad_offset_mask")


def test_torch_compile_compiles_per_case_without_dynamic_shapes(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda f, **kw: calls.append(kw) or f)
    params, tensors = inputs("dcnv3", GEOMETRY)
    prepare = get_implementation("dcnv3", "torch_compile").prepare
    first, second = prepare(tensors, params), prepare(tensors, params)
    assert calls == [{"dynamic": False}] * 2  # a compile of its own for each case
    assert torch.equal(first(), second())


def _eager_dynamo(monkeypatch):
    """Real dynamo tracing without inductor's code generation (seconds on a CPU)."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda f, **kw: real(f, backend="eager", **kw))


@pytest.mark.slow
def test_torch_compile_rows_count_graphs_and_recompiles(monkeypatch):
    _eager_dynamo(monkeypatch)
    params, tensors = inputs("dcnv3")  # the default geometry traces in one graph
    call = get_implementation("dcnv3", "torch_compile").prepare(tensors, params)
    call(), call()
    found = call.row_values()
    assert found["torch_compile_compiled"] is True and found["torch_compile_graphs"] >= 1, found
    assert (found["torch_compile_recompiles"], found["torch_compile_eager_frames"]) == (0, 0)


@pytest.mark.slow
def test_torch_compile_that_ran_partly_eagerly_is_never_reported_compiled(monkeypatch):
    _eager_dynamo(monkeypatch)

    def breaks():
        x = torch.ones(2) * 2
        print(end="")  # a graph break: what follows runs in another graph, eager between
        return x + 1

    call = dcnv3_operators.CompiledCall(breaks)
    call()
    found = call.row_values()
    assert found["torch_compile_graph_breaks"] >= 1 and found["torch_compile_compiled"] is False


KERNEL_CASES = [("dcnv3", {**GEOMETRY, "softmax": False}), ("dcnv3", {**GEOMETRY, "softmax": True}),
                ("dcnv4", GEOMETRY)]


@functools.cache
def _kernel_reason(op):
    return get_implementation(op, "cupy_direct").available("cpu")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
@pytest.mark.parametrize("op, overrides", KERNEL_CASES)
def test_cupy_kernels_through_the_registry(op, overrides, impl):
    """Our kernels (emulated on the CPU) in every mode in float32 and random in half;
    skipped, saying why, while kernels.ops.dcnv3 / dcnv4 or the emulator is missing."""
    reason = get_implementation(op, impl).available("cpu")
    if reason is not None:
        pytest.skip(reason)
    for mode in get_operator(op).input_modes:
        check_against_reference(op, impl, overrides, "float32", mode)
    for dtype in ("float16", "bfloat16"):
        check_against_reference(op, impl, overrides, dtype, "random")


@pytest.mark.parametrize("impl", KERNEL_IMPLEMENTATIONS)
def test_cupy_layer_through_the_registry(impl):
    reason = get_implementation("dcnv3_layer", impl).available("cpu")
    if reason is not None:
        pytest.skip(reason)
    for dtype in ("float32", "bfloat16"):
        check_against_reference("dcnv3_layer", impl, {"center_feature_scale": True, "H": 5, "W": 6},
                                dtype, "random")


def test_kernel_availability_names_a_missing_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "kernels.ops.dcnv4", None)  # import raises ImportError
    reason = get_implementation("dcnv4", "cupy_vectorized").available("cpu")
    assert reason is not None and "kernels.ops.dcnv4 is not importable" in reason
