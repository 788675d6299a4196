"""Our DCNv4 kernels: ``dcnv4``, DCNv4's operator.

``dcnv3``'s geometry without softmax, offsets and mask fused into one
``offset_mask`` tensor. It runs the very kernels of ``kernels.ops.dcnv3``
(every design), instantiated for the fused layout: what is specific here is
only the shape of ``offset_mask``. Unlike upstream DCNv4: any kernel size,
any ``group_channels``, a CPU path (emulated) and a bfloat16 backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kernels.ops import dcnv3 as family
from kernels.reference.dcnv3 import offset_mask_width

__all__ = ["dcnv4", "prepare"]


def dcnv4(
    input: torch.Tensor,
    offset_mask: torch.Tensor,
    *,
    kernel_h: int = 3,
    kernel_w: int = 3,
    stride_h: int = 1,
    stride_w: int = 1,
    pad_h: int = 1,
    pad_w: int = 1,
    dilation_h: int = 1,
    dilation_w: int = 1,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    design: str = "vectorized",
) -> torch.Tensor:
    """DCNv4's operator with our CUDA kernels; differentiable.

    ``kernels.ops.dcnv3.dcnv3`` with the mask as given (no softmax), read from
    the fused ``offset_mask``.

    Args:
        input: [N, H, W, group·group_channels] (channels-last), float32 /
            float16 / bfloat16 / float64; any strides (copied when not dense).
        offset_mask: [N, H_out, W_out, M], M ≥ group·3·P (DCNv4 pads it to
            ceil(group·P·3 / 8)·8, which the kernels read directly; another
            width is copied to that one); group g holds (dx, dy) of tap p at
            g·3P + 2p and + 1 and the mask of tap p at g·3P + 2P + p; the
            columns from group·3P on are ignored (their gradient is 0).
        kernel_h, ..., remove_center, group, group_channels, design: as ``dcnv3``.

    N = 0 and group_channels = 0 give an empty output and zero gradients. The
    backward follows ``torch.use_deterministic_algorithms`` as ``dcnv3``'s.

    Returns:
        [N, H_out, W_out, group·group_channels].
    """
    geometry = dict(
        kernel_h=kernel_h, kernel_w=kernel_w, stride_h=stride_h, stride_w=stride_w,
        pad_h=pad_h, pad_w=pad_w, dilation_h=dilation_h, dilation_w=dilation_w,
        offset_scale=offset_scale, remove_center=remove_center,
    )  # fmt: skip
    return prepare(
        input, offset_mask, group=group, group_channels=group_channels, design=design,
        **geometry,
    )()  # fmt: skip


def prepare(
    input: torch.Tensor, offset_mask: torch.Tensor, *, group, group_channels,
    design: str = "vectorized", **geometry,
) -> Callable[[], torch.Tensor]:
    """Check the arguments of :func:`dcnv4` (the same keywords) once; the returned
    call runs the operator on them with no checks: the harness's timed call."""
    modulation = {"offset_mask": (offset_mask, lambda taps: offset_mask_width(offset_mask, group, taps))}
    return family.prepare_run(
        input, offset_mask, None, modulation, group=group, group_channels=group_channels,
        softmax=False, design=design, **geometry,
    )  # fmt: skip
