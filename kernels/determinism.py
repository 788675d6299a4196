"""Deterministic backward passes: the host side of ``kernels/cuda/deterministic_atomics.cuh``.

The contract (``docs/ops-semantics.md``, "Determinism"): when
``torch.are_deterministic_algorithms_enabled()`` is true, a backward either
gives the same bits on every run or raises PyTorch's own error. Our backwards
scatter grad_input with float atomics, whose sum depends on the order the
threads run in; in deterministic mode they scatter into fixed-point int64 sums
instead (integer addition is associative), with the same number of atomics.

Usage in an op's backward (the kernel takes ``float* grad_input, long long*
grad_input_fixed, double fixed_scale, int* fixed_status`` and builds a
``ScatterAdd`` from them, see the header)::

    from kernels import determinism

    if determinism.enabled():
        sums = determinism.FixedPointSum(
            grad_input.shape, device,
            max_abs=determinism.max_abs(grad_columns) * determinism.max_abs(mask),
            max_addends=taps * pixels,   # values one grad_input element can receive
        )
        kernel(..., (..., launch.null(torch.float32, device), *sums.kernel_args(), ...))
        grad_input.copy_(sums.result(torch.float32))
    else:
        kernel(..., (..., float_accumulator, *determinism.FixedPointSum.unused(device), ...))

An implementation with no deterministic path calls
:func:`alert_not_deterministic` instead: PyTorch's error (or its warning under
``warn_only=True``).

Scale and range: ``scale`` is the largest power of two with
``max_abs · scale · max_addends ≤ 2^62``, so no partial sum of any order leaves
int64; an element's rounding error is at most ``max_addends · 0.5 / scale``
(≤ 2^-63 · max_abs · max_addends², below one float32 rounding of ``max_abs``
for up to 2^19 addends). ``max_abs`` must bound every value added and
``max_addends`` the count one element receives; a wrong bound is detected on
the device and raised here, never a silently wrapped sum.

Non-finite values: a NaN or an infinity has no fixed-point value. Then the
whole result is NaN (deterministically), so that a loss scaler still sees a
non-finite gradient and skips the step, as it would with float atomics.

Cost against the float-atomic path: the same atomics, one per add, but 64-bit
integer ones into an 8-byte-per-element buffer (float: 4 bytes, and for
float32 the output itself); plus the ``max_abs`` reductions, one
device-to-host read of the status (a synchronisation) and one conversion pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch._prims_common import alert_not_deterministic as _torch_alert

from kernels import launch

__all__ = ["FixedPointSum", "alert_not_deterministic", "enabled", "fixed_point_scale", "max_abs"]

# The sums' magnitude bound: 2^62 leaves a factor 2 of int64 for the roundings.
RANGE_BITS = 62
# Bits of the status word (FIXED_POINT_* in the header).
NONFINITE = 1
OVERFLOW = 2


def enabled() -> bool:
    """Whether backwards must be bit-reproducible (``torch.use_deterministic_algorithms``)."""
    return torch.are_deterministic_algorithms_enabled()


def alert_not_deterministic(caller: str) -> None:
    """PyTorch's own error for a non-deterministic op in deterministic mode
    (a warning under ``warn_only=True``; nothing when the mode is off)."""
    _torch_alert(caller)


def max_abs(tensor: torch.Tensor | None) -> float:
    """max |tensor| as a Python float (1 for None: a factor that is absent; 0 when empty)."""
    if tensor is None:
        return 1.0
    if tensor.numel() == 0:
        return 0.0
    return torch.linalg.vector_norm(tensor.detach(), ord=math.inf, dtype=torch.float64).item()


def fixed_point_scale(max_abs: float, max_addends: int) -> float:
    """The largest power of two ``s`` with ``max_abs · s · max_addends ≤ 2^62``.

    Where ``max_abs`` is 0 or not finite any scale will do (nothing is added, or
    the kernel flags the non-finite value): 1.
    """
    if max_addends < 1:
        raise ValueError(f"max_addends must be >= 1, got {max_addends}")
    bound = max_abs * max_addends
    if bound == 0 or not math.isfinite(bound):
        return 1.0
    # bound = m · 2^e with m in [0.5, 1): s = 2^(62 - e) gives bound · s in
    # [2^61, 2^62), one more doubling where m = 0.5 exactly (bound · s = 2^62).
    mantissa, exponent = math.frexp(bound)
    return math.ldexp(1.0, RANGE_BITS - exponent + (mantissa == 0.5))


class FixedPointSum:
    """A zeroed int64 fixed-point accumulator of ``shape``, its scale and status word."""

    def __init__(
        self, shape: Sequence[int], device: torch.device | str, max_abs: float, max_addends: int
    ) -> None:
        self.sums = torch.zeros(tuple(shape), dtype=torch.int64, device=device)
        self.status = torch.zeros(1, dtype=torch.int32, device=device)
        self.scale = fixed_point_scale(max_abs, max_addends)

    def kernel_args(self) -> tuple[torch.Tensor, np.float64, torch.Tensor]:
        """``grad_input_fixed, fixed_scale, fixed_status`` of the kernel."""
        return self.sums, np.float64(self.scale), self.status

    @staticmethod
    def unused(device: torch.device | str) -> tuple[torch.Tensor, np.float64, torch.Tensor]:
        """The same three arguments for the float-atomic path: null pointers."""
        return launch.null(torch.int64, device), np.float64(0.0), launch.null(torch.int32, device)

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """sums / scale in ``dtype``; NaN everywhere if a value was not finite.

        Raises RuntimeError if a sum overflowed (the caller's bound was wrong).
        """
        status = int(self.status.item())
        if status & OVERFLOW:
            raise RuntimeError(
                "deterministic fixed-point accumulation overflowed int64: a value exceeded the "
                f"bound its scale {self.scale!r} was chosen for (max_abs · max_addends · scale "
                f"must stay <= 2^{RANGE_BITS}); this is a bug in the caller's bound"
            )
        if status & NONFINITE:
            return torch.full(self.sums.shape, math.nan, dtype=dtype, device=self.sums.device)
        # Exact division (a power of two); int64 -> float64 rounds above 2^53 only.
        return (self.sums.to(torch.float64) / self.scale).to(dtype)
