"""Argument checks shared by the op wrappers: each error names the argument,
what was expected and what came."""

from __future__ import annotations

import torch


def check_tensor(name: str, tensor: object, ndim: int) -> torch.Tensor:
    """``tensor`` is a torch.Tensor of ``ndim`` dimensions."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(tensor.shape)}")
    return tensor


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], why: str) -> None:
    """``tensor`` has shape ``expected``; ``why`` names its dimensions."""
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} ({why}), got {tuple(tensor.shape)}")
