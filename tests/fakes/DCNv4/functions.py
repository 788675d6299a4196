"""Fake ``DCNv4.functions``: ``DCNv4Function`` and ``FlashDeformAttnFunction`` as released.

``FlashDeformAttnFunction.apply(value, spatial_shapes, level_start_index,
sampling_loc_attn, im2col_step, K)``: sampling_loc_attn [N, Q, M, L·K·3],
per head the L·K (x, y) locations then L·K logits; the kernel applies a
softmax over the logits. ``DCNv4Function.apply`` takes the contract's dcnv4
layouts. Computed in float64 by our reference, returned in value's dtype.
"""

from __future__ import annotations

from kernels.reference import dcnv3 as dcnv3_reference
from kernels.reference import ms_deform_attn as msda_reference

CALLS: list[dict] = []


class FlashDeformAttnFunction:
    @staticmethod
    def apply(value, spatial_shapes, level_start_index, sampling_loc_attn, im2col_step, K=8):
        CALLS.append({"op": "flash_deform_attn", "K": K, "packed_shape": tuple(sampling_loc_attn.shape)})
        batch, queries, heads, packed = sampling_loc_attn.shape
        levels = spatial_shapes.shape[0]
        assert packed == levels * K * 3
        locations = sampling_loc_attn[..., :levels * K * 2].reshape(batch, queries, heads, levels, K, 2)
        logits = sampling_loc_attn[..., levels * K * 2:].reshape(batch, queries, heads, levels, K)
        out = msda_reference.ms_deform_attn(value.double(), spatial_shapes, level_start_index,
                                            locations.double(), logits.double(), softmax=True)
        return out.to(value.dtype)


class DCNv4Function:
    @staticmethod
    def apply(input, offset_mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
              dilation_h, dilation_w, group, group_channels, offset_scale, im2col_step,
              remove_center):
        CALLS.append({"op": "dcnv4", "im2col_step": im2col_step})
        out = dcnv3_reference.dcnv4(
            input.double(), offset_mask.double(), kernel_h=kernel_h, kernel_w=kernel_w,
            stride_h=stride_h, stride_w=stride_w, pad_h=pad_h, pad_w=pad_w,
            dilation_h=dilation_h, dilation_w=dilation_w, group=group,
            group_channels=group_channels, offset_scale=offset_scale,
            remove_center=remove_center)
        return out.to(input.dtype)
