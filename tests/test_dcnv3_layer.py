"""``kernels.ops.dcnv3_layer`` with a stride and a padding: where its depthwise
conv and its centre-feature blend look, against a composition written here
from the module docstring, and our kernels against the reference core."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from kernels.ops import dcnv3 as ops
from kernels.ops.dcnv3_layer import DCNv3Layer, dcnv3_layer
from kernels.reference import dcnv3 as reference

GROUP, CHANNELS = 2, 8


def _layer(stride: int = 1, pad: int | None = None, core=reference.dcnv3) -> DCNv3Layer:
    torch.manual_seed(19)
    return DCNv3Layer(CHANNELS, GROUP, stride=stride, pad=pad, center_feature_scale=True,
                      core=core).double()


def _input(H: int = 7, W: int = 6) -> torch.Tensor:
    return torch.randn(2, H, W, CHANNELS, generator=torch.Generator().manual_seed(20),
                       dtype=torch.float64)


def _by_hand(layer: DCNv3Layer, x: torch.Tensor, stride: int, pad: int) -> torch.Tensor:
    """The layer at full resolution (stride 1, "same"), then each piece read at the
    windows' centres ho·stride − pad + 1 (3 × 3 kernel: half = 1), zero outside."""
    w = {name: p for name, p in layer.weights.items()}
    x_proj = F.linear(x, w["input_proj_weight"], w["input_proj_bias"])
    x1 = F.conv2d(x.permute(0, 3, 1, 2), w["dw_weight"], w["dw_bias"], padding=1,
                  groups=CHANNELS).permute(0, 2, 3, 1)
    x1 = F.gelu(F.layer_norm(x1, (CHANNELS,), w["norm_weight"], w["norm_bias"], eps=1e-6))
    H, W = x.shape[1:3]
    out_h, out_w = (H + 2 * pad - 3) // stride + 1, (W + 2 * pad - 3) // stride + 1
    rows = torch.arange(out_h) * stride - pad + 1
    cols = torch.arange(out_w) * stride - pad + 1
    assert rows.min() >= 0 and rows.max() < H and cols.max() < W  # pad <= half here
    at_centres = x1[:, rows][:, :, cols]
    offset = F.linear(at_centres, w["offset_weight"], w["offset_bias"])
    logits = F.linear(at_centres, w["mask_weight"], w["mask_bias"])
    out = reference.dcnv3(x_proj, offset, logits, group=GROUP, group_channels=CHANNELS // GROUP,
                          stride_h=stride, stride_w=stride, pad_h=pad, pad_w=pad, softmax=True)
    scale = torch.sigmoid(F.linear(at_centres, w["center_feature_scale_weight"],
                                   w["center_feature_scale_bias"]))
    scale = scale.repeat_interleave(CHANNELS // GROUP, dim=-1)
    out = out * (1 - scale) + x_proj[:, rows][:, :, cols] * scale
    return F.linear(out, w["output_proj_weight"], w["output_proj_bias"])


@pytest.mark.parametrize("stride, pad", [(1, 1), (2, 1), (2, 0), (3, 1)])
def test_stride_and_padding_read_the_windows_centres(stride, pad):
    layer, x = _layer(stride, pad), _input()
    torch.testing.assert_close(layer(x), _by_hand(layer, x, stride, pad), rtol=1e-12, atol=1e-12)


def test_defaults_keep_the_size_and_a_wide_padding_reads_zeros_at_the_centres():
    x = _input()
    assert _layer()(x).shape == x.shape
    wide = _layer(stride=2, pad=2)(x)  # centres at -1, 1, ...: x_proj read as 0 at -1
    assert wide.shape == (2, 5, 4, CHANNELS) and torch.isfinite(wide).all()


@pytest.mark.parametrize("design", ops.DESIGNS)
def test_our_kernels_in_a_strided_layer(design):
    core = functools.partial(ops.dcnv3, design=design)
    x = _input().float()
    ours = _layer(2, 1, core).float()(x)
    expected = _layer(2, 1).float()(x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_a_padding_the_depthwise_conv_cannot_centre_is_refused():
    layer = DCNv3Layer(CHANNELS, GROUP, kernel_size=5, pad=0, dw_kernel_size=1)
    with pytest.raises(ValueError, match=r"pad_h must be >= .* = 2 .*got 0"):
        layer(_input().float())


def test_the_function_takes_the_stride_and_padding():
    layer, x = _layer(2, 0), _input()
    direct = dcnv3_layer(x, dict(layer.weights), group=GROUP, group_channels=CHANNELS // GROUP,
                         stride_h=2, stride_w=2, pad_h=0, pad_w=0)
    torch.testing.assert_close(direct, layer(x), rtol=0, atol=0)


@pytest.mark.usefixtures("deterministic_algorithms")  # gradcheck's reentrancy check
def test_gradcheck_of_the_layer_on_the_emulated_kernels():
    """torch.autograd.gradcheck (float64) of the whole strided layer on our kernels,
    with respect to its input: that reaches all three of the core's gradients
    (input through x_proj, offset and mask through x1). One design: both are
    gradchecked alone in tests/test_dcnv3.py."""
    layer = _layer(2, 1, functools.partial(ops.dcnv3, design="vectorized"))
    for weight in layer.parameters():
        weight.requires_grad_(False)
    x = _input(3, 4)[:1].requires_grad_()
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("design", ops.DESIGNS)
def test_an_empty_batch_through_the_layer(design):
    """N = 0: an empty output and zero gradients for every weight, as the reference core's."""
    layer = _layer(2, 1, functools.partial(ops.dcnv3, design=design)).float()
    out = layer(_input()[:0].float())
    assert out.shape == (0, 4, 3, CHANNELS)
    out.sum().backward()
    for name, weight in layer.weights.items():
        assert weight.grad is not None and not weight.grad.any(), name
