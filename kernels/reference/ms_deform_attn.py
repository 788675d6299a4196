"""Reference of ``ms_deform_attn`` (Deformable DETR's multi-scale deformable attention).

Written straight from the contract (``docs/ops-semantics.md``, "Multi-scale
deformable attention"), in plain PyTorch so that it runs on any device and in
float64, and so that autograd of it *is* the reference gradient.

1. ``value`` [N, S, M, D] holds L maps flattened row-major and stacked:
   level l is value[:, s_l : s_l + H_l·W_l] with s_l = level_start_index[l].
2. Head m, level l, point p of query q samples level l at pixel
   x = loc_x·W_l − 0.5, y = loc_y·H_l − 0.5 (``grid_sample`` with
   align_corners=False), every channel of the head by the bilinear rule B0
   (``kernels.reference.deform_conv2d.bilinear_b0``).
3. The samples are weighted by ``attention_weights`` (softmax-normalised over
   the L·P weights of (n, q, m) when ``softmax``) and summed over levels and
   points.

Memory: autograd of B0 keeps about a dozen tensors of N·M·D·Lq·P values per
level; the queries are split into chunks of at most ``MAX_CHUNK_ELEMENTS``
sampled values, each under activation checkpointing, as in
``kernels.reference.dcnv3``. The softmax runs on the whole weight tensor first.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from kernels.reference.deform_conv2d import bilinear_b0

# Sampled values (images × queries × heads × channels × points) computed per chunk.
MAX_CHUNK_ELEMENTS = 2**24


def level_start_index_of(spatial_shapes: torch.Tensor) -> torch.Tensor:
    """[L] int64: where each level of ``spatial_shapes`` [L, 2] starts in S (0, H_0·W_0, …)."""
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat((sizes.new_zeros(1), sizes.cumsum(0)[:-1]))


def check_arguments(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> list[tuple[int, int, int]]:
    """Check the five tensors against the contract; return (H_l, W_l, s_l) per level.

    Each error names the argument, what was expected and what came. Reads the
    two integer tensors on the host (one synchronisation on a GPU).
    """
    tensors = {"value": value, "spatial_shapes": spatial_shapes,
               "level_start_index": level_start_index,
               "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if value.dim() != 4:
        raise ValueError(f"value must be 4-D [N, S, M, D], got shape {tuple(value.shape)}")
    batch, positions, heads, channels = value.shape
    for name in ("spatial_shapes", "level_start_index"):
        if tensors[name].dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {tensors[name].dtype}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2 or spatial_shapes.shape[0] < 1:
        raise ValueError(f"spatial_shapes must be [L, 2] with L >= 1, got shape "
                         f"{tuple(spatial_shapes.shape)}")
    levels = spatial_shapes.shape[0]
    if tuple(level_start_index.shape) != (levels,):
        raise ValueError(f"level_start_index must be [L] = [{levels}], got shape "
                         f"{tuple(level_start_index.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations must be [N, Lq, M, L, P, 2], got shape "
                         f"{tuple(sampling_locations.shape)}")
    queries, points = sampling_locations.shape[1], sampling_locations.shape[4]
    expected = (batch, queries, heads, levels, points, 2)
    if tuple(sampling_locations.shape) != expected:
        raise ValueError(f"sampling_locations must be [N, Lq, M, L, P, 2] = {list(expected)} "
                         f"(N, M from value, L from spatial_shapes), got "
                         f"{list(sampling_locations.shape)}")
    if tuple(attention_weights.shape) != expected[:-1]:
        raise ValueError(f"attention_weights must be [N, Lq, M, L, P] = {list(expected[:-1])}, "
                         f"got {list(attention_weights.shape)}")
    for name in ("sampling_locations", "attention_weights"):
        if tensors[name].dtype != value.dtype:
            raise TypeError(f"{name} must have value's dtype {value.dtype}, got {tensors[name].dtype}")
    for name, tensor in tensors.items():
        if tensor.device != value.device:
            raise ValueError(f"{name} is on {tensor.device}, value on {value.device}: "
                             f"expected one device")
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    for level, ((height, width), start) in enumerate(zip(shapes, starts, strict=True)):
        if height < 0 or width < 0:
            raise ValueError(f"spatial_shapes[{level}] must be >= 0, got {height}x{width}")
        if start < 0 or start + height * width > positions:
            raise ValueError(
                f"level {level} ({height}x{width}) starting at level_start_index[{level}]="
                f"{start} must end within value's S={positions}, ends at {start + height * width}"
            )
    return [(height, width, start) for (height, width), start in zip(shapes, starts, strict=True)]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    softmax: bool = False,
) -> torch.Tensor:
    """Multi-scale deformable attention from the contract; differentiable w.r.t.
    value, sampling_locations and attention_weights.

    out[n, q, m·D + d] = Σ_l Σ_p a(n, q, m, l, p) · B0(value_l[n, :, :, m, d], y, x),
    x = loc_x·W_l − 0.5, y = loc_y·H_l − 0.5; a the weights as given or, with
    ``softmax``, their softmax over the L·P weights of (n, q, m).

    Args:
        value: [N, S, M, D], S = Σ_l H_l·W_l (levels flattened row-major, stacked).
        spatial_shapes: [L, 2] int64, (H_l, W_l).
        level_start_index: [L] int64, where level l starts in S.
        sampling_locations: [N, Lq, M, L, P, 2], normalised to [0, 1] per level, x first.
        attention_weights: [N, Lq, M, L, P] (logits when ``softmax``).
        softmax: normalise the weights over the L·P points of each (n, q, m).

    Returns:
        [N, Lq, M·D], value's dtype.
    """
    levels = check_arguments(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights)
    batch, _, heads, channels = value.shape
    queries, points = sampling_locations.shape[1], sampling_locations.shape[4]
    weights = attention_weights
    if softmax:
        weights = torch.softmax(weights.flatten(3), dim=-1).view_as(attention_weights)
    per_query = batch * heads * channels * points * len(levels)
    queries_per_chunk = max(1, MAX_CHUNK_ELEMENTS // max(per_query, 1))
    outputs = [
        checkpoint(_partial_output, value, sampling_locations[:, chunk], weights[:, chunk], levels,
                   use_reentrant=False, preserve_rng_state=False)
        for chunk in (slice(first, first + queries_per_chunk)
                      for first in range(0, queries, queries_per_chunk))
    ]
    if not outputs:  # no queries
        return value.new_zeros(batch, 0, heads * channels)
    return torch.cat(outputs, dim=1)


def _partial_output(value, locations, weights, levels):
    """The operator on checked arguments for some queries: [N, q, M·D]."""
    batch, _, heads, channels = value.shape
    queries = locations.shape[1]
    out = value.new_zeros(batch, heads, channels, queries)
    for level, (height, width, start) in enumerate(levels):
        if height * width == 0:  # an empty map: every corner is outside, B0 gives 0
            continue
        # [N, H·W, M, D] -> [N, M, D, H, W]: the groups-of-maps layout of bilinear_b0.
        maps = value[:, start:start + height * width].permute(0, 2, 3, 1)
        maps = maps.reshape(batch, heads, channels, height, width)
        at = locations[:, :, :, level].permute(0, 2, 1, 3, 4)  # [N, M, q, P, 2]
        x = at[..., 0] * width - 0.5
        y = at[..., 1] * height - 0.5
        sampled = bilinear_b0(maps, y, x)  # [N, M, D, q, P]
        level_weights = weights[:, :, :, level].permute(0, 2, 1, 3)  # [N, M, q, P]
        out = out + (sampled * level_weights[:, :, None]).sum(-1)
    return out.permute(0, 3, 1, 2).reshape(batch, queries, heads * channels)
