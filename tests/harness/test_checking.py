import math

import pytest
import torch

from harness import checking
from harness.registry import Tolerance

TOL = Tolerance(rel_l2=1e-3, max_abs=1e-3, why="test")


def reference(n: int = 1000) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_errors_are_relative_l2_and_max_abs_over_max_ref():
    ref = torch.tensor([3.0, -4.0], dtype=torch.float64)  # ||ref|| = 5, max |ref| = 4
    out = torch.tensor([3.0, -3.5], dtype=torch.float32)
    error = checking.measure(out, ref, torch.float32, "output")
    assert error.rel_l2 == pytest.approx(0.5 / 5)
    assert error.max_abs == pytest.approx(0.5 / 4)
    assert error.abs_err == pytest.approx(0.5)
    assert error.nonfinite == 0


def test_rounded_reference_passes_and_planted_error_fails():
    ref = reference()
    ok = checking.judge({"output": checking.measure(ref.float(), ref, torch.float32, "output")}, TOL)
    assert ok.passed and ok.reason == ""
    wrong = ref.float() * 1.01
    verdict = checking.judge({"output": checking.measure(wrong, ref, torch.float32, "output")}, TOL)
    assert not verdict.passed
    assert verdict.reason.startswith("output: rel_l2 0.01 (tol 0.001), max_abs 0.01")


def test_a_single_nan_or_inf_fails_whatever_the_tolerance():
    ref = reference()
    generous = Tolerance(rel_l2=math.inf, max_abs=math.inf, why="anything goes")
    for bad in (float("nan"), float("inf")):
        out = ref.float().clone()
        out[17] = bad
        error = checking.measure(out, ref, torch.float32, "output")
        assert error.nonfinite == 1
        verdict = checking.judge({"output": error}, generous)
        assert not verdict.passed
        assert verdict.reason == "output: 1 non-finite values"
        assert verdict.nonfinite == 1


def test_zero_reference_is_judged_by_absolute_error():
    ref = torch.zeros(10, dtype=torch.float64)
    exact = checking.measure(torch.zeros(10), ref, torch.float32, "grad_offset")
    assert (exact.rel_l2, exact.max_abs) == (0.0, 0.0)
    off = torch.zeros(10)
    off[3] = 0.5
    error = checking.measure(off, ref, torch.float32, "grad_offset")
    assert (error.rel_l2, error.max_abs) == (0.5, 0.5)
    assert not checking.judge({"grad_offset": error}, TOL).passed


def test_shape_and_dtype_mismatches_are_errors_not_failures():
    ref = reference(12)
    with pytest.raises(checking.MismatchError, match=r"output has shape \(3, 4\), expected \(12,\)"):
        checking.measure(ref.float().reshape(3, 4), ref, torch.float32, "output")
    with pytest.raises(checking.MismatchError, match="grad_input has dtype torch.float64, "
                                                     "expected torch.float16"):
        checking.measure(ref, ref, torch.float16, "grad_input")


def test_verdict_reports_the_worst_tensor_and_every_failure():
    ref = reference()
    errors = {
        "grad_input": checking.measure(ref.float(), ref, torch.float32, "grad_input"),
        "grad_offset": checking.measure(ref.float() * 1.1, ref, torch.float32, "grad_offset"),
        "grad_weight": checking.measure(ref.float() * 1.002, ref, torch.float32, "grad_weight"),
    }
    verdict = checking.judge(errors, TOL)
    assert not verdict.passed
    assert verdict.worst == "grad_offset"
    assert verdict.rel_l2 == pytest.approx(0.1, rel=1e-5)
    assert verdict.reason.startswith("grad_offset: rel_l2 0.1 ")
    assert "; grad_weight: rel_l2 0.002 " in verdict.reason
    assert "grad_input" not in verdict.reason
