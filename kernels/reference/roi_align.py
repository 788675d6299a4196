"""Reference of ``roi_align``: the standard (average) RoI pooling baseline.

The contract (``docs/ops-semantics.md``, "RoI pooling, NCHW") defines it as
``torchvision.ops.roi_align`` with its ``aligned`` flag; with ``aligned`` it
equals ``deform_roi_pool`` with no offset, without (torchvision's legacy
rule) there is no −0.5 shift and the RoI sides are clamped below at 1. The
geometry and B1 sampling live in ``kernels.reference.deform_roi_pool``.
"""

from __future__ import annotations

import torch

from kernels.reference.deform_roi_pool import _pool


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
    """RoIAlign, in the dtype of ``input``.

    Args:
        input: [N, C, H, W].
        rois: [K, 5] rows (batch_index, x1, y1, x2, y2) in image coordinates,
            same dtype and device as ``input``; batch_index integral in [0, N);
            or a list of [L_i, 4] boxes, one per image.
        pooled_h, pooled_w: output bins per RoI.
        spatial_scale: image to feature-map scale.
        sampling_ratio: samples per bin and axis; <= 0: ceil(roi size / pooled size).
        aligned: the −0.5 shift (torchvision's aligned=True); False: none, RoI
            sides clamped below at 1.

    Returns:
        [K, C, pooled_h, pooled_w]: each bin the mean of its grid of B1 samples at
        y = y1·spatial_scale − shift + ph·bin_h + (iy + 0.5)·bin_h/grid_h, x likewise.
    """
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned must be a bool, got {aligned!r}")
    return _pool(input, rois, None, None, pooled_h, pooled_w, spatial_scale, sampling_ratio, 0.0,
                 aligned)
