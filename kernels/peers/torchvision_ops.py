"""``torchvision.ops.deform_conv2d`` behind the project's call signature.

torchvision infers ``groups`` from C_in / weight.shape[1] and
``offset_groups`` from offset.shape[1] / (2·kh·kw); these adapters take both
like ``kernels.reference`` and ``kernels.ops`` (None: inferred the same way)
and refuse a call where given values disagree with the shapes rather than let
torchvision compute another operator silently. An empty batch runs as
torchvision runs it; C_in = 0 is refused (torchvision divides by
weight.shape[1]).

dtypes: torchvision's CPU kernel takes float64, float32 and float16 (not
bfloat16: "deformable_im2col" not implemented for 'BFloat16'); its CUDA
kernel dispatches floating types and half. Nothing is upcast here: a dtype
torchvision does not take is an error from torchvision.

The RoI pooling adapters (``roi_align``, ``deform_psroi_pool``) take the
keyword parameters of ``kernels.reference.roi_align`` and
``kernels.reference.deform_psroi_pool``; see ``docs/operators/roi_pool.md``
for where ``ps_roi_align`` computes the contract's ``deform_psroi_pool``.
They take ``rois`` as a [K, 5] tensor or a list of [L, 4] boxes per image
(``kernels.rois``), in the input's dtype or float32; torchvision wants the
input's (autocast aside), so float32 rois are rounded to it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torchvision

from kernels.checks import conv_groups, offset_groups_from
from kernels.rois import as_rois


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int | None = None,
    offset_groups: int | None = None,
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
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int | None = None,
    offset_groups: int | None = None,
) -> torch.Tensor:
    """DCNv2 by torchvision (``mask`` [N, offset_groups·kh·kw, H_out, W_out]);
    otherwise as ``deform_conv2d``."""
    _check_groups(input, offset, weight, groups, offset_groups)
    return torchvision.ops.deform_conv2d(
        input, offset, weight, bias, stride=stride, padding=padding, dilation=dilation, mask=mask
    )


def prepare_deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    offset_groups: int = 1,
    allow_tf32: bool = False,
) -> Callable[[], torch.Tensor]:
    """Check once that torchvision infers our group counts; the returned call is
    ``torchvision.ops.deform_conv2d`` itself (``mask`` None: DCNv1).

    ``allow_tf32``: the call runs with ``torch.backends.cuda.matmul.allow_tf32`` on,
    restored after it, so that torchvision's CUDA forward multiplies float32 on TF32
    (its GEMMs are cuBLAS's). Its backward, which autograd runs after the call, and
    its CPU kernel never see it.
    """
    _check_groups(input, offset, weight, groups, offset_groups)
    call = functools.partial(torchvision.ops.deform_conv2d, input, offset, weight, bias,
                             stride=stride, padding=padding, dilation=dilation, mask=mask)
    return _with_cublas_tf32(call) if allow_tf32 else call


def _with_cublas_tf32(call: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``call`` with cuBLAS's float32 GEMMs on TF32, the flag restored after (also when
    it raises): the global flag is on only for this call."""

    def with_tf32() -> torch.Tensor:
        matmul = torch.backends.cuda.matmul
        before = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            return call()
        finally:
            matmul.allow_tf32 = before

    return with_tf32


def _check_groups(input, offset, weight, groups, offset_groups):
    """torchvision infers both group counts from shapes; make sure it infers ours."""
    in_channels = input.shape[1]
    if in_channels == 0:
        raise ValueError(
            "torchvision.ops.deform_conv2d cannot take input with 0 channels (it divides by "
            f"weight.shape[1]), got input {tuple(input.shape)}"
        )
    taps = weight.shape[2] * weight.shape[3]
    groups = conv_groups(groups, in_channels, weight)
    offset_groups = offset_groups_from(offset_groups, offset, taps)
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


# --- RoI pooling --------------------------------------------------------------


def roi_align(
    input: torch.Tensor,
    rois: torch.Tensor | list[torch.Tensor],
    *,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> torch.Tensor:
    """RoIAlign by torchvision: the contract's ``roi_align``. input [N, C, H, W],
    rois [K, 5] (batch_index, x1, y1, x2, y2) or [L, 4] boxes per image;
    returns [K, C, pooled_h, pooled_w] (K = 0 or C = 0: empty)."""
    return torchvision.ops.roi_align(
        input, _rois_like(rois, input), (pooled_h, pooled_w), spatial_scale, sampling_ratio,
        aligned=aligned,
    )


def _rois_like(rois: torch.Tensor | list[torch.Tensor], input: torch.Tensor) -> torch.Tensor:
    """[K, 5] rois in the input's dtype, as torchvision's kernels want them."""
    return as_rois(rois).to(input.dtype)


def deform_psroi_pool(
    input: torch.Tensor,
    rois: torch.Tensor | list[torch.Tensor],
    trans: torch.Tensor | None = None,
    *,
    spatial_scale: float = 1.0,
    output_dim: int,
    group_size: int = 1,
    pooled_size: int,
    part_size: int = 0,
    sample_per_part: int = 4,
    trans_std: float = 0.0,
    no_trans: bool = False,
) -> torch.Tensor:
    """``deform_psroi_pool`` by ``torchvision.ops.ps_roi_align``, where the two agree.

    They compute the same function when ``no_trans``, ``group_size ==
    pooled_size`` and no sample falls outside [-0.5, H-0.5]×[-0.5, W-0.5]
    (there B1 and B2 blend alike); anything else is refused with a
    ValueError. The RoIs are moved so that ps_roi_align's samples (at
    (i + 0.5)/sample_per_part of a bin from its unrounded corners, no +1) land
    on the contract's (at i/sample_per_part of a bin from the rounded corners,
    x2 + 1): x1' = round(x1) − sub_w/(2·spatial_scale) and
    x2' = x1' + roi_w/spatial_scale, computed in float64 and rounded to the
    input's dtype (so only float32 and float64 stay within the contract's
    tolerance). input [N, output_dim·pooled_size², H, W], rois [K, 5];
    returns [K, output_dim, pooled_size, pooled_size].
    """
    return prepare_deform_psroi_pool(
        input, rois, trans, spatial_scale=spatial_scale, output_dim=output_dim,
        group_size=group_size, pooled_size=pooled_size, part_size=part_size,
        sample_per_part=sample_per_part, trans_std=trans_std, no_trans=no_trans,
    )()  # fmt: skip


def prepare_deform_psroi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    trans: torch.Tensor | None,
    *,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
    trans_std: float,
    no_trans: bool,
) -> Callable[[], torch.Tensor]:
    """Refuse the cases where ps_roi_align differs (:func:`deform_psroi_pool`) and
    move the RoIs, once (one host synchronisation); the returned call is
    ``torchvision.ops.ps_roi_align`` on the moved RoIs."""
    from kernels.reference.deform_psroi_pool import c_round, sample_positions

    if not no_trans or group_size != pooled_size:
        raise ValueError(
            "torchvision.ops.ps_roi_align computes deform_psroi_pool only with no_trans=True and "
            f"group_size == pooled_size, got no_trans={no_trans}, group_size={group_size}, "
            f"pooled_size={pooled_size}"
        )
    exact = as_rois(rois).detach().to(torch.float64)
    height, width = input.shape[2:]
    ys, xs = sample_positions(exact, None, spatial_scale=spatial_scale, pooled_size=pooled_size,
                              part_size=part_size or pooled_size, sample_per_part=sample_per_part,
                              trans_std=trans_std, num_classes=1)
    outside = (xs < -0.5) | (xs > width - 0.5)
    outside = outside.any() | ((ys < -0.5) | (ys > height - 0.5)).any()
    if bool(outside):
        raise ValueError(
            "torchvision.ops.ps_roi_align differs from deform_psroi_pool when a sample falls "
            "outside [-0.5, H-0.5]×[-0.5, W-0.5] (B1 averages it in, B2 skips it); these RoIs "
            "have such samples"
        )
    moved = [exact[:, 0]]
    for low, high in ((1, 3), (2, 4)):
        start = c_round(exact[:, low])
        size = torch.clamp((c_round(exact[:, high]) + 1 - start) * spatial_scale, min=0.1)
        moved_low = start - size / (2 * pooled_size * sample_per_part * spatial_scale)
        moved.append(moved_low)
        moved.append(moved_low + size / spatial_scale)
    moved_rois = torch.stack([moved[0], moved[1], moved[3], moved[2], moved[4]], dim=1)
    return functools.partial(torchvision.ops.ps_roi_align, input, moved_rois.to(input.dtype),
                             pooled_size, spatial_scale, sample_per_part)
