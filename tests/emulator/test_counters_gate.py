"""Counters of our own kernels and the CI gate: a planted uncoalesced variant of
deform_conv2d's im2col computes the same result and only the counters see it."""

from __future__ import annotations

import copy

import pytest
import torch

from harness import counters, registry
from harness.cases import make_case
from kernels import launch
from kernels.cuda_sources import CudaSource

# Pixel fastest (coalesced columns) -> tap fastest: consecutive threads write
# columns `pixels` apart. Every (tap, pixel) item is still computed once.
COALESCED = """    w.pixel = item % pixels;
    int rest = item / pixels;
    w.tap = rest % taps;
    rest /= taps;"""
UNCOALESCED = """    w.tap = item % taps;
    int rest = item / taps;
    w.pixel = rest % pixels;
    rest /= pixels;"""


@pytest.fixture
def case():
    registry.load_all()
    op = registry.get_operator("deform_conv2d")
    return make_case(op, {"N": 1, "C_in": 16, "C_out": 8, "H": 12, "W": 12}, "float32", "random")


def document(results):
    return {"gpu": "h200", "kernels": {k.key: k.as_json() for r in results for k in r.kernels}}


def count(case, direction="forward"):
    impl = registry.get_implementation(case.op.name, "cupy")
    launches = counters.measure(case, impl, direction, seed=0)
    return counters.summarize(case, impl.name, direction, launches, "h200")


def plant_uncoalesced_im2col(monkeypatch) -> None:
    """From now on deform_conv2d.cu builds with the decomposition's pixel and tap swapped."""
    original = CudaSource.code

    def code(self):
        text = original(self)
        if self.filename != "deform_conv2d.cu":
            return text
        assert COALESCED in text, "the decomposition this test plants a bug in has changed"
        return text.replace(COALESCED, UNCOALESCED)

    monkeypatch.setattr(CudaSource, "code", code)
    monkeypatch.setattr(launch, "_modules", {})  # rebuild from the planted source


def test_counters_are_deterministic_and_the_gate_passes_them(case):
    first, second = document([count(case)]), document([count(case)])
    assert first == second
    assert counters.gate(first, second) == []


def test_the_planted_uncoalesced_im2col_is_caught_by_the_gate(case, monkeypatch):
    impl = registry.get_implementation("deform_conv2d", "cupy")
    generator = torch.Generator().manual_seed(0)
    inputs = case.op.make_inputs(case.params, torch.float32, "cpu", generator, case.mode)
    with torch.no_grad():
        expected = impl.forward(inputs, case.params)
    baseline = document([count(case)])
    plant_uncoalesced_im2col(monkeypatch)
    planted = document([count(case)])
    with torch.no_grad():  # the same result: only the counters can tell
        torch.testing.assert_close(impl.forward(inputs, case.params), expected)
    key = next(k for k in baseline["kernels"] if "deform_im2col" in k)
    before, after = baseline["kernels"][key], planted["kernels"][key]
    assert after["sectors_by_kind"]["store"] > 2 * before["sectors_by_kind"]["store"]
    problems = counters.gate(baseline, planted)
    assert any(p.startswith(key + ": sectors") for p in problems)
    assert any(p.startswith(key + ": floor_s") for p in problems)


def test_the_gate_allows_two_percent_and_names_what_moved():
    baseline = {"gpu": "h200", "kernels": {
        "c i forward k": {"sectors": 1000, "atomic_sectors": 0, "floor_s": 1e-6},
        "c i backward k": {"sectors": 1000, "atomic_sectors": 500, "floor_s": 2e-6}}}
    within = copy.deepcopy(baseline)
    within["kernels"]["c i forward k"]["sectors"] = 1020
    within["kernels"]["c i backward k"]["floor_s"] = 1.5e-6  # shrinking never fails
    assert counters.gate(baseline, within) == []
    beyond = copy.deepcopy(baseline)
    beyond["kernels"]["c i backward k"]["atomic_sectors"] = 520
    beyond["kernels"]["c i forward k"]["atomic_sectors"] = 1
    del beyond["kernels"]["c i forward k"]
    beyond["kernels"]["c i forward k2"] = baseline["kernels"]["c i forward k"]
    assert counters.gate(baseline, beyond) == [
        "c i forward k: in the baseline, not in this run",
        "c i forward k2: not in the baseline",
        "c i backward k: atomic_sectors 500 -> 520 (+4.0%)",
    ]
    assert counters.gate(baseline, {**baseline, "gpu": "a100"}) == [
        "the baseline models h200, this run a100"]


def test_the_command_prints_each_kernel_of_the_backward(capsys):
    from harness import cli

    status = cli.main(["counters", "deform_conv2d", "--impl", "cupy", "--param", "N=1",
                       "C_in=8", "C_out=8", "H=6", "W=6", "--backward", "--gpu", "a100"])
    out = capsys.readouterr().out
    assert status == 0
    assert "deform_col2im<float, false>" in out and "deform_im2col<float, false>" in out
    assert "A100" in out and "model" in out
    buffers = out[out.index("per buffer"):]
    assert "grad_input" in buffers and "columns" in buffers


@pytest.mark.parametrize(("argv", "message"), [
    (["counters", "deform_conv2d", "--impl", "torchvision"],
     "--impl: expected one of deform_conv2d's kernel implementations (cupy, cupy_implicit_gemm), got 'torchvision'"),
    (["counters", "deform_conv2d"], "counters: expected OP --impl IMPL, or --suite NAME"),
    (["counters", "deform_conv2d", "--impl", "cupy", "--check", "b.json"],
     "--check / --update: need --suite"),
])
def test_the_command_refuses_bad_arguments(capsys, argv, message):
    from harness import cli

    assert cli.main(argv) == cli.EXIT_USAGE
    assert message in " ".join(capsys.readouterr().out.split())


def test_a_counted_run_keeps_the_counters_of_kernel_rows_only():
    from harness import execution

    registry.load_all()
    op = registry.get_operator("roi_align")
    case = make_case(op, {"N": 1, "C": 4, "K": 4}, "float32", "random")
    case_run = execution.prepare(case, "cpu", seed=0, backward=True)
    kernel = registry.get_implementation("roi_align", "cupy")
    forward, _ = execution.run(case_run, kernel, "forward", None, counters=True)
    backward, _ = execution.run(case_run, kernel, "backward", None, counters=True)
    peer, _ = execution.run(case_run, registry.get_implementation("roi_align", "torchvision"),
                            "forward", None, counters=True)
    plain, _ = execution.run(case_run, kernel, "forward", None)
    assert forward.status == backward.status == "ok"
    assert forward.counters["launches"] == 1 and forward.counters["load_requests"] > 0
    assert forward.counters["atomic_sectors"] == 0 < backward.counters["atomic_sectors"]
    assert backward.counters["launches"] == 1  # the gradient's kernel, not the forward's
    assert forward.counters["modelled_floor_h200_s"] > 0
    assert peer.counters is None and plain.counters is None


def test_occupancy_comes_from_the_build_check_of_the_kernels_source():
    found = counters.occupancy(["deform_im2col<float, false>", "no_such_kernel"])
    assert list(found) == ["deform_im2col<float, false>"]
    assert found["deform_im2col<float, false>"].endswith(" regs)")
