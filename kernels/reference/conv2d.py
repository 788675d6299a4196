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

from kernels.checks import check_pair, conv_groups


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
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int | None = None,
) -> torch.Tensor:
    """Dense 2-D convolution, NCHW, in the dtype of its arguments.

    Args:
        input: [N, C_in, H, W].
        weight: [C_out, C_in/groups, kernel_h, kernel_w].
        bias: [C_out] or None.
        stride: (stride_h, stride_w), or one int for both.
        padding: (pad_h, pad_w), zeros on both sides, or one int for both.
        dilation: (dilation_h, dilation_w), or one int for both.
        groups: number of weight groups; divides C_in and C_out. None:
            C_in / weight.shape[1].

    N = 0, C_in = 0 and C_out = 0 give an empty output (or the bias alone) and
    zero gradients.

    Returns:
        [N, C_out, H_out, W_out], H_out and W_out by ``conv_output_size``.
    """
    stride = check_pair("stride", stride, 1)
    padding = check_pair("padding", padding, 0)
    dilation = check_pair("dilation", dilation, 1)
    groups = conv_groups(groups, input.shape[1], weight)
    if min(input.shape[1], weight.shape[0]) > 0:
        return F.conv2d(
            input, weight, bias, stride=stride, padding=padding, dilation=dilation, groups=groups
        )
    # PyTorch's conv2d refuses C_out = 0 and returns no channels for C_in = 0;
    # a deformable convolution with zero offsets is the same sum and takes both.
    from kernels.reference.deform_conv2d import deform_conv2d  # it imports this module

    kernel_h, kernel_w = weight.shape[2:]
    out_size = [
        conv_output_size(size, kernel, s, pad, dil)
        for size, kernel, s, pad, dil in zip(
            input.shape[2:], (kernel_h, kernel_w), stride, padding, dilation, strict=True
        )
    ]
    offset = input.new_zeros(input.shape[0], 2 * kernel_h * kernel_w, *out_size)
    return deform_conv2d(input, offset, weight, bias, stride, padding, dilation, groups, 1)
