"""``MSDeformAttn``: Deformable DETR's multi-scale deformable attention module on our kernels.

The module of Deformable DETR (``models/ops/modules/ms_deform_attn.py``), with
its parameters, initialisation and forward: value / sampling-offset /
attention-weight / output projections around the core op. The core is
``kernels.ops.ms_deform_attn.ms_deform_attn`` with the softmax over the L·P
weights fused into the kernel (Deformable DETR runs ``F.softmax`` before its
op: the same function), or any ``core`` with that signature (the float64
reference, the grid_sample formulation, a peer).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from kernels import checks
from kernels.ops import ms_deform_attn as ops

Core = Callable[..., torch.Tensor]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR's ``MSDeformAttn``).

    Args:
        d_model: C, the hidden size; a multiple of ``n_heads``.
        n_levels: L, feature levels.
        n_heads: M, attention heads (D = d_model / n_heads channels each).
        n_points: P, sampling points per head and level.
        core: ``core(value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights, softmax=True)`` computing the operator; our kernels by default.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8,
                 n_points: int = 4, core: Core = ops.ms_deform_attn):
        super().__init__()
        d_model, n_levels, n_heads, n_points = (
            checks.as_int(name, value, minimum=1)
            for name, value in (("d_model", d_model), ("n_levels", n_levels),
                                ("n_heads", n_heads), ("n_points", n_points)))
        if d_model % n_heads:
            raise ValueError(f"d_model must be a multiple of n_heads={n_heads}, got {d_model}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.core = core
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: offsets zero-weighted with a bias pointing each
        head in its own direction (k-th point k steps out), uniform attention, Xavier
        projections with zero bias."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([angles.cos(), angles.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.constant_(projection.bias, 0.0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor,
                input_flatten: torch.Tensor, input_spatial_shapes: torch.Tensor,
                input_level_start_index: torch.Tensor,
                input_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from every query to the flattened pyramid.

        Args:
            query: [N, Lq, C].
            reference_points: [N, Lq, L, 2] normalised (x, y) in [0, 1] (offsets are in
                pixels of each level), or [N, Lq, L, 4] boxes (cx, cy, w, h) (offsets scale
                with the box).
            input_flatten: [N, S, C], S = Σ_l H_l·W_l.
            input_spatial_shapes: [L, 2] int64 (H_l, W_l).
            input_level_start_index: [L] int64.
            input_padding_mask: [N, S] bool, True at padding (its values are zeroed), or None.

        Returns:
            [N, Lq, C].
        """
        batch, queries, channels = query.shape
        _, positions, _ = input_flatten.shape
        if channels != self.d_model or input_flatten.shape[-1] != self.d_model:
            raise ValueError(f"query and input_flatten must have d_model={self.d_model} channels, "
                             f"got {channels} and {input_flatten.shape[-1]}")
        expected = (batch, queries, self.n_levels)
        if reference_points.dim() != 4 or tuple(reference_points.shape[:3]) != expected or \
                reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points must be [N, Lq, L, 2 or 4] with "
                             f"(N, Lq, L) = {expected}, got {list(reference_points.shape)}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = value.view(batch, positions, heads, channels // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        logits = self.attention_weights(query).view(batch, queries, heads, levels, points)
        if reference_points.shape[-1] == 2:
            # Offsets in pixels of each level: normalised by (W_l, H_l).
            normaliser = input_spatial_shapes.flip(-1).to(offsets.dtype)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normaliser[None, None, None, :, None, :])
        else:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
        out = self.core(value, input_spatial_shapes, input_level_start_index,
                        locations.contiguous(), logits.contiguous(), softmax=True)
        return self.output_proj(out)
