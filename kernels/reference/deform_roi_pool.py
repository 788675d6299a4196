"""Reference of ``deform_roi_pool`` (DCNv1) and ``modulated_deform_roi_pool`` (DCNv2).

Written straight from the contract (``docs/ops-semantics.md``, "RoI pooling,
NCHW", sampling rule B1; mmcv semantics), in plain PyTorch so that it runs on
any device and in float64, and so that autograd of it *is* the reference
gradient for ``input``, ``offset`` and ``mask`` (``rois`` has none).
``kernels.reference.roi_align`` is the same function with no offset.
Readable before fast:

1. RoI k of image rois[k, 0]: start_x = x1·spatial_scale − 0.5,
   roi_w = x2·spatial_scale − 0.5 − start_x (no rounding, no minimum size),
   bin_w = roi_w / pooled_w; likewise y. ``roi_align`` with aligned=False
   (torchvision's legacy rule): no −0.5, and roi_w, roi_h clamped below at 1.
2. Sampling grid per bin: ``sampling_ratio``, or when it is <= 0
   ceil(roi_h / pooled_h) by ceil(roi_w / pooled_w) from the un-moved RoI
   (at most ``kernels.rois.MAX_SAMPLES_PER_BIN`` a side and a bin, else a
   ValueError).
3. Bin (ph, pw) moves its start by gamma·roi_w·offset[k, 0, ph, pw] in x and
   gamma·roi_h·offset[k, 1, ph, pw] in y.
4. Sample y = start_y + ph·bin_h + (iy + 0.5)·bin_h/grid_h, x likewise, read
   by B1; the bin is the sum over its grid divided by grid_h·grid_w (by 1
   when the grid is empty, which only a zero-size RoI with sampling_ratio 0
   has: the bin is then 0, as in torchvision and mmcv).
5. DCNv2 multiplies the bin by mask[k, 0, ph, pw].

K = 0 RoIs or C = 0 channels give an empty output whose gradients are zero.
``rois`` may also be a list of [L_i, 4] boxes per image (``kernels.rois``).

The grid size varies from RoI to RoI when ``sampling_ratio`` is <= 0, so RoIs
are processed in groups sharing one grid, each in chunks of at most
``MAX_CHUNK_ELEMENTS`` gathered values run under activation checkpointing
(the backward recomputes a chunk's gathers instead of keeping them all).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from kernels.rois import as_rois, check_explicit_grid, grid_too_large, grid_too_large_error

# Gathered values (RoIs × bins × grid points × channels) computed per chunk.
MAX_CHUNK_ELEMENTS = 2**22


def deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor | list[torch.Tensor],
    offset: torch.Tensor | None = None,
    *,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> torch.Tensor:
    """Deformable RoI pooling (DCNv1, mmcv semantics), in the dtype of ``input``.

    Args:
        input: [N, C, H, W].
        rois: [K, 5] rows (batch_index, x1, y1, x2, y2) in image coordinates,
            same dtype and device as ``input``; batch_index an integral value
            in [0, N); or a list of [L_i, 4] boxes, one per image. Not
            differentiable.
        offset: [K, 2, pooled_h, pooled_w] (channel 0 moves x, channel 1
            moves y, in units of gamma·RoI size), or None for no offset.
        pooled_h, pooled_w: output bins per RoI.
        spatial_scale: image to feature-map scale (1/16 for stride 16).
        sampling_ratio: samples per bin and axis; <= 0: ceil(roi size / pooled size).
        gamma: offset scale.

    Returns:
        [K, C, pooled_h, pooled_w].
    """
    return _pool(input, rois, offset, None, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma,
                 True)


def modulated_deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor | list[torch.Tensor],
    offset: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> torch.Tensor:
    """Modulated deformable RoI pooling (DCNv2): ``deform_roi_pool`` times ``mask``.

    Args:
        mask: [K, 1, pooled_h, pooled_w], used as given (already a sigmoid).
        The others as ``deform_roi_pool``.

    Returns:
        [K, C, pooled_h, pooled_w].
    """
    return _pool(input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma,
                 True)


# --- geometry (shared with the input generators) -----------------------------

def check_rois(rois: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """Raise ValueError unless ``rois`` is [K, 5] of finite (batch_index, x1, y1, x2, y2)
    rows like ``input`` (dtype, device) with integral batch indices in [0, N).

    Returns the batch indices as int64 [K].
    """
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"rois must be [K, 5] rows (batch_index, x1, y1, x2, y2), got shape {tuple(rois.shape)}"
        )
    check_like_input("rois", rois, input)
    finite = torch.isfinite(rois).all(dim=1)
    if not bool(finite.all()):
        k = int((~finite).nonzero()[0])
        raise ValueError(f"rois must be finite, got NaN or Inf in row {k}: {rois[k].tolist()}")
    batch = rois[:, 0]
    integral = batch == batch.round()
    in_range = (batch >= 0) & (batch <= input.shape[0] - 1)
    if not bool((integral & in_range).all()):
        k = int((~(integral & in_range)).nonzero()[0])
        raise ValueError(
            f"rois[:, 0] must hold integral batch indices in [0, {input.shape[0] - 1}] "
            f"(input has N={input.shape[0]}), got {batch[k].item()} in row {k}"
        )
    return batch.long()


def check_like_input(name: str, tensor: torch.Tensor, input: torch.Tensor) -> None:
    """Raise ValueError unless ``tensor`` has the dtype and device of ``input``."""
    if tensor.dtype != input.dtype or tensor.device != input.device:
        raise ValueError(
            f"{name} must be {input.dtype} on {input.device} like input, "
            f"got {tensor.dtype} on {tensor.device}"
        )


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    """Raise ValueError unless ``tensor`` has shape ``expected`` (``meaning`` spells it out)."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must be {meaning} = {list(expected)}, got {list(tensor.shape)}")


def roi_boxes(rois: torch.Tensor, spatial_scale: float, aligned: bool = True):
    """(start_y, start_x, roi_h, roi_w), each [K], of the RoIs on the feature map."""
    shift = 0.5 if aligned else 0.0
    start_x = rois[:, 1] * spatial_scale - shift
    start_y = rois[:, 2] * spatial_scale - shift
    roi_w = rois[:, 3] * spatial_scale - shift - start_x
    roi_h = rois[:, 4] * spatial_scale - shift - start_y
    if not aligned:
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    return start_y, start_x, roi_h, roi_w


def sampling_grid(roi_h, roi_w, pooled_h: int, pooled_w: int, sampling_ratio: int):
    """(grid_h, grid_w), int64 [K]: samples per bin along y and x.

    Raises ValueError for an adaptive grid beyond ``MAX_SAMPLES_PER_BIN``.
    """
    if sampling_ratio > 0:
        full = torch.full(roi_h.shape, sampling_ratio, dtype=torch.long, device=roi_h.device)
        return full, full
    # An empty grid (ceil <= 0) has no samples.
    grid_h = torch.ceil(roi_h / pooled_h).clamp(min=0)
    grid_w = torch.ceil(roi_w / pooled_w).clamp(min=0)
    too_large = grid_too_large(grid_h, grid_w)
    if bool(too_large.any()):
        k = int(too_large.nonzero()[0, 0])
        raise grid_too_large_error(k, int(grid_h[k]), int(grid_w[k]))
    return grid_h.long(), grid_w.long()


def grid_groups(rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned=True):
    """RoIs grouped by sampling grid: a list of ((grid_h, grid_w), int64 indices of the RoIs)."""
    _, _, roi_h, roi_w = roi_boxes(rois.detach(), spatial_scale, aligned)
    grid_h, grid_w = sampling_grid(roi_h, roi_w, pooled_h, pooled_w, sampling_ratio)
    pairs = torch.stack([grid_h, grid_w], dim=1)
    unique, which = torch.unique(pairs, dim=0, return_inverse=True)
    return [((int(gh), int(gw)), (which == i).nonzero()[:, 0]) for i, (gh, gw) in enumerate(unique.tolist())]


def sample_positions(rois, offset, grid, pooled_h, pooled_w, spatial_scale, gamma, aligned=True):
    """Where the bins of RoIs sharing one sampling ``grid`` = (grid_h, grid_w) sample.

    Args:
        rois: [k, 5]; offset: [k, 2, pooled_h, pooled_w] or None.

    Returns:
        (y [k, pooled_h, pooled_w, grid_h], x [k, pooled_h, pooled_w, grid_w]):
        y = start_y + gamma·roi_h·offset[:, 1] + ph·bin_h + (iy + 0.5)·bin_h/grid_h.
    """
    grid_h, grid_w = grid
    start_y, start_x, roi_h, roi_w = roi_boxes(rois, spatial_scale, aligned)
    positions = []
    for start, size, pooled, points, channel, bins_axis in (
        (start_y, roi_h, pooled_h, grid_h, 1, 1),
        (start_x, roi_w, pooled_w, grid_w, 0, 2),
    ):
        start = start[:, None, None].expand(-1, pooled_h, pooled_w)
        if offset is not None:
            start = start + gamma * size[:, None, None] * offset[:, channel]
        bin_size = (size / pooled)[:, None, None, None]
        index = torch.arange(pooled, dtype=rois.dtype, device=rois.device)
        bin_index = index.view(1, -1, 1, 1) if bins_axis == 1 else index.view(1, 1, -1, 1)
        point = torch.arange(points, dtype=rois.dtype, device=rois.device).view(1, 1, 1, -1) + 0.5
        positions.append(start[..., None] + bin_index * bin_size + point * bin_size / points)
    return positions[0], positions[1]


def bilinear_b1(input: torch.Tensor, batch: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Values of the maps at real positions by the RoIAlign rule B1.

    B1: 0 when y < -1, y > H, x < -1 or x > W, or y or x is NaN or infinite
    (a non-finite offset puts a sample outside the map, with no gradient
    through it). Otherwise clamp y and x below
    at 0; y_low = int(y); if y_low >= H-1 then y_low = y_high = H-1 and
    y = y_low, else y_high = y_low+1 (same for x); bilinear blend of the four
    corners.

    Args:
        input: [N, C, H, W].
        batch: int64 [k], the image of each RoI.
        y, x: [k, *S] (broadcastable to one shape).

    Returns:
        [k, *S, C]. Differentiable w.r.t. ``input``, ``y`` and ``x`` (the
        corner indices are detached; a clamped coordinate has slope 0).
    """
    channels, height, width = input.shape[1:]
    rows = input.permute(0, 2, 3, 1).reshape(-1, channels)  # [N·H·W, C]
    y, x = torch.broadcast_tensors(y, x)
    inside = (y >= -1) & (y <= height) & (x >= -1) & (x <= width)
    # A position outside (NaN or infinite ones too: the comparisons are false) reads
    # pixel (0, 0) weighted by 0: no NaN reaches an index, a weight or a gradient.
    y = torch.where(inside, y, 0.0)
    x = torch.where(inside, x, 0.0)
    corners = []
    for coordinate, size in ((y, height), (x, width)):
        coordinate = coordinate.clamp(min=0)
        low = torch.floor(coordinate).detach()
        top = low >= size - 1
        low = torch.where(top, size - 1.0, low)
        high = torch.where(top, low, low + 1)
        coordinate = torch.where(top, low, coordinate)
        fraction = coordinate - low
        corners.append(((low.long(), 1 - fraction), (high.long(), fraction)))
    image = (batch * (height * width)).view(-1, *([1] * (y.dim() - 1)))
    value = None
    for row, weight_y in corners[0]:
        for column, weight_x in corners[1]:
            term = rows[image + row * width + column] * (weight_y * weight_x * inside)[..., None]
            value = term if value is None else value + term
    return value


# --- the operators -------------------------------------------------------------

def _pool(input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma,
          aligned):
    """Both operators (and roi_align, with no offset); ``mask`` is None for DCNv1."""
    rois = as_rois(rois)
    batch = _check_arguments(input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio)
    channels = input.shape[1]
    if rois.shape[0] == 0 or channels == 0:
        # Nothing to pool. An empty slice of each differentiable tensor ties
        # the output to it, so that its gradient is zero rather than missing.
        tie = sum(t.reshape(-1)[:0].sum() for t in (input, offset, mask) if t is not None)
        return input.new_zeros(rois.shape[0], channels, pooled_h, pooled_w) + tie
    parts, order = [], []
    for grid, members in grid_groups(rois, pooled_h, pooled_w, spatial_scale, sampling_ratio,
                                     aligned):
        per_roi = pooled_h * pooled_w * grid[0] * grid[1] * channels
        step = max(1, MAX_CHUNK_ELEMENTS // max(per_roi, 1))
        for first in range(0, len(members), step):
            chunk = members[first:first + step]
            chunk_offset = None if offset is None else offset[chunk]
            if grid[0] * grid[1] == 0:  # an empty grid: nothing summed, divided by 1
                pooled = input.new_zeros(len(chunk), channels, pooled_h, pooled_w)
            else:
                pooled = checkpoint(
                    _pool_bins, input, batch[chunk], rois[chunk], chunk_offset, grid,
                    (pooled_h, pooled_w, spatial_scale, gamma, aligned),
                    use_reentrant=False, preserve_rng_state=False,
                )
            parts.append(pooled)
            order.append(chunk)
    output = torch.cat(parts)[torch.argsort(torch.cat(order))]
    if mask is not None:
        output = output * mask
    return output


def _pool_bins(input, batch, rois, offset, grid, geometry):
    """[k, C, pooled_h, pooled_w]: every bin's mean over its ``grid`` of B1 samples."""
    pooled_h, pooled_w, spatial_scale, gamma, aligned = geometry
    y, x = sample_positions(rois, offset, grid, pooled_h, pooled_w, spatial_scale, gamma, aligned)
    # [k, ph, pw, grid_h, grid_w, C]
    values = bilinear_b1(input, batch, y[..., :, None], x[..., None, :])
    return values.sum(dim=(3, 4)).permute(0, 3, 1, 2) / (grid[0] * grid[1])


def _check_arguments(input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio):
    """Raise ValueError naming the argument, what was expected and what came.

    Returns the RoIs' batch indices (int64 [K]).
    """
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D [N, C, H, W], got shape {list(input.shape)}")
    for name, value in (("pooled_h", pooled_h), ("pooled_w", pooled_w)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    check_explicit_grid("sampling_ratio", sampling_ratio)
    if not spatial_scale > 0:
        raise ValueError(f"spatial_scale must be > 0, got {spatial_scale}")
    batch = check_rois(rois, input)
    count = rois.shape[0]
    for name, tensor, meaning in (
        ("offset", offset, "[K, 2, pooled_h, pooled_w]"),
        ("mask", mask, "[K, 1, pooled_h, pooled_w]"),
    ):
        if tensor is None:
            continue
        channels = 2 if name == "offset" else 1
        check_shape(name, tensor, (count, channels, pooled_h, pooled_w), meaning)
        check_like_input(name, tensor, input)
    return batch
