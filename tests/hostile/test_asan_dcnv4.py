"""Item 1 of the probe at the op level: dcnv4's backward (grad_offset and
grad_mask written through one buffer) gives the same gradients under
DCNBENCH_EMULATOR_MODE=asan as in normal mode."""

from __future__ import annotations

import pytest
import torch

from kernels import emulator
from kernels.ops.dcnv4 import dcnv4


@pytest.mark.slow  # the first run builds the dcnv3 kernels with ASan
def test_dcnv4_backward_under_asan_matches_normal_mode():
    g = torch.Generator().manual_seed(0)
    input = torch.randn(1, 4, 4, 8, generator=g, requires_grad=True)
    offset_mask = torch.randn(1, 4, 4, 32, generator=g, requires_grad=True)

    def gradients():
        output = dcnv4(input, offset_mask, group=1, group_channels=8)
        return torch.autograd.grad(output.sum(), (input, offset_mask))

    normal = gradients()
    with emulator.mode("asan"):
        under_asan = gradients()
    for got, expected in zip(under_asan, normal, strict=True):
        # float32's tolerance, not bit equality: the input gradient's float atomics add
        # in a thread-dependent order (the bug made offset_mask's gradient wrong by ~10)
        torch.testing.assert_close(got, expected)
