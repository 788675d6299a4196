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


def check_pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """``value`` as an (h, w) pair: an int for both or a pair of ints, each >= ``minimum``."""
    values = (value, value) if isinstance(value, int) else value
    if isinstance(values, (tuple, list, torch.Size)):
        values = tuple(values)
    if not (
        isinstance(values, tuple)
        and len(values) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return values  # type: ignore[return-value]


def conv_groups(groups: object, in_channels: int, weight: torch.Tensor) -> int:
    """``groups`` as given, or inferred as torchvision does: C_in / weight's C_in/groups."""
    if groups is None:
        per_group = weight.shape[1]
        if per_group == 0:  # no input channels: one (empty) group
            return 1
        if in_channels % per_group:
            raise ValueError(
                f"weight's {per_group} input channels per group must divide input's "
                f"{in_channels} channels (groups = C_in / weight.shape[1])"
            )
        return in_channels // per_group
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int or None, got {groups!r}")
    return groups


def offset_groups_from(offset_groups: object, offset: torch.Tensor, taps: int) -> int:
    """``offset_groups`` as given, or inferred as torchvision does: offset's channels / (2·kh·kw)."""
    if offset_groups is None:
        channels = offset.shape[1]
        if channels == 0 or channels % (2 * taps):
            raise ValueError(
                f"offset must have a positive multiple of 2·kh·kw = {2 * taps} channels, "
                f"got {channels}"
            )
        return channels // (2 * taps)
    if not isinstance(offset_groups, int) or isinstance(offset_groups, bool) or offset_groups < 1:
        raise ValueError(f"offset_groups must be a positive int or None, got {offset_groups!r}")
    return offset_groups
