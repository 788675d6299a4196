"""Input helpers every operator family shares: seeded draws, rounding to the case's
dtype, input-mode checks, the references' float64 wrapper, each dtype's unit roundoff."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

# Unit roundoff u of each dtype: half the distance from 1 to the next number.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def draw(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal float64 numbers on the CPU from ``generator``."""
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def draw_uniform(generator: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    """Uniform float64 numbers in [low, high) on the CPU from ``generator``."""
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def to_case(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    """Round every tensor to ``dtype``, then move it to ``device``."""
    return {name: tensor.to(dtype).to(device) for name, tensor in tensors.items()}


def check_mode(op: str, mode: str, modes: tuple[str, ...]) -> None:
    """Raise ValueError unless ``mode`` is one of the operator's input ``modes``."""
    if mode not in modes:
        raise ValueError(f"operator {op!r} has no input mode {mode!r}; expected one of: {', '.join(modes)}")


def in_float64(prepare: Callable[..., Callable[[], torch.Tensor]]
               ) -> Callable[..., Callable[[], torch.Tensor]]:
    """``prepare(inputs, params)`` on float64 copies of the inputs (made once, in
    prepare), its call returning the case's dtype.

    The references compute in float64 whatever the case's dtype; autograd flows
    through the casts, so gradients land on the case's tensors. Integer tensors
    (``ms_deform_attn``'s level table) pass as they are; the case's dtype is
    that of the first floating one.
    """

    @functools.wraps(prepare)
    def prepare_in_float64(inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]):
        dtype = next(t.dtype for t in inputs.values() if t.is_floating_point())
        call = prepare({name: t.to(torch.float64) if t.is_floating_point() else t
                        for name, t in inputs.items()}, params)
        return lambda: call().to(dtype)

    return prepare_in_float64
