"""Argument checks shared by the op wrappers: each error names the argument,
what was expected and what came."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


def _scalar(value: object) -> object:
    """A 0-d tensor as its Python number; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    return value


def _is_bool(value: object) -> bool:
    return isinstance(value, (bool, np.bool_))


def as_int(name: str, value: object, minimum: int | None = None) -> int:
    """``value`` as a Python int: an int of Python, of NumPy or a 0-d integer
    tensor (as torchvision takes them), not a bool, >= ``minimum``."""
    value = _scalar(value)
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def as_float(name: str, value: object, positive: bool = False) -> float:
    """``value`` as a finite Python float: a real number of Python, of NumPy or a
    0-d tensor, not a bool (> 0 with ``positive``)."""
    value = _scalar(value)
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value) or (positive and value <= 0):
        kind = "a positive finite number" if positive else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return float(value)


def as_bool(name: str, value: object) -> bool:
    """``value`` as a Python bool: a bool of Python, of NumPy or a 0-d bool tensor."""
    value = _scalar(value)
    if not _is_bool(value):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return bool(value)


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
    """``value`` as an (h, w) pair: an int for both or a pair of ints (of any
    type ``as_int`` takes), each >= ``minimum``."""
    pair = value if isinstance(value, (tuple, list, torch.Size)) else (value, value)
    if len(pair) != 2:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    try:
        values = tuple(as_int(name, v) for v in pair)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}") from None
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
    return as_int("groups", groups, minimum=1)


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
    return as_int("offset_groups", offset_groups, minimum=1)
