"""``F.grid_sample`` by the contract's rule B0, for the grid_sample peers.

With ``mode="bilinear", padding_mode="zeros"`` grid_sample is B0 at every
real position, but a NaN or infinite grid value gives NaN (its weights are
NaN, and NaN · 0 is NaN), where the contract's "Non-finite positions" says the
sample is outside: 0, with no gradient through it. :func:`sample_b0` moves
such values to a point outside first, so the peers keep the one rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A normalised coordinate whose pixel, ((g + 1)·W − 1) / 2 = −W − 1/2, has
# both corners outside any map.
OUTSIDE = -3.0


def sample_b0(maps: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(maps, grid)``, bilinear, zeros padding, align_corners=False,
    with every non-finite grid value outside the map.

    Args:
        maps: [B, C, H, W].
        grid: [B, H_out, W_out, 2], normalised (x, y) in [-1, 1] for the map.

    Returns:
        [B, C, H_out, W_out].
    """
    grid = torch.where(torch.isfinite(grid), grid, OUTSIDE)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
