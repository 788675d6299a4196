"""Our ``ms_deform_attn`` kernels (``kernels.ops.ms_deform_attn``) against the float64 reference.

On the CPU the very CUDA source the GPU runs goes through ``kernels.emulator``;
``test_*_cuda_branch`` runs it through ``kernels.launch``'s CUDA branch (the
CuPy stand-in). Every kernel output starts as NaN, so an element a kernel
forgets to write fails. The oracle is ``kernels.reference.ms_deform_attn`` in
float64 on the same rounded inputs, its gradients by autograd.
"""

from __future__ import annotations

import pytest
import torch
from kernel_checks import close_to_reference

from kernels import launch
from kernels.emulator import cupy_shim
from kernels.ops import ms_deform_attn as ops
from kernels.reference import ms_deform_attn as reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# A few units of the dtype's rounding: inputs rounded already, every sum in
# float32 (float64 in double), outputs and gradients rounded once.
REL_L2 = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 5e-3, torch.float64: 1e-13}
MAX_ABS = {dtype: 2 * bound for dtype, bound in REL_L2.items()}
assert_close = close_to_reference(REL_L2, MAX_ABS)
FLOATS = ("value", "sampling_locations", "attention_weights")

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

# name: (level shapes, N, Lq, M, D, P). D picks the kernel variant: 16-byte
# vectors (D·itemsize a multiple of 16), the scalar path (D = 5), more vectors
# than a warp's lanes (D = 288 in half precision: 36 vectors on 32 lanes).
CASES = {
    "detr_like_D8": ([(6, 7), (3, 4), (2, 2), (1, 1)], 2, 5, 2, 8, 4),
    "scalar_D5": ([(5, 4), (3, 2)], 1, 6, 3, 5, 3),
    "wide_D288": ([(4, 4), (2, 2)], 1, 3, 1, 288, 2),
    "one_level": ([(9, 11)], 2, 4, 2, 16, 8),
}


def make_inputs(shapes, N, Lq, M, D, P, dtype, seed=0, softmax=False):
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    S = sum(h * w for h, w in shapes)
    L = len(shapes)
    value = torch.randn(N, S, M, D, generator=generator)
    # Some locations outside [0, 1]; none within 2^-10 pixels of a kink.
    locations = torch.rand(N, Lq, M, L, P, 2, generator=generator) * 1.4 - 0.2
    weights = torch.randn(N, Lq, M, L, P, generator=generator) * (2 if softmax else 1)
    return {"value": value.to(dtype), "spatial_shapes": spatial_shapes,
            "level_start_index": reference.level_start_index_of(spatial_shapes),
            "sampling_locations": locations.to(dtype), "attention_weights": weights.to(dtype)}


def run_both(inputs, softmax, backward=True, differentiable=FLOATS):
    """(ours, reference): outputs and, with ``backward``, the gradients of the
    ``differentiable`` FLOATS (the others need none)."""
    wanted = {k: backward and k in differentiable for k in FLOATS}
    ours_in = {k: t.clone().requires_grad_(wanted[k]) if k in FLOATS else t for k, t in inputs.items()}
    ref_in = {k: t.double().requires_grad_(wanted[k]) if k in FLOATS else t for k, t in inputs.items()}
    ours = ops.ms_deform_attn(*ours_in.values(), softmax=softmax)
    ref = reference.ms_deform_attn(*ref_in.values(), softmax=softmax)
    results = [("output", ours, ref)]
    if backward:
        grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        ours.backward(grad.to(ours.dtype))
        ref.backward(grad.to(ours.dtype).double())
        results += [(f"grad_{k}", ours_in[k].grad, ref_in[k].grad) for k in differentiable]
    return results


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_the_reference(case, softmax, dtype):
    inputs = make_inputs(*CASES[case], dtype, softmax=softmax)
    for name, ours, ref in run_both(inputs, softmax):
        assert_close(name, ours.detach(), ref.detach(), dtype)


@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
@pytest.mark.parametrize("value_grad", [False, True], ids=["value_frozen", "value_trained"])
def test_location_and_weight_gradients_whether_value_needs_one_or_not(value_grad, softmax):
    """A frozen ``value`` (a detector's fixed features) turns the kernel's
    grad_value scatter off; the location and weight gradients must not change."""
    differentiable = FLOATS if value_grad else FLOATS[1:]
    inputs = make_inputs(*CASES["detr_like_D8"], torch.float32, softmax=softmax)
    results = run_both(inputs, softmax, differentiable=differentiable)
    assert [name for name, _, _ in results] == ["output", *(f"grad_{k}" for k in differentiable)]
    for name, ours, ref in results:
        assert_close(name, ours.detach(), ref.detach(), torch.float32)


def test_the_variant_follows_D_and_alignment_and_says_why():
    """16-byte vectors when D allows and the data is aligned; the scalar path with its reason."""
    inputs = make_inputs(*CASES["detr_like_D8"], torch.float16)
    with launch.recorded_launches() as log:
        ops.ms_deform_attn(*inputs.values())
    assert log[-1].kernel == "ms_deform_attn_forward<__half, false, 8>"
    assert log[-1].variant_reason == ""
    # value one element past an aligned start: 2 bytes past the 16-byte boundary.
    storage = torch.empty(inputs["value"].numel() + 1, dtype=torch.float16)
    shifted = storage[1:].view(inputs["value"].shape)
    shifted.copy_(inputs["value"])
    with launch.recorded_launches() as log:
        out = ops.ms_deform_attn(shifted, *list(inputs.values())[1:])
    assert log[-1].kernel == "ms_deform_attn_forward<__half, false, 1>"
    assert "2 bytes past" in log[-1].variant_reason
    ref = reference.ms_deform_attn(*(t.double() if t.is_floating_point() else t
                                     for t in inputs.values()))
    assert_close("output", out, ref, torch.float16)


def test_an_empty_level_no_queries_and_no_images():
    """A 0x0 level contributes nothing; Lq = 0 and N = 0 give empty outputs and gradients."""
    inputs = make_inputs([(5, 4), (0, 0), (2, 3)], 2, 4, 2, 8, 3, torch.float32)
    for name, ours, ref in run_both(inputs, softmax=True):
        assert_close(name, ours.detach(), ref.detach(), torch.float32)
    for N, Lq in ((2, 0), (0, 3)):
        inputs = make_inputs([(3, 3)], N, Lq, 2, 8, 2, torch.float32)
        out = ops.ms_deform_attn(*inputs.values())
        assert out.shape == (N, Lq, 16)


def test_harness_input_modes_on_the_kernels():
    """The operator's generators (pixel lines, outside [0, 1]) and the float64 kernels
    through the harness's check."""
    from harness import execution, registry
    from harness.cases import Case

    op = registry.get_operator("ms_deform_attn")
    impl = registry.get_implementation("ms_deform_attn", "cupy_vectorized")
    for mode, backward, dtype in (("pixel_lines", False, "float32"), ("outside", True, "float32"),
                                  ("random", True, "float64")):
        case = Case(op, op.resolve({"N": 1, "Lq": 6, "D": 8, "softmax": True}), dtype, mode)
        run = execution.prepare(case, "cpu", seed=0, backward=backward)
        for direction in ("forward", "backward") if backward else ("forward",):
            row, _ = execution.run(run, impl, direction, timing_config=None)
            assert row.status == "ok", (mode, direction, row.reason)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("softmax", [False, True], ids=["weights", "softmax"])
def test_gradcheck_on_the_emulated_kernels(softmax, deterministic):
    """torch.autograd.gradcheck (float64, the kernels' double instantiations) on every
    floating input, grad_value by float atomics and by the fixed-point sums."""
    inputs = make_inputs([(3, 4), (2, 2)], 1, 3, 2, 3, 2, torch.float64, seed=5, softmax=softmax)
    leaves = [t.requires_grad_() if k in FLOATS else t for k, t in inputs.items()]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        assert torch.autograd.gradcheck(
            lambda *tensors: ops.ms_deform_attn(*tensors, softmax=softmax), leaves,
            eps=1e-6, atol=1e-7, rtol=1e-5)
    finally:
        torch.use_deterministic_algorithms(previous)


def _gradients_with_queries_permuted(inputs, permutation, grad_output, softmax=True):
    """Every gradient of ours with the queries in ``permutation``'s order, put back in the
    original order: the same numbers, only the order of grad_value's adds changes."""
    permuted = {k: t[:, permutation] if k in ("sampling_locations", "attention_weights") else t
                for k, t in inputs.items()}
    leaves = {k: t.clone().requires_grad_() if k in FLOATS else t for k, t in permuted.items()}
    out = ops.ms_deform_attn(*leaves.values(), softmax=softmax)
    grads = torch.autograd.grad(out, [leaves[k] for k in FLOATS], grad_output[:, permutation])
    inverse = torch.argsort(permutation)
    return grads[0], grads[1][:, inverse], grads[2][:, inverse]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d).removeprefix("torch."))
def test_deterministic_backward_does_not_depend_on_the_order_of_the_adds(dtype):
    """Under torch.use_deterministic_algorithms(True) the queries in another order give
    the same bits (grad_value in fixed point, the others written once); float32 atomics,
    the control, do not. In both modes as accurate as the reference check wants."""
    # 64 queries with 4 points each on one 3x3 map: ~100 adds to every value element.
    inputs = make_inputs([(3, 3)], 1, 64, 1, 8, 4, dtype, seed=11)
    grad_output = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(12)).to(dtype)
    permutation = torch.randperm(64, generator=torch.Generator().manual_seed(13))
    identity = torch.arange(64)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic in (True, False):
            torch.use_deterministic_algorithms(deterministic)
            for name, ours, ref in run_both(inputs, softmax=True):
                assert_close(name, ours.detach(), ref.detach(), dtype)
            first = _gradients_with_queries_permuted(inputs, identity, grad_output)
            second = _gradients_with_queries_permuted(inputs, permutation, grad_output)
            assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
            if deterministic:
                assert torch.equal(first[0], second[0])
            elif dtype == torch.float32:  # bfloat16's rounding of the float32 sums hides the order
                assert not torch.equal(first[0], second[0])
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.usefixtures("deterministic_algorithms")
def test_deterministic_backward_takes_the_fixed_point_path():
    """One NaN in grad_output: float atomics carry it to the values its query samples;
    the fixed-point sums (no NaN in fixed point) make all of grad_value NaN."""
    inputs = make_inputs(*CASES["detr_like_D8"], torch.float32, seed=4)
    value = inputs["value"].requires_grad_()
    grad_output = torch.ones(2, 5, 16)
    grad_output[0, 0, 0] = float("nan")
    out = ops.ms_deform_attn(*inputs.values(), softmax=True)
    assert torch.autograd.grad(out, value, grad_output)[0].isnan().all()
    torch.use_deterministic_algorithms(False)
    out = ops.ms_deform_attn(*inputs.values(), softmax=True)
    assert not torch.autograd.grad(out, value, grad_output)[0].isnan().all()


@pytest.mark.usefixtures("deterministic_algorithms")
def test_deterministic_backward_takes_a_value_exactly_at_the_scales_bound():
    """One query, one point, on pixel (0, 0) exactly, every factor 1: the one value
    added is max_abs itself, and the scale (a power of two, max_abs · scale ·
    max_addends <= 2^62, kernels.determinism) puts it at 2^62 exactly: a sum that
    fits, not an overflow."""
    value = torch.randn(1, 4, 1, 4, generator=torch.Generator().manual_seed(5), requires_grad=True)
    spatial_shapes = torch.tensor([[2, 2]])
    locations = torch.full((1, 1, 1, 1, 1, 2), 0.25)  # x = y = 0.25 · 2 - 0.5 = 0
    weights = torch.ones(1, 1, 1, 1, 1)
    out = ops.ms_deform_attn(value, spatial_shapes, torch.tensor([0]), locations, weights)
    (grad_value,) = torch.autograd.grad(out, value, torch.ones_like(out))
    expected = torch.zeros(1, 4, 1, 4)
    expected[0, 0] = 1  # only pixel (0, 0), with bilinear weight 1
    assert torch.equal(grad_value, expected)


def test_bad_arguments_name_the_argument():
    inputs = make_inputs(*CASES["scalar_D5"], torch.float32)
    tensors = list(inputs.values())
    with pytest.raises(TypeError, match="value has dtype torch.complex64"):
        ops.ms_deform_attn(*(t.to(torch.complex64) if t.is_floating_point() else t
                             for t in tensors))
    transposed = tensors[3].transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match="sampling_locations must be contiguous"):
        ops.ms_deform_attn(*tensors[:3], transposed, tensors[4])
    with pytest.raises(ValueError, match="attention_weights must be"):
        ops.ms_deform_attn(*tensors[:4], tensors[4][:, :, :, :1])


def test_torch_library_registration_passes_opcheck():
    inputs = make_inputs([(3, 4), (2, 2)], 1, 3, 2, 4, 2, torch.float32)
    args = [t.requires_grad_() if k in FLOATS else t for k, t in inputs.items()]
    torch.library.opcheck(torch.ops.dcnbench.ms_deform_attn.default, (*args, True),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))


def test_forward_and_backward_through_the_cuda_branch():
    """kernels.launch's CUDA branch (the CuPy stand-in on an emulated H200): the launch
    configuration a GPU gets, the kernels run by the emulator, checked against the reference."""
    inputs = make_inputs(*CASES["detr_like_D8"], torch.bfloat16, softmax=True)
    with cupy_shim.emulated_gpu("H200") as gpu:
        results = run_both(inputs, softmax=True)
    assert {launch.kernel for launch in gpu.launches} == {
        "ms_deform_attn_forward<__nv_bfloat16, true, 8>",
        "ms_deform_attn_backward<__nv_bfloat16, true, 8>"}
    for name, ours, ref in results:
        assert_close(name, ours.detach(), ref.detach(), torch.bfloat16)


def _layer_inputs(module, levels, N=2, Lq=5, boxes=False, seed=3):
    generator = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    reference_points = torch.rand(N, Lq, len(levels), 4 if boxes else 2, generator=generator)
    return (torch.randn(N, Lq, module.d_model, generator=generator), reference_points,
            torch.randn(N, S, module.d_model, generator=generator), shapes,
            reference.level_start_index_of(shapes),
            torch.rand(N, S, generator=generator) < 0.1)


@pytest.mark.parametrize("boxes", [False, True], ids=["points", "boxes"])
def test_the_layer_on_our_kernels_matches_it_on_the_reference(boxes):
    """MSDeformAttn (Deformable DETR's module) with our fused-softmax kernel as its core equals
    the same module on the float64 reference, outputs and every parameter's gradient."""
    from kernels.ops.ms_deform_attn_layer import MSDeformAttn

    torch.manual_seed(0)
    ours = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    with torch.no_grad():  # away from the init's zero weights, so every path carries signal
        for parameter in ours.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    oracle = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2,
                          core=reference.ms_deform_attn).double()
    oracle.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    inputs = _layer_inputs(ours, [(6, 7), (3, 4), (2, 2)], boxes=boxes)
    out = ours(*inputs)
    expected = oracle(*(t.double() if t.is_floating_point() else t for t in inputs))
    assert_close("output", out.detach(), expected.detach(), torch.float32)
    out.square().sum().backward()
    expected.square().sum().backward()
    oracle_grads = dict(oracle.named_parameters())
    for name, parameter in ours.named_parameters():
        # Kinks of B0 under float32 locations: a loose bound on the upstream gradients.
        relative = (parameter.grad.double() - oracle_grads[name].grad).norm() / oracle_grads[name].grad.norm()
        assert relative < 1e-3, (name, relative.item())


def test_the_layer_checks_its_arguments():
    from kernels.ops.ms_deform_attn_layer import MSDeformAttn

    with pytest.raises(ValueError, match="d_model must be a multiple of n_heads=8, got 20"):
        MSDeformAttn(d_model=20)
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    query, points, flat, shapes, starts, _ = _layer_inputs(module, [(3, 3), (2, 2)])
    with pytest.raises(ValueError, match="reference_points must be"):
        module(query, points[:, :, :1], flat, shapes, starts)


def test_the_layer_hands_the_core_deformable_detrs_locations_and_logits():
    """At Deformable DETR's initialisation the offsets are the bias alone: head m's point k
    sits k steps (in pixels of level l) from the reference point in the head's direction;
    the core gets them normalised by (W_l, H_l), with all-zero logits and softmax on."""
    from kernels.ops.ms_deform_attn_layer import MSDeformAttn

    seen = {}

    def recording_core(value, shapes, starts, locations, weights, softmax):
        seen.update(locations=locations, weights=weights, softmax=softmax, value=value)
        return value.new_zeros(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])

    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2, core=recording_core)
    query, points, flat, shapes, starts, _ = _layer_inputs(module, [(6, 8), (3, 4)])
    module(query, points, flat, shapes, starts)
    directions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # 4 heads
    for level, (h, w) in enumerate([(6, 8), (3, 4)]):
        for k in range(2):
            expected = points[:, :, None, level] + directions * (k + 1) / torch.tensor([w, h])
            torch.testing.assert_close(seen["locations"][:, :, :, level, k], expected,
                                       atol=1e-6, rtol=0)
    assert seen["softmax"] is True and torch.all(seen["weights"] == 0)
    assert seen["value"].shape == (2, 6 * 8 + 3 * 4, 4, 4)
