"""Reference of ``deform_psroi_pool``: R-FCN's deformable position-sensitive RoI pooling.

Written straight from the contract (``docs/ops-semantics.md``, "RoI pooling,
NCHW", sampling rule B2; the original Deformable ConvNets semantics), in plain
PyTorch so that it runs on any device and in float64, and so that autograd of
it *is* the reference gradient for ``input`` and ``trans`` (``rois`` has none).
Readable before fast:

1. RoI k: start_x = round(x1)·spatial_scale − 0.5,
   end_x = (round(x2) + 1)·spatial_scale − 0.5 with C's round (halves away
   from zero), roi_w = max(end_x − start_x, 0.1), bin_w = roi_w/pooled_size,
   sub_w = bin_w/sample_per_part; likewise y.
2. Bin (ph, pw) of output channel ctop reads the trans cell
   (part_h, part_w) = (floor(ph·part_size/pooled_size), likewise pw) of class
   ctop // (output_dim/num_classes): trans_x = trans[k, 2·class, part_h, part_w]·trans_std
   (0 with ``no_trans``), and wstart = pw·bin_w + start_x + trans_x·roi_w; likewise y.
3. It reads input channel (ctop·group_size + gh)·group_size + gw with
   gh = clamp(floor(ph·group_size/pooled_size), 0, group_size − 1), likewise gw.
4. Samples at (hstart + ih·sub_h, wstart + iw·sub_w), ih, iw < sample_per_part,
   by B2: a sample outside [-0.5, H-0.5]×[-0.5, W-0.5] is skipped and not
   counted; the bin is the mean over the counted samples, 0 when none was.

The floors of step 2 and 3 are taken in integer arithmetic (exact; the
original code divides in floating point, which in float32 gives the same
integers for every part_size <= pooled_size <= 19).

K = 0 RoIs or output_dim = 0 give an empty output whose gradients are zero;
``rois`` may also be a list of [L_i, 4] boxes per image (``kernels.rois``).

RoIs are processed in chunks of at most ``MAX_CHUNK_ELEMENTS`` samples under
activation checkpointing, so the backward holds one chunk's gathers at a time.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from kernels.reference.deform_roi_pool import (
    check_like_input,
    check_rois,
    check_shape,
)
from kernels.rois import as_rois, check_explicit_grid

# Samples (RoIs × output channels × bins × samples per bin) computed per chunk.
MAX_CHUNK_ELEMENTS = 2**22
# The contract's smallest RoI side on the feature map.
MIN_ROI_SIZE = 0.1


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
    """Deformable position-sensitive RoI pooling, in the dtype of ``input``.

    Args:
        input: [N, output_dim·group_size², H, W].
        rois: [K, 5] rows (batch_index, x1, y1, x2, y2) in image coordinates,
            same dtype and device as ``input``; batch_index integral in [0, N);
            or a list of [L_i, 4] boxes, one per image. Not differentiable.
        trans: [K, 2·num_classes, part_size, part_size] (channel 2·class moves
            x, 2·class + 1 moves y, in units of trans_std·RoI size);
            num_classes divides output_dim. Ignored (may be None) with ``no_trans``.
        spatial_scale: image to feature-map scale.
        output_dim: output channels.
        group_size: position-sensitive score maps per side.
        pooled_size: output bins per side.
        part_size: trans cells per side; 0 means pooled_size.
        sample_per_part: samples per bin and axis.
        trans_std: trans scale.
        no_trans: pool without moving the bins.

    Returns:
        [K, output_dim, pooled_size, pooled_size].
    """
    part_size = part_size or pooled_size
    rois = as_rois(rois)
    batch, num_classes = _check_arguments(
        input, rois, trans, spatial_scale, output_dim, group_size, pooled_size, part_size,
        sample_per_part, no_trans)
    geometry = (spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part,
                trans_std, num_classes)
    if rois.shape[0] == 0 or output_dim == 0:
        # Nothing to pool: an empty slice of each differentiable tensor ties
        # the output to it, so that its gradient is zero rather than missing.
        moved = [input] if no_trans else [input, trans]
        tie = sum(t.reshape(-1)[:0].sum() for t in moved)
        return input.new_zeros(rois.shape[0], output_dim, pooled_size, pooled_size) + tie
    per_roi = output_dim * pooled_size**2 * sample_per_part**2
    step = max(1, MAX_CHUNK_ELEMENTS // per_roi)
    parts = []
    for first in range(0, rois.shape[0], step):
        chunk = slice(first, first + step)
        parts.append(checkpoint(
            _pool_chunk, input, batch[chunk], rois[chunk], None if no_trans else trans[chunk],
            geometry, use_reentrant=False, preserve_rng_state=False))
    return torch.cat(parts)


def c_round(value: torch.Tensor) -> torch.Tensor:
    """C's round(): halves away from zero (torch.round rounds them to even)."""
    return torch.sign(value) * torch.floor(value.abs() + 0.5)


def sample_positions(rois, trans, *, spatial_scale, pooled_size, part_size, sample_per_part,
                     trans_std, num_classes):
    """Where every bin of every class samples.

    Args:
        rois: [k, 5]; trans: [k, 2·num_classes, part_size, part_size] or None.

    Returns:
        (h, w), each [k, num_classes, pooled_size, pooled_size, sample_per_part]:
        w[k, c, ph, pw, iw] = pw·bin_w + start_x + trans_x·roi_w + iw·sub_w,
        h likewise with ph, ih and trans_y.
    """
    device, dtype = rois.device, rois.dtype
    bins = torch.arange(pooled_size, device=device)
    parts = bins * part_size // pooled_size  # floor(ph/pooled_size·part_size)
    samples = torch.arange(sample_per_part, dtype=dtype, device=device)
    positions = []
    for low, high, channel in ((2, 4, 1), (1, 3, 0)):  # y from (y1, y2), x from (x1, x2)
        start = c_round(rois[:, low]) * spatial_scale - 0.5
        end = (c_round(rois[:, high]) + 1) * spatial_scale - 0.5
        size = torch.clamp(end - start, min=MIN_ROI_SIZE)
        bin_size = size / pooled_size
        sub_size = bin_size / sample_per_part
        if trans is None:
            shift = rois.new_zeros(rois.shape[0], num_classes, pooled_size, pooled_size)
        else:
            cells = trans.view(trans.shape[0], num_classes, 2, part_size, part_size)[:, :, channel]
            shift = cells[:, :, parts][:, :, :, parts] * trans_std
        bin_index = bins.to(dtype).view(1, 1, -1, 1) if channel == 1 else bins.to(dtype).view(1, 1, 1, -1)
        start_of_bin = bin_index * bin_size.view(-1, 1, 1, 1) + start.view(-1, 1, 1, 1) + shift * size.view(-1, 1, 1, 1)
        positions.append(start_of_bin[..., None] + samples * sub_size.view(-1, 1, 1, 1, 1))
    return positions[0], positions[1]


def bilinear_b2(maps: torch.Tensor, height: int, width: int, index: torch.Tensor,
                y: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values of single maps at real positions by the PSRoI rule B2.

    B2: a sample with x < -0.5, x > W-0.5, y < -0.5 or y > H-0.5, or a NaN or
    infinite coordinate (a non-finite trans: not a point of the map), is skipped;
    otherwise x is clamped to [0, W-1], y to [0, H-1], and the corners
    floor/ceil of each coordinate are blended.

    Args:
        maps: every map's H·W values, flattened ([M·H·W]).
        index: int64, the map (0 <= index < M) of each sample.
        y, x: the positions, broadcastable with ``index``.

    Returns:
        (values, counted): the blend (0 where skipped) and whether each sample counts.
    """
    counted = (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)
    # A skipped position (NaN or infinite ones too: the comparisons are false) reads
    # pixel (0, 0) weighted by 0: no NaN reaches an index, a weight or a gradient.
    y = torch.where(counted, y, 0.0).clamp(0, height - 1)
    x = torch.where(counted, x, 0.0).clamp(0, width - 1)
    y_low, y_high = torch.floor(y).detach(), torch.ceil(y).detach()
    x_low, x_high = torch.floor(x).detach(), torch.ceil(x).detach()
    dist_y, dist_x = y - y_low, x - x_low
    base = index * (height * width)
    value = 0
    for row, weight_y in ((y_low, 1 - dist_y), (y_high, dist_y)):
        for column, weight_x in ((x_low, 1 - dist_x), (x_high, dist_x)):
            value = value + maps[base + row.long() * width + column.long()] * weight_y * weight_x
    return value * counted, counted


def _pool_chunk(input, batch, rois, trans, geometry):
    """[k, output_dim, pooled_size, pooled_size] for a chunk of RoIs."""
    spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, \
        num_classes = geometry
    channels, height, width = input.shape[1:]
    h, w = sample_positions(rois, trans, spatial_scale=spatial_scale, pooled_size=pooled_size,
                            part_size=part_size, sample_per_part=sample_per_part,
                            trans_std=trans_std, num_classes=num_classes)
    ctop = torch.arange(output_dim, device=input.device)
    class_of = ctop // (output_dim // num_classes)
    h, w = h[:, class_of], w[:, class_of]  # [k, output_dim, P, P, S]
    group = torch.clamp(torch.arange(pooled_size, device=input.device) * group_size // pooled_size,
                        0, group_size - 1)
    channel = (ctop.view(-1, 1, 1) * group_size + group.view(1, -1, 1)) * group_size + group.view(1, 1, -1)
    maps = (batch.view(-1, 1, 1, 1) * channels + channel)[..., None, None]  # [k, od, P, P, 1, 1]
    values, counted = bilinear_b2(input.reshape(-1), height, width, maps,
                                  h[..., :, None], w[..., None, :])
    count = counted.sum(dim=(-2, -1))
    return values.sum(dim=(-2, -1)) / count.clamp(min=1)


def _check_arguments(input, rois, trans, spatial_scale, output_dim, group_size, pooled_size,
                     part_size, sample_per_part, no_trans):
    """Raise ValueError naming the argument, what was expected and what came.

    Returns (the RoIs' batch indices as int64 [K], num_classes).
    """
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D [N, output_dim·group_size², H, W], got shape {list(input.shape)}")
    for name, value, minimum in (("output_dim", output_dim, 0), ("group_size", group_size, 1),
                                 ("pooled_size", pooled_size, 1), ("part_size", part_size, 1),
                                 ("sample_per_part", sample_per_part, 1)):
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    check_explicit_grid("sample_per_part", sample_per_part)
    if not spatial_scale > 0:
        raise ValueError(f"spatial_scale must be > 0, got {spatial_scale}")
    if input.shape[1] != output_dim * group_size**2:
        raise ValueError(
            f"input must have output_dim·group_size² = {output_dim}·{group_size}² = "
            f"{output_dim * group_size**2} channels, got {input.shape[1]} (shape {list(input.shape)})")
    batch = check_rois(rois, input)
    if no_trans:
        return batch, 1
    if trans is None:
        raise ValueError("trans must be [K, 2·num_classes, part_size, part_size] unless no_trans, got None")
    if trans.dim() != 4 or trans.shape[1] % 2 or trans.shape[1] == 0:
        raise ValueError(
            f"trans must be [K, 2·num_classes, part_size, part_size], got shape {list(trans.shape)}")
    num_classes = trans.shape[1] // 2
    check_shape("trans", trans, (rois.shape[0], 2 * num_classes, part_size, part_size),
                "[K, 2·num_classes, part_size, part_size]")
    if output_dim % num_classes:
        raise ValueError(
            f"trans's num_classes = {num_classes} (2·num_classes = {trans.shape[1]} channels) must "
            f"divide output_dim = {output_dim}")
    check_like_input("trans", trans, input)
    return batch, num_classes
