"""Fake ``deformops.registry``: ``Backend``, ``msda`` and ``conv`` as documented.

``msda`` takes the contract's layouts; ``conv`` is torchvision's deform_conv2d
over channels-last operands: value [B, H, W, C_in], offset
[B, H_out, W_out, offset_groups, K, 2] as (dy, dx), mask
[B, H_out, W_out, offset_groups, K], output [B, H_out, W_out, C_out].
Both compute in float64 and return value's dtype.
"""

from __future__ import annotations

import enum

import torchvision

from kernels.reference import ms_deform_attn as reference

CALLS: list[dict] = []


class Backend(enum.StrEnum):
    CUDA = "cuda"
    TRITON = "triton"
    EAGER = "eager"


def msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, /, *,
         method=None, softmax=False, chunk_step=128, backend=None):
    CALLS.append({"op": "msda", "backend": backend, "softmax": softmax})
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a Backend member, got {backend!r}")
    out = reference.ms_deform_attn(value.double(), spatial_shapes, level_start_index,
                                   sampling_locations.double(), attention_weights.double(),
                                   softmax=softmax)
    return out.to(value.dtype)


def conv(value, offset, weight, /, bias=None, mask=None, stride=1, padding=0, dilation=1, *,
         groups=1, offset_groups=1, backend=None):
    CALLS.append({"op": "conv", "backend": backend, "value_shape": tuple(value.shape),
                  "offset_shape": tuple(offset.shape),
                  "mask_shape": None if mask is None else tuple(mask.shape)})
    if not isinstance(backend, Backend):
        raise TypeError(f"backend must be a Backend member, got {backend!r}")
    batch, out_h, out_w, groups_of_offsets, taps, pair = offset.shape
    assert pair == 2 and groups_of_offsets == offset_groups
    # Back to torchvision's NCHW layout, channel 2·(g·K + k) = dy, + 1 = dx.
    tv_offset = offset.permute(0, 3, 4, 5, 1, 2).reshape(batch, -1, out_h, out_w)
    tv_mask = None if mask is None else mask.permute(0, 3, 4, 1, 2).reshape(batch, -1, out_h, out_w)
    out = torchvision.ops.deform_conv2d(
        value.permute(0, 3, 1, 2).double(), tv_offset.double(), weight.double(),
        None if bias is None else bias.double(), stride=stride, padding=padding,
        dilation=dilation, mask=None if tv_mask is None else tv_mask.double())
    return out.permute(0, 2, 3, 1).to(value.dtype)
