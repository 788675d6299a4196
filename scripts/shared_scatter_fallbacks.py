"""How many bilinear corners the shared-scatter backward sends to global atomics.

``kernels/cuda/dcnv3_shared_scatter.cu`` adds a corner's grad_input into its
block's shared region when the corner lies inside it and falls back to a
global atomic otherwise. This counts, on the ``counters`` suite's dcnv3 /
dcnv4 cases (their own seeded inputs), the in-image corners of all samples
and those outside their block's region, with the tile plan the op picks
(``kernels.ops.dcnv3.scatter_tile``) and the region's placement as the kernel
computes it (``tile_of``). A measurement, not a test:

    PYTHONPATH=. python scripts/shared_scatter_fallbacks.py
"""

from __future__ import annotations

import torch

from harness import registry, suites
from kernels.ops import dcnv3 as ops
from kernels.reference.dcnv3 import Geometry, unpack_offset_mask


def region_origins(first_output: torch.Tensor, stride: int, pad: int, region: int,
                   size: int) -> torch.Tensor:
    """The input row (column) where each output's block region starts: ``tile_of``."""
    upper = max(size - region, 0)
    return (first_output * stride - pad - ops.SHARED_SCATTER_HALO).clamp(0, upper)


def fallbacks(params: dict, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(in-image corners, corners outside their block's region) of one case."""
    geometry = Geometry.from_params(params)
    group, height, width = params["group"], params["H"], params["W"]
    if "offset_mask" in inputs:
        offset = unpack_offset_mask(inputs["offset_mask"].double(), group, geometry.taps)[0]
    else:
        offset = inputs["offset"].double()
    y, x = geometry.sample_positions(offset, group)  # [N, H_out, W_out, G, P]
    _, out_h, out_w = offset.shape[:3]
    call = ops.Call(geometry, params["N"], height, width, group, params["group_channels"],
                    out_h, out_w)
    tile = ops.scatter_tile(call, accumulator_bytes=4)
    ho, wo = torch.arange(out_h), torch.arange(out_w)
    oy = region_origins(ho // tile.tile_h * tile.tile_h, geometry.stride_h, geometry.pad_h,
                        tile.region_h, height)[None, :, None, None, None]
    ox = region_origins(wo // tile.tile_w * tile.tile_w, geometry.stride_w, geometry.pad_w,
                        tile.region_w, width)[None, None, :, None, None]
    in_range = (y > -1) & (y < height) & (x > -1) & (x < width)
    total = outside = 0
    for cy in (0, 1):
        for cx in (0, 1):
            row, column = y.floor() + cy, x.floor() + cx
            corner = in_range & (row >= 0) & (row < height) & (column >= 0) & (column < width)
            inside = ((row - oy >= 0) & (row - oy < tile.region_h)
                      & (column - ox >= 0) & (column - ox < tile.region_w))
            total += int(corner.sum())
            outside += int((corner & ~inside).sum())
    return total, outside


def main() -> None:
    suite = suites.load("counters")
    for suite_case in suite.cases:
        case = suite_case.case
        if case.op.name not in ("dcnv3", "dcnv4") or case.dtype != "float32":
            continue
        operator = registry.get_operator(case.op.name)
        generator = torch.Generator().manual_seed(suite.seed)
        inputs = operator.make_inputs(case.params, torch.float32, "cpu", generator, case.mode)
        total, outside = fallbacks(case.params, inputs)
        print(f"{case.id}: {outside} of {total} corners outside their block's region "
              f"({100 * outside / total:.2f} %)")


if __name__ == "__main__":
    main()
