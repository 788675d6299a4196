"""``torchvision.ops.deform_conv2d`` behind the project's call signature.

torchvision infers ``groups`` from C_in / weight.shape[1] and
``offset_groups`` from offset.shape[1] / (2·kh·kw); these adapters take both
explicitly, like ``kernels.reference`` and ``kernels.ops``, and refuse a call
where they disagree with the shapes rather than let torchvision compute
another operator silently.

dtypes: torchvision's CPU kernel takes float64, float32 and float16 (not
bfloat16: "deformable_im2col" not implemented for 'BFloat16'); its CUDA
kernel dispatches floating types and half. Nothing is upcast here: a dtype
torchvision does not take is an error from torchvision.
"""

from __future__ import annotations

import torch
import torchvision


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    offset_groups: int = 1,
) -> torch.Tensor:
    """DCNv1 by torchvision. Shapes as ``kernels.reference.deform_conv2d``:
    input [N, C_in, H, W], offset [N, 2·offset_groups·kh·kw, H_out, W_out],
    weight [C_out, C_in/groups, kh, kw], bias [C_out] or None; returns
    [N, C_out, H_out, W_out]."""
    _check_groups(input, offset, weight, groups, offset_groups)
    return torchvision.ops.deform_conv2d(
        input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation
    )


def modulated_deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    offset_groups: int = 1,
) -> torch.Tensor:
    """DCNv2 by torchvision (``mask`` [N, offset_groups·kh·kw, H_out, W_out]);
    otherwise as ``deform_conv2d``."""
    _check_groups(input, offset, weight, groups, offset_groups)
    return torchvision.ops.deform_conv2d(
        input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def _check_groups(input, offset, weight, groups, offset_groups):
    """torchvision infers both group counts from shapes; make sure it infers ours."""
    in_channels = input.shape[1]
    taps = weight.shape[2] * weight.shape[3]
    if weight.shape[1] * groups != in_channels:
        raise ValueError(
            f"weight must be [C_out, C_in/groups, kh, kw] with C_in/groups = "
            f"{in_channels}/{groups}, got {tuple(weight.shape)}"
        )
    if offset.shape[1] != 2 * offset_groups * taps:
        raise ValueError(
            f"offset must have 2·offset_groups·kh·kw = {2 * offset_groups * taps} channels, "
            f"got shape {tuple(offset.shape)}"
        )
