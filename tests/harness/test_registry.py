import dataclasses

import pytest
import torch
from harness_toy import TOY

from harness import registry


def test_resolve_fills_defaults_in_declared_order_and_coerces(toy):
    op = registry.get_operator(TOY)
    params = op.resolve({"bias": "false", "C": "7", "scale": 2})
    assert list(params) == list(op.params)
    assert params["C"] == 7 and params["bias"] is False and params["scale"] == 2.0
    assert isinstance(params["scale"], float)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"channels": 3}, "has no parameter 'channels'; expected one of: N, C, H"),
        ({"C": "three"}, "parameter 'C' of operator 'toy_scale' expects int, got 'three'"),
        ({"C": 2.5}, "expects int, got 2.5"),
        ({"bias": "maybe"}, "expects bool"),
        ({"C": 0}, "parameter 'C' must be >= 1"),  # the operator's own validate
    ],
)
def test_resolve_rejects_bad_parameters_naming_them(toy, overrides, message):
    with pytest.raises(ValueError, match=message):
        registry.get_operator(TOY).resolve(overrides)


def test_unknown_names_list_what_exists(toy):
    with pytest.raises(registry.RegistryError, match="unknown operator 'nope'; expected one of: toy"):
        registry.get_operator("nope")
    with pytest.raises(registry.RegistryError, match="has no implementation 'nope'.*reference"):
        registry.get_implementation(TOY, "nope")


def test_duplicate_registrations_are_refused(toy):
    with pytest.raises(registry.RegistryError, match="registered twice"):
        registry.register_operator(registry.get_operator(TOY))
    with pytest.raises(registry.RegistryError, match="toy_scale/good is registered twice"):
        registry.implementation(TOY, "good", kind="peer")(lambda inputs, params: None)
    with pytest.raises(registry.RegistryError, match="kind must be one of"):
        registry.implementation(TOY, "other", kind="fast")
    with pytest.raises(registry.RegistryError, match="only peers may declare known_inaccurate"):
        registry.implementation(TOY, "excused", kind="kernel", known_inaccurate={"float16": "x"})


def test_implementation_records_its_declaration(toy):
    impl = registry.get_implementation(TOY, "emulated")
    assert (impl.kind, impl.devices, impl.emulated_on) == ("kernel", ("cuda",), ("cpu",))
    assert impl.description == "The toy math (emulated)."
    assert registry.reference_of(TOY).name == "reference"
    names = [i.name for i in registry.implementations_of(TOY)]
    assert names[:3] == ["reference", "baseline", "good"]


def test_unavailable_reasons(toy):
    def reason(name, device, dtype="float32"):
        return registry.get_implementation(TOY, name).unavailable_reason(device, dtype)

    assert reason("good", "cpu") is None
    assert reason("emulated", "cpu") is None  # emulated_on counts as a device it runs on
    assert reason("emulated", "cpu", "float64") == (
        "toy_scale/emulated does not take float64 (takes float32, float16, bfloat16)")
    assert reason("missing", "cpu") == "needs the frobnicator"
    if not torch.cuda.is_available():
        assert reason("good", "cuda") == "no CUDA device here"
    only_cuda = registry.Implementation(TOY, "x", "peer", ("cuda",), ("float32",), prepare=None)
    assert only_cuda.unavailable_on("cpu") == "toy_scale/x does not run on cpu (runs on cuda)"
    assert registry.get_implementation(TOY, "emulated").is_emulated("cpu")
    assert not registry.get_implementation(TOY, "good").is_emulated("cpu")


def test_tolerance_lookup_falls_back_to_forward_bounds(toy):
    op = registry.get_operator(TOY)
    assert op.tolerance("float16", "backward") is op.tolerances["float16"]
    loose = {"float16": registry.Tolerance(1e-2, 1e-2, "longer sums")}
    with_backward = dataclasses.replace(op, backward_tolerances=loose)
    assert with_backward.tolerance("float16", "backward").rel_l2 == 1e-2
    assert with_backward.tolerance("float16", "forward").rel_l2 == 2e-3
    with pytest.raises(registry.RegistryError, match="no backward tolerance for float32"):
        with_backward.tolerance("float32", "backward")


def test_toy_registry_does_not_leak(toy):
    # The fixture swapped the registry's tables; the real ones never saw the toy.
    assert set(registry.OPERATORS) == {TOY}


def test_real_registry_has_no_toy():
    registry.load_all()
    assert TOY not in registry.OPERATORS


def test_case_tolerances_judge_the_cases_they_name(toy):
    op = registry.get_operator(TOY)
    loose = registry.Tolerance(1e-3, 2e-3, "no bias: another path")
    grads = registry.Tolerance(1e-2, 2e-2, "its gradients")
    special = dataclasses.replace(op, case_tolerances=(
        registry.CaseTolerance({"bias": False}, "float32", loose),
        registry.CaseTolerance({"bias": False}, "float16", loose, backward=grads)))
    named, other = special.resolve({"bias": False}), special.resolve({})
    assert special.tolerance("float32", "forward", named) is loose
    assert special.tolerance("float32", "backward", named) is loose  # forward's, as the table
    assert special.tolerance("float16", "backward", named) is grads
    assert special.tolerance("float32", "forward", other) is op.tolerances["float32"]
    assert special.tolerance("bfloat16", "forward", named) is op.tolerances["bfloat16"]
    assert special.tolerance("float32", "forward") is op.tolerances["float32"]  # no params


def test_only_implementations_honouring_a_cases_requirement_run_it(toy):
    op = dataclasses.replace(registry.get_operator(TOY),
                             requirement=lambda p: "scale=2 (a doubling path)"
                             if p["scale"] == 2 else None)
    asked, ordinary = op.resolve({"scale": 2}), op.resolve({})
    silent = registry.get_implementation(TOY, "good")
    picky = dataclasses.replace(silent, declines=lambda params, device, direction:
                                "not backward" if direction == "backward" else None)
    assert silent.declined(op, ordinary, "cpu", "forward") is None
    assert silent.declined(op, asked, "cpu", "forward") == (
        "toy_scale/good does not say it honours scale=2 (a doubling path)")
    assert picky.declined(op, asked, "cpu", "forward") is None
    assert picky.declined(op, asked, "cpu", "backward") == (
        "toy_scale/good does not honour scale=2 (a doubling path): not backward")
