"""Reference of ``roi_align``: the standard (average) RoI pooling baseline.

The contract (``docs/ops-semantics.md``, "RoI pooling, NCHW") defines it as
``torchvision.ops.roi_align(..., aligned=True)``, which equals
``deform_roi_pool`` with no offset; this module is that, kept findable under
the operator's name. The geometry and B1 sampling live in
``kernels.reference.deform_roi_pool``.
"""

from __future__ import annotations

import torch

from kernels.reference.deform_roi_pool import deform_roi_pool


def roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    *,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
) -> torch.Tensor:
    """RoIAlign with ``aligned=True``, in the dtype of ``input``.

    Args:
        input: [N, C, H, W].
        rois: [K, 5] rows (batch_index, x1, y1, x2, y2) in image coordinates,
            same dtype and device as ``input``; batch_index integral in [0, N).
        pooled_h, pooled_w: output bins per RoI.
        spatial_scale: image to feature-map scale.
        sampling_ratio: samples per bin and axis; 0: ceil(roi size / pooled size).

    Returns:
        [K, C, pooled_h, pooled_w]: each bin the mean of its grid of B1 samples at
        y = y1·spatial_scale − 0.5 + ph·bin_h + (iy + 0.5)·bin_h/grid_h, x likewise.
    """
    return deform_roi_pool(input, rois, None, pooled_h=pooled_h, pooled_w=pooled_w,
                           spatial_scale=spatial_scale, sampling_ratio=sampling_ratio)
