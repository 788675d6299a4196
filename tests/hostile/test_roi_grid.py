"""Item 3 of the probe, verified: a huge RoI with an adaptive grid
(sampling_ratio <= 0) is bounded: 10^6 pixels at pooled 1×1 (within
MAX_SAMPLES_PER_BIN) returns in seconds, and a grid past the bound (where
int(ceilf(...)) would overflow) is a prompt error naming it."""

from __future__ import annotations

import time

import pytest
import torch

from kernels.ops.deform_roi_pool import deform_roi_pool, roi_align
from kernels.rois import MAX_SAMPLES_PER_BIN


@pytest.mark.parametrize("op", [roi_align, deform_roi_pool])
def test_a_roi_of_a_million_pixels_returns_promptly(op):
    input = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    rois = torch.tensor([[0.0, 0.0, 0.0, 1000.0, 1000.0]])
    start = time.perf_counter()
    output = op(input, rois, output_size=1, sampling_ratio=0)
    assert time.perf_counter() - start < 10
    assert output.shape == (1, 2, 1, 1) and torch.isfinite(output).all()


@pytest.mark.parametrize("side", [2_000.0, 1e5])  # 4·10^6 samples; 10^10, past 2^31
@pytest.mark.parametrize("op", [roi_align, deform_roi_pool])
def test_a_grid_past_the_bound_is_a_prompt_error(op, side):
    input = torch.zeros(1, 1, 8, 8)
    rois = torch.tensor([[0.0, 0.0, 0.0, side, side]])
    start = time.perf_counter()
    with pytest.raises(ValueError, match=str(MAX_SAMPLES_PER_BIN)):
        op(input, rois, output_size=1, sampling_ratio=0)
    assert time.perf_counter() - start < 5
