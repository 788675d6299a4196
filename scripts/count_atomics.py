"""Scatter-add atomics issued by each backward, float vs fixed point, on the emulator.

The cost of the deterministic backward (``kernels/determinism.py``) in
operations: every kernel source is rebuilt with ``-DDCNBENCH_COUNT_ATOMICS``
(``kernels/cuda/deterministic_atomics.cuh`` then counts each scatter-add it
issues), each backward runs once with ``torch.use_deterministic_algorithms``
off and once on, and the counts are printed. The shared-scatter DCNv3
design's counts include its shared-memory adds (they go through a
``ScatterAdd`` too); its global atomics are the counters' figures
(``docs/kernels/dcnv3.md``). A measurement, not a test:

    PYTHONPATH=. python scripts/count_atomics.py
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch

from kernels import launch
from kernels.ops import dcnv3 as dcnv3_ops
from kernels.ops import deform_conv2d as dcn
from kernels.ops import deform_psroi_pool as psroi
from kernels.ops import deform_roi_pool as roi
from kernels.ops import ms_deform_attn as msda
from kernels.ops.dcnv4 import dcnv4

COUNTING = "-DDCNBENCH_COUNT_ATOMICS"


def _counting(source):
    return dataclasses.replace(source, options=(*source.options, COUNTING))


def _counters(source) -> ctypes.Array:
    """The emulated build's ``dcnbench_atomics_issued[2]`` of ``source``."""
    build = launch.module(source, "cpu")._raw._build
    build.entries("plain")  # built once, kept loaded
    return (ctypes.c_ulonglong * 2).in_dll(build._libraries["plain"], "dcnbench_atomics_issued")


def _count(source, backward) -> dict[str, int]:
    counts = {}
    for deterministic in (False, True):
        counters = _counters(source)
        counters[0] = counters[1] = 0
        torch.use_deterministic_algorithms(deterministic)
        try:
            backward()
        finally:
            torch.use_deterministic_algorithms(False)
        counts["fixed point" if deterministic else "float"] = counters[1 if deterministic else 0]
        assert counters[0 if deterministic else 1] == 0, "the other path issued atomics"
    return counts


def main() -> None:
    generator = torch.Generator().manual_seed(0)
    dcn.SOURCE = _counting(dcn.SOURCE)
    for design in dcnv3_ops.DESIGNS:
        dcnv3_ops.SOURCES[design] = _counting(dcnv3_ops.SOURCES[design])

    N, C, H, W = 2, 16, 16, 16
    x = torch.randn(N, C, H, W, generator=generator, requires_grad=True)
    offset = 2 * torch.randn(N, 18, H, W, generator=generator)
    mask = torch.rand(N, 9, H, W, generator=generator)
    weight = torch.randn(C, C, 3, 3, generator=generator)

    def dcnv2_backward():
        out = dcn.modulated_deform_conv2d(x, offset, mask, weight, padding=1)
        torch.autograd.grad(out, x, torch.ones_like(out))

    rows = [(f"modulated_deform_conv2d N{N} C{C} {H}x{W} 3x3", _count(dcn.SOURCE, dcnv2_backward))]

    G, D = 4, 16
    xl = torch.randn(N, H, W, G * D, generator=generator, requires_grad=True)
    off = torch.randn(N, H, W, G * 18, generator=generator)
    logits = torch.randn(N, H, W, G * 9, generator=generator)
    offset_mask = torch.randn(N, H, W, 112, generator=generator)
    for design in dcnv3_ops.DESIGNS:
        def dcnv3_backward(design=design):
            out = dcnv3_ops.dcnv3(xl, off, logits, group=G, group_channels=D, softmax=True,
                                  design=design)
            torch.autograd.grad(out, xl, torch.ones_like(out))

        def dcnv4_backward(design=design):
            out = dcnv4(xl, offset_mask, group=G, group_channels=D, design=design)
            torch.autograd.grad(out, xl, torch.ones_like(out))

        source = dcnv3_ops.SOURCES[design]
        rows.append((f"dcnv3 {design} N{N} {H}x{W} G{G} D{D}", _count(source, dcnv3_backward)))
        rows.append((f"dcnv4 {design} N{N} {H}x{W} G{G} D{D}", _count(source, dcnv4_backward)))

    rows += _roi_pool_rows(generator)
    rows.append(_ms_deform_attn_row(generator))
    print(f"{'backward (grad_input scatter)':44} {'float':>10} {'fixed point':>12}")
    for name, counts in rows:
        print(f"{name:44} {counts['float']:>10} {counts['fixed point']:>12}")


def _roi_pool_rows(generator: torch.Generator) -> list[tuple[str, dict[str, int]]]:
    """The RoI pools on a Faster R-CNN-like head: 64 RoIs, 16 channels, 7x7
    bins, stride 16 on a 25 x 34 map, the adaptive grid."""
    roi.SOURCE = _counting(roi.SOURCE)
    psroi.SOURCE = _counting(psroi.SOURCE)
    K, C, H, W = 64, 16, 25, 34
    scale = 1 / 16
    low = torch.rand(K, 2, generator=generator) * torch.tensor([W, H]) / scale * 0.6
    size = torch.rand(K, 2, generator=generator) * torch.tensor([W, H]) / scale * 0.4 + 16
    rois = torch.cat([torch.randint(2, (K, 1), generator=generator).float(), low, low + size], 1)
    x = torch.randn(2, C, H, W, generator=generator, requires_grad=True)
    offset = torch.rand(K, 2, 7, 7, generator=generator) - 0.5
    mask = torch.rand(K, 1, 7, 7, generator=generator)
    x_ps = torch.randn(2, 2 * 49, H, W, generator=generator, requires_grad=True)
    trans = torch.rand(K, 2, 7, 7, generator=generator) - 0.5

    def backward(function, leaf):
        def run():
            out = function()
            torch.autograd.grad(out, leaf, torch.ones_like(out))
        return run

    size_args = dict(output_size=7, spatial_scale=scale, sampling_ratio=0)
    name = f"K{K} C{C} 7x7"
    return [
        (f"roi_align {name}", _count(roi.SOURCE, backward(
            lambda: roi.roi_align(x, rois, **size_args), x))),
        (f"deform_roi_pool {name}", _count(roi.SOURCE, backward(
            lambda: roi.deform_roi_pool(x, rois, offset, **size_args), x))),
        (f"modulated_deform_roi_pool {name}", _count(roi.SOURCE, backward(
            lambda: roi.modulated_deform_roi_pool(x, rois, offset, mask, **size_args), x))),
        (f"deform_psroi_pool K{K} 2x7x7 4x4", _count(psroi.SOURCE, backward(
            lambda: psroi.deform_psroi_pool(x_ps, rois, trans, spatial_scale=scale, output_dim=2,
                                            group_size=7, pooled_size=7, trans_std=0.1), x_ps))),
    ]


def _ms_deform_attn_row(generator: torch.Generator) -> tuple[str, dict[str, int]]:
    """ms_deform_attn on a Deformable DETR decoder-like case scaled for the CPU:
    4 levels 16²…2², 100 queries, 8 heads, D = 32, 4 points, the fused softmax."""
    msda.SOURCE = _counting(msda.SOURCE)
    shapes = torch.tensor([(16, 16), (8, 8), (4, 4), (2, 2)])
    N, Lq, M, D, L, P = 1, 100, 8, 32, 4, 4
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(N, S, M, D, generator=generator, requires_grad=True)
    locations = torch.rand(N, Lq, M, L, P, 2, generator=generator)
    logits = torch.randn(N, Lq, M, L, P, generator=generator)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])

    def backward():
        out = msda.ms_deform_attn(value, shapes, starts, locations, logits, softmax=True)
        torch.autograd.grad(out, value, torch.ones_like(out))

    return f"ms_deform_attn Lq{Lq} M{M} D{D} 4 levels P{P}", _count(msda.SOURCE, backward)


if __name__ == "__main__":
    main()
