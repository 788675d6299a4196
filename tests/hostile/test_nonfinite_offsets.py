"""Non-finite offsets in the B0 operators: a sample at a NaN or infinite
position is outside the map (docs/ops-semantics.md), so it contributes 0 in
the reference as in our kernels, the same as a sample moved far outside."""

from __future__ import annotations

import pytest
import torch

from kernels.ops import dcnv3 as dcnv3_ops
from kernels.ops import deform_conv2d as conv_ops
from kernels.reference import dcnv3 as dcnv3_reference
from kernels.reference import deform_conv2d as conv_reference

FAR = 1e6  # far outside any map here


def _conv_inputs(dtype):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 2, 5, 5, generator=g, dtype=dtype),
            torch.randn(1, 18, 3, 3, generator=g, dtype=dtype),
            torch.rand(1, 9, 3, 3, generator=g, dtype=dtype),
            torch.randn(2, 2, 3, 3, generator=g, dtype=dtype))


def _dcnv3_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(1, 5, 5, 4, generator=g, dtype=dtype),
            torch.randn(1, 5, 5, 18, generator=g, dtype=dtype),
            torch.rand(1, 5, 5, 9, generator=g, dtype=dtype))


def _conv(module, input, offset, mask, weight):
    return module.modulated_deform_conv2d(input, offset, mask, weight)


def _dcnv3(module, input, offset, mask):
    return module.dcnv3(input, offset, mask, group=1, group_channels=4)


OPS = [(_conv, _conv_inputs, conv_reference), (_conv, _conv_inputs, conv_ops),
       (_dcnv3, _dcnv3_inputs, dcnv3_reference), (_dcnv3, _dcnv3_inputs, dcnv3_ops)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize(("call", "inputs", "module"), OPS,
                         ids=["conv-reference", "conv-kernel", "dcnv3-reference", "dcnv3-kernel"])
def test_a_non_finite_offset_samples_outside_the_map(call, inputs, module, bad):
    dtype = torch.float64 if "reference" in module.__name__ else torch.float32
    tensors = inputs(dtype)
    offset = tensors[1]
    far, nonfinite = offset.clone(), offset.clone()
    far.view(-1)[::7] = FAR
    nonfinite.view(-1)[::7] = bad
    expected = call(module, tensors[0], far, *tensors[2:])
    got = call(module, tensors[0], nonfinite, *tensors[2:])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
