"""RoIs as users pass them, and the bound on a bin's sampling grid.

Shared by the RoI pooling kernels' wrappers (``kernels.ops.deform_roi_pool``,
``kernels.ops.deform_psroi_pool``), their references and peers adapters and
the modules, so that every entry point takes the same two forms of RoIs and
refuses the same grids:

- a [K, 5] tensor of (batch_index, x1, y1, x2, y2) rows, or
- torchvision's form: a list (or tuple) of [L_i, 4] tensors of
  (x1, y1, x2, y2) boxes, one per image, image i's boxes getting batch index i.

The sampling grid of a bin has grid_h·grid_w samples, each a loop iteration
of one kernel thread; with ``sampling_ratio`` <= 0 it grows with the RoI
(ceil(roi size / pooled size) a side). ``MAX_SAMPLES_PER_BIN`` bounds it, a
side and in all, so that a huge RoI is a clear error instead of a kernel that
runs for hours (or an ``int(ceilf(...))`` that overflows).
"""

from __future__ import annotations

import torch

__all__ = [
    "MAX_SAMPLES_PER_BIN",
    "as_rois",
    "check_explicit_grid",
    "grid_too_large",
    "grid_too_large_error",
]

# 2^20 samples per bin: a 1024 x 1024 grid, i.e. a RoI of a million feature
# pixels pooled to one bin; on a GPU one thread walks them in a few ms.
MAX_SAMPLES_PER_BIN = 2**20


def as_rois(rois: object) -> torch.Tensor:
    """``rois`` as a [K, 5] tensor: returned as is when it is a tensor (its
    shape is checked by the caller), converted when it is a list of [L_i, 4]
    boxes per image (torchvision's ``convert_boxes_to_roi_format``)."""
    if isinstance(rois, torch.Tensor):
        return rois
    if not isinstance(rois, (list, tuple)):
        raise TypeError(
            "rois must be a [K, 5] torch.Tensor or a list of [L, 4] tensors (one per image), "
            f"got {type(rois).__name__}"
        )
    if not rois:
        raise ValueError("rois as a list must hold one [L, 4] tensor per image, got an empty list")
    for image, boxes in enumerate(rois):
        if not isinstance(boxes, torch.Tensor):
            raise TypeError(
                f"rois[{image}] must be a torch.Tensor of [L, 4] boxes, got {type(boxes).__name__}"
            )
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"rois[{image}] must have shape (L, 4) (x1, y1, x2, y2), got {tuple(boxes.shape)}"
            )
        if boxes.dtype != rois[0].dtype or boxes.device != rois[0].device:
            raise ValueError(
                f"rois[{image}] is {boxes.dtype} on {boxes.device}, expected rois[0]'s "
                f"{rois[0].dtype} on {rois[0].device}"
            )
    index = torch.cat(
        [boxes.new_full((boxes.shape[0], 1), image) for image, boxes in enumerate(rois)]
    )
    return torch.cat([index, torch.cat(list(rois))], dim=1)


def check_explicit_grid(name: str, side: int) -> None:
    """A parameter that sets a bin's grid to ``side`` x ``side`` samples keeps it
    within ``MAX_SAMPLES_PER_BIN``."""
    if side * side > MAX_SAMPLES_PER_BIN:
        raise ValueError(
            f"{name} must be at most {int(MAX_SAMPLES_PER_BIN**0.5)} (a bin samples {name}² "
            f"points, at most MAX_SAMPLES_PER_BIN = {MAX_SAMPLES_PER_BIN}), got {side}"
        )


def grid_too_large(grid_h: torch.Tensor, grid_w: torch.Tensor) -> torch.Tensor:
    """Which of the adaptive grids (floating sides, ceil already taken) exceed
    ``MAX_SAMPLES_PER_BIN`` a side or in all (bool, their shape)."""
    most = MAX_SAMPLES_PER_BIN
    return (grid_h > most) | (grid_w > most) | (grid_h * grid_w > most)


def grid_too_large_error(k: int, grid_h: int, grid_w: int) -> ValueError:
    """The error for RoI ``k``, whose adaptive grid is ``grid_h`` x ``grid_w``."""
    return ValueError(
        f"RoI {k} needs an adaptive sampling grid of {grid_h} x {grid_w} samples per bin "
        f"(sampling_ratio <= 0: ceil(roi size / pooled size) a side); at most "
        f"MAX_SAMPLES_PER_BIN = {MAX_SAMPLES_PER_BIN} a side and a bin are allowed: pass a "
        "sampling_ratio > 0, or a larger pooled size"
    )
