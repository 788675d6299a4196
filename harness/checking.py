"""Comparing an implementation's tensors with the float64 reference's.

Two numbers per tensor, both computed in float64 against the reference run on
the very same rounded inputs:

- ``rel_l2`` = ||out - ref|| / ||ref||
- ``max_abs`` = max |out - ref| / max |ref|

Both are relative, so one tolerance serves every shape and scale. Where the
reference is exactly zero everywhere (a zero mask, say) the denominator is 1:
the error is then absolute, and a correct implementation, which also returns
exact zeros, still scores 0. Any NaN or Inf in the output fails, whatever
the numbers say, and a tensor of the wrong shape or dtype is an error, not a
failure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from harness.registry import Tolerance


class MismatchError(ValueError):
    """An output or gradient of the wrong shape or dtype."""


@dataclasses.dataclass(frozen=True)
class TensorError:
    """How far one tensor is from the reference's."""

    rel_l2: float  # NaN when the tensor holds a NaN or Inf
    max_abs: float  # normalised by max |ref|, as ``Tolerance.max_abs``
    abs_err: float  # max |out - ref| itself
    nonfinite: int  # NaN and Inf elements in the tensor

    def within(self, tol: Tolerance) -> bool:
        # Written as "<=" so that a NaN error is never within.
        return self.nonfinite == 0 and self.rel_l2 <= tol.rel_l2 and self.max_abs <= tol.max_abs


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The judgement of all tensors of one direction (the output, or every gradient)."""

    passed: bool
    reason: str  # what failed, "" when it passed
    errors: Mapping[str, TensorError]
    worst: str  # the tensor furthest outside (or least inside) its bounds

    @property
    def rel_l2(self) -> float:
        return self.errors[self.worst].rel_l2

    @property
    def max_abs(self) -> float:
        return self.errors[self.worst].max_abs

    @property
    def nonfinite(self) -> int:
        return sum(e.nonfinite for e in self.errors.values())


def measure(out: torch.Tensor, ref: torch.Tensor, expected_dtype: torch.dtype,
            name: str) -> TensorError:
    """Errors of ``out`` against the float64 ``ref``.

    Raises ``MismatchError`` when ``out`` has another shape than ``ref`` or a
    dtype other than ``expected_dtype``.
    """
    if out.shape != ref.shape:
        raise MismatchError(f"{name} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    if out.dtype != expected_dtype:
        raise MismatchError(f"{name} has dtype {out.dtype}, expected {expected_dtype}")
    out = out.detach().to(device=ref.device, dtype=torch.float64)
    nonfinite = int((~torch.isfinite(out)).sum())
    diff = (out - ref).abs()
    ref_norm = float(torch.linalg.vector_norm(ref)) or 1.0
    ref_max = float(ref.abs().max()) if ref.numel() else 0.0
    abs_err = float(diff.max()) if diff.numel() else 0.0
    return TensorError(
        rel_l2=float(torch.linalg.vector_norm(diff)) / ref_norm,
        max_abs=abs_err / (ref_max or 1.0),
        abs_err=abs_err,
        nonfinite=nonfinite,
    )


def judge(errors: Mapping[str, TensorError], tol: Tolerance) -> Verdict:
    """Pass when every tensor is finite and within ``tol``; say which one failed and how."""
    def badness(e: TensorError) -> float:
        if e.nonfinite or math.isnan(e.rel_l2) or math.isnan(e.max_abs):
            return math.inf
        return max(e.rel_l2 / tol.rel_l2, e.max_abs / tol.max_abs)

    worst = max(errors, key=lambda name: badness(errors[name]))
    failures = []
    for name, e in errors.items():
        if e.nonfinite:
            failures.append(f"{name}: {e.nonfinite} non-finite values")
        elif not e.within(tol):
            failures.append(
                f"{name}: rel_l2 {e.rel_l2:.3g} (tol {tol.rel_l2:.3g}), "
                f"max_abs {e.max_abs:.3g} (tol {tol.max_abs:.3g})"
            )
    return Verdict(passed=not failures, reason="; ".join(failures), errors=dict(errors),
                   worst=worst)
