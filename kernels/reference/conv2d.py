"""Reference of ``conv2d``, the dense baseline, and the output-size rule the
whole convolution family shares.

Contract (``docs/ops-semantics.md``, "Convolutions, NCHW"): ``conv2d`` is
``torch.nn.functional.conv2d`` with ``stride_h, stride_w, pad_h, pad_w,
dilation_h, dilation_w, groups``. The reference is that function evaluated in
the dtype it is given; the oracle passes float64 tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    """Output length of a convolution along one axis.

    H_out = (H + 2·pad_h − dilation_h·(kernel_h − 1) − 1) // stride_h + 1, likewise
    W_out. A result below 1 means the case has no output and is invalid.
    """
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """Dense 2-D convolution, NCHW, in the dtype of its arguments.

    Args:
        input: [N, C_in, H, W].
        weight: [C_out, C_in/groups, kernel_h, kernel_w].
        bias: [C_out] or None.
        stride: (stride_h, stride_w).
        padding: (pad_h, pad_w), zeros on both sides.
        dilation: (dilation_h, dilation_w).
        groups: number of weight groups; divides C_in and C_out.

    Returns:
        [N, C_out, H_out, W_out], H_out and W_out by ``conv_output_size``.
    """
    return F.conv2d(
        input, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups
    )
