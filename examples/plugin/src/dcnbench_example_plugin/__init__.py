"""dcnbench plugin: ``grid_sample``, a PyTorch peer of the deformable convolutions.

Each offset group's channels are sampled at the deformed positions with
``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)``,
which is torchvision's bilinear rule (a corner outside the map counts 0), the
samples are multiplied by the mask (DCNv2), and one matrix product per weight
group gives the output. Registered with the decorators dcnbench's own
implementations use; ``prepare`` builds the sampling grid's constant parts once
per case, ``call`` does the rest.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from harness.metrics import MetricContext, metric
from harness.registry import implementation


def _constant_grid(params, out_h: int, out_w: int, dtype, device):
    """(y, x) of every undeformed tap position: [K, H_out, 1] and [K, 1, W_out]."""
    kh, kw = params["kernel_h"], params["kernel_w"]
    tap_y, tap_x = torch.meshgrid(torch.arange(kh), torch.arange(kw), indexing="ij")
    base_y = torch.arange(out_h) * params["stride_h"] - params["pad_h"]
    base_x = torch.arange(out_w) * params["stride_w"] - params["pad_w"]
    y = base_y[None, :, None] + (tap_y.flatten() * params["dilation_h"])[:, None, None]
    x = base_x[None, None, :] + (tap_x.flatten() * params["dilation_w"])[:, None, None]
    return y.to(dtype=dtype, device=device), x.to(dtype=dtype, device=device)


def _deform_conv(input, offset, mask, weight, bias, grid_y, grid_x, groups, offset_groups):
    n, channels, height, width = input.shape
    out_channels = weight.shape[0]
    taps, out_h, out_w = grid_y.shape[0], offset.shape[2], offset.shape[3]
    moved = offset.view(n, offset_groups, taps, 2, out_h, out_w)  # (dy, dx) per tap
    y = grid_y + moved[:, :, :, 0]
    x = grid_x + moved[:, :, :, 1]
    grid = torch.stack(((2 * x + 1) / width - 1, (2 * y + 1) / height - 1), dim=-1)
    maps = input.reshape(n * offset_groups, channels // offset_groups, height, width)
    sampled = F.grid_sample(maps, grid.view(n * offset_groups, taps * out_h, out_w, 2),
                            mode="bilinear", padding_mode="zeros", align_corners=False)
    sampled = sampled.view(n, offset_groups, channels // offset_groups, taps, out_h * out_w)
    if mask is not None:
        sampled = sampled * mask.view(n, offset_groups, 1, taps, out_h * out_w)
    columns = sampled.reshape(n, groups, channels // groups * taps, out_h * out_w)
    kernel = weight.reshape(groups, out_channels // groups, -1)
    out = torch.einsum("ngkl,gok->ngol", columns, kernel).reshape(n, out_channels, out_h, out_w)
    return out if bias is None else out + bias[None, :, None, None]


@implementation("deform_conv2d", "grid_sample", kind="peer", dtypes=("float32",))
def prepare_deform_conv2d(inputs, params):
    """Plain PyTorch: F.grid_sample per offset group, one matmul per weight group (plugin)."""
    offset = inputs["offset"]
    grid_y, grid_x = _constant_grid(params, offset.shape[2], offset.shape[3], offset.dtype,
                                    offset.device)
    return functools.partial(_deform_conv, inputs["input"], offset, inputs.get("mask"),
                             inputs["weight"], inputs.get("bias"), grid_y, grid_x,
                             params["groups"], params["offset_groups"])


implementation("modulated_deform_conv2d", "grid_sample", kind="peer", dtypes=("float32",))(
    prepare_deform_conv2d)


@metric("samples_per_us", "1/µs", better="higher")
def samples_per_us(ctx: MetricContext) -> float | None:
    """Bilinear samples (N·C_in·kh·kw·H_out·W_out) per µs of device time (plugin)."""
    if ctx.op.name not in ("deform_conv2d", "modulated_deform_conv2d"):
        return None
    p = ctx.params
    out_h = (p["H"] + 2 * p["pad_h"] - p["dilation_h"] * (p["kernel_h"] - 1) - 1) // p["stride_h"] + 1
    out_w = (p["W"] + 2 * p["pad_w"] - p["dilation_w"] * (p["kernel_w"] - 1) - 1) // p["stride_w"] + 1
    samples = p["N"] * p["C_in"] * p["kernel_h"] * p["kernel_w"] * out_h * out_w
    return samples / (ctx.seconds * 1e6)
