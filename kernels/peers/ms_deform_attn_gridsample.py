"""``ms_deform_attn`` the way Deformable DETR runs it without its CUDA extension.

Deformable DETR ships ``ms_deform_attn_core_pytorch``, the formulation users
fall back to (and the one Hugging Face's detectors run on the CPU): split
``value`` into its levels, turn each into [N·M, D, H_l, W_l] maps, map the
locations to grid_sample's [-1, 1] (g = 2·loc − 1) and let
``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``
sample every level, then weight and sum. This is that formulation written by
us from the contract, with the arguments of ``kernels.reference.ms_deform_attn``.

Why it is the contract's B0: with align_corners=False grid_sample reads a
W-wide map at pixel ((g + 1)·W − 1) / 2 = loc·W − 0.5, and zeros padding makes
every corner outside the map 0. A NaN or infinite location samples outside
(``kernels.peers.grid_sample``), where upstream gives NaN.

Precision: everything runs in the arguments' dtype, grid_sample included; in
float16 / bfloat16 the grid has 11 / 8 significant bits, a position error of
up to W·2^-12 / W·2^-9 pixels (``harness.operators.ms_deform_attn``).
The softmax, when asked for, runs before the sampling, as Deformable DETR's
module does it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from kernels.peers.grid_sample import sample_b0
from kernels.reference.ms_deform_attn import check_arguments


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    softmax: bool = False,
) -> torch.Tensor:
    """``kernels.reference.ms_deform_attn.ms_deform_attn`` by ``F.grid_sample`` per level.

    Tensors and ``softmax`` as there: value [N, S, M, D], spatial_shapes [L, 2],
    level_start_index [L], sampling_locations [N, Lq, M, L, P, 2],
    attention_weights [N, Lq, M, L, P]. Returns [N, Lq, M·D].
    """
    return prepare_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights, softmax=softmax)()


def prepare_ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    softmax: bool = False,
) -> Callable[[], torch.Tensor]:
    """Check the arguments (reading the level table on the host) once; the returned
    call computes :func:`ms_deform_attn` with no checks and no synchronisation."""
    levels = check_arguments(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights)
    return functools.partial(_grid_sample_core, value, tuple((h, w) for h, w, _ in levels),
                             sampling_locations, attention_weights, softmax)


def _grid_sample_core(value, shapes, sampling_locations, attention_weights, softmax):
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    weights = attention_weights
    if softmax:
        weights = torch.softmax(weights.flatten(3), dim=-1).view_as(attention_weights)
    # The levels are stacked in order (level_start_index is their cumulative sum).
    value_levels = value.split([height * width for height, width in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (height, width) in enumerate(shapes):
        # [N, H·W, M, D] -> [N·M, D, H, W]
        maps = value_levels[level].flatten(2).transpose(1, 2).reshape(batch * heads, channels,
                                                                      height, width)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # [N·M, Lq, P, 2]
        sampled.append(sample_b0(maps, grid))  # [N·M, D, Lq, P]
    weights = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # [N·M, D, Lq]
    return out.view(batch, heads * channels, queries).transpose(1, 2).contiguous()
