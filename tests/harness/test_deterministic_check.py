"""The harness's ``deterministic`` check (``harness/determinism.py``) on the toy operator:
a plain backward is reproducible, one whose gradient changes run to run is not."""

from __future__ import annotations

import itertools

import torch
from harness_toy import TOY, toy_math

from harness import determinism, execution, registry
from harness.cases import make_case
from harness.registry import implementation


class _CountingScale(torch.autograd.Function):
    """Identity forward; the backward adds 2^-20 times the call count: the stand-in
    for float atomics whose order changes between runs."""

    calls = itertools.count()

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad + next(_CountingScale.calls) * 2.0**-20


def _register_nondeterministic():
    @implementation(TOY, "racy", kind="peer")
    def racy(inputs, params):
        """Planted nondeterminism in the backward."""
        return lambda: toy_math({**inputs, "input": _CountingScale.apply(inputs["input"])},
                                params)


def _backward_row(impl: str):
    case = make_case(registry.get_operator(TOY), {}, "float32", "random")
    case_run = execution.prepare(case, "cpu", seed=0, backward=True)
    row, _ = execution.run(case_run, registry.get_implementation(TOY, impl), "backward",
                           timing_config=None)
    return row


def test_rows_record_whether_the_backward_is_bit_reproducible(toy):
    _register_nondeterministic()
    good = _backward_row("good")
    assert good.deterministic is True, (good.status, good.reason)
    racy = _backward_row("racy")
    assert racy.deterministic is False
    assert racy.status == "ok"  # accurate enough: determinism is recorded, not judged


def test_forward_rows_are_not_checked(toy):
    case = make_case(registry.get_operator(TOY), {}, "float32", "random")
    case_run = execution.prepare(case, "cpu", seed=0, backward=False)
    row, _ = execution.run(case_run, registry.get_implementation(TOY, "good"), "forward",
                           timing_config=None)
    assert row.deterministic is None


def test_the_check_restores_the_mode_and_compares_bits():
    torch.use_deterministic_algorithms(False)
    with determinism.deterministic_algorithms():
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()
    nan = torch.tensor([float("nan"), 1.0])
    assert determinism.same_bits(nan, nan.clone())
    assert not determinism.same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert not determinism.same_bits(torch.ones(2), torch.ones(2, dtype=torch.float64))
