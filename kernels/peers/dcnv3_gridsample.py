"""``dcnv3`` and ``dcnv4`` the way users run them without the CUDA extension.

InternImage ships a pure-PyTorch fallback of its core op (``dcnv3_core_pytorch``)
that users fall back to when the extension does not build: pad the input,
build normalised reference points and a normalised tap grid, and let
``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``
sample every group, then multiply by the mask and sum over the taps. This is
that formulation written by us from the contract (``docs/ops-semantics.md``,
"DCNv3 and DCNv4"), with the same arguments as ``kernels.reference.dcnv3``.
Unlike upstream it pads H by ``pad_h`` and W by ``pad_w`` (upstream swaps them,
which matters only when they differ).

Why it is the contract's B0: with ``align_corners=False`` grid_sample reads a
W_p-wide map at pixel x_p = ((g + 1)·W_p − 1) / 2 for the grid value g, so
g = 2·(x_p + 0.5) / W_p − 1 addresses padded pixel x_p = x + pad_w exactly
(up to rounding of the normalisation); zeros padding makes every corner
outside the padded map 0, and the padded rows and columns are 0 themselves,
so every corner outside the unpadded map contributes 0: rule B0. A NaN or
infinite offset samples outside (``kernels.peers.grid_sample``), where upstream
gives NaN.

Precision: everything runs in the arguments' dtype, grid_sample included. In
float16 / bfloat16 the normalised grid has 11 / 8 significant bits, i.e. a
position error of up to W_p·2^-12 / W_p·2^-9 pixels: this peer is known to
miss the contract's half-precision accuracy (``harness.operators.dcnv3``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kernels.peers.grid_sample import sample_b0
from kernels.reference.dcnv3 import (
    Geometry,
    check_arguments,
    offset_mask_channels,
    unpack_offset_mask,
)


def dcnv3(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
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
    softmax: bool = False,
) -> torch.Tensor:
    """``kernels.reference.dcnv3.dcnv3`` by padding + ``F.grid_sample`` per group.

    input [N, H, W, group·group_channels], offset [N, H_out, W_out, group·P·2],
    mask [N, H_out, W_out, group·P]; returns [N, H_out, W_out, group·group_channels].
    The softmax (``softmax``) runs in the mask's dtype, as InternImage's layer does.
    """
    return prepare_dcnv3(
        input, offset, mask, kernel_h=kernel_h, kernel_w=kernel_w, stride_h=stride_h, stride_w=stride_w, pad_h=pad_h,
        pad_w=pad_w, dilation_h=dilation_h, dilation_w=dilation_w, group=group,
        group_channels=group_channels, offset_scale=offset_scale, remove_center=remove_center,
        softmax=softmax,
    )()  # fmt: skip


def prepare_dcnv3(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
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
    softmax: bool = False,
) -> Callable[[], torch.Tensor]:
    """Check the arguments of :func:`dcnv3` once; the returned call computes it with
    no checks, as InternImage's fallback does (the harness's timed call)."""
    geometry = Geometry(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                        dilation_h, dilation_w, offset_scale, remove_center)
    taps = geometry.taps
    check_arguments(input, {"offset": (offset, group * taps * 2), "mask": (mask, group * taps)},
                    geometry, group, group_channels)
    return functools.partial(_grid_sample_core, input, offset, mask, geometry, group, softmax)


def unchecked_dcnv3(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
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
    softmax: bool = False,
) -> torch.Tensor:
    """:func:`dcnv3` with no checks, for callers whose tensors are right by construction
    (a layer that computes offset and mask from checked weights)."""
    geometry = Geometry(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                        dilation_h, dilation_w, offset_scale, remove_center)
    return _grid_sample_core(input, offset, mask, geometry, group, softmax)


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
) -> torch.Tensor:
    """``dcnv3`` (no softmax) on DCNv4's fused ``offset_mask`` [N, H_out, W_out, M],
    unpacked by ``kernels.reference.dcnv3.unpack_offset_mask``."""
    return prepare_dcnv4(
        input, offset_mask, kernel_h=kernel_h, kernel_w=kernel_w, stride_h=stride_h, stride_w=stride_w, pad_h=pad_h,
        pad_w=pad_w, dilation_h=dilation_h, dilation_w=dilation_w, group=group,
        group_channels=group_channels, offset_scale=offset_scale, remove_center=remove_center,
    )()  # fmt: skip


def prepare_dcnv4(
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
) -> Callable[[], torch.Tensor]:
    """Check the arguments of :func:`dcnv4` once; the returned call unpacks
    ``offset_mask`` and computes it with no checks (the harness's timed call)."""
    geometry = Geometry(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                        dilation_h, dilation_w, offset_scale, remove_center)
    taps = geometry.taps
    check_arguments(input, {"offset_mask": (offset_mask, offset_mask_channels(group, taps))},
                    geometry, group, group_channels)
    return functools.partial(_dcnv4_core, input, offset_mask, geometry, group)


def _dcnv4_core(input, offset_mask, geometry: Geometry, group: int):
    offset, mask = unpack_offset_mask(offset_mask, group, geometry.taps)
    return _grid_sample_core(input, offset, mask, geometry, group, softmax=False)


def _grid_sample_core(input, offset, mask, geometry: Geometry, group: int, softmax: bool):
    batch, _, _, channels = input.shape
    _, out_h, out_w, _ = offset.shape
    taps, scale = geometry.taps, geometry.offset_scale
    padded = F.pad(input, (0, 0, geometry.pad_w, geometry.pad_w, geometry.pad_h, geometry.pad_h))
    padded_h, padded_w = padded.shape[1:3]
    # Reference points: each window's undeformed centre, at pixel centres (+0.5)
    # of the padded map, normalised to [0, 1]; the taps normalised likewise.
    base_y, base_x = geometry.window_origin(out_h, out_w, dtype=input.dtype, device=input.device)
    ref_x = ((base_x + geometry.pad_w + 0.5) / padded_w)[None, :, None, None]
    ref_y = ((base_y + geometry.pad_h + 0.5) / padded_h)[:, None, None, None]
    tap_y, tap_x = geometry.tap_grid(dtype=input.dtype, device=input.device)
    dx_dy = offset.view(batch, out_h, out_w, group, taps, 2)
    loc_x = ref_x + (tap_x + dx_dy[..., 0]) * scale / padded_w
    loc_y = ref_y + (tap_y + dx_dy[..., 1]) * scale / padded_h
    grid = torch.stack((loc_x, loc_y), dim=-1) * 2 - 1  # [N, H_out, W_out, G, P, 2]

    maps = padded.view(batch, padded_h * padded_w, channels).transpose(1, 2)
    maps = maps.reshape(batch * group, channels // group, padded_h, padded_w)
    grid = grid.view(batch, out_h * out_w, group, taps, 2).transpose(1, 2).flatten(0, 1)
    sampled = sample_b0(maps, grid)  # [N·G, D, H_out·W_out, P]
    weights = mask.view(batch, out_h * out_w, group, taps).transpose(1, 2)
    weights = weights.reshape(batch * group, 1, out_h * out_w, taps)
    if softmax:
        weights = torch.softmax(weights, dim=-1)
    out = (sampled * weights).sum(-1).view(batch, channels, out_h * out_w)
    return out.transpose(1, 2).reshape(batch, out_h, out_w, channels)
