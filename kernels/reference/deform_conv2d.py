"""Reference of ``deform_conv2d`` (DCNv1) and ``modulated_deform_conv2d`` (DCNv2).

Written straight from the contract (``docs/ops-semantics.md``, "Convolutions,
NCHW"; the semantics of ``torchvision.ops.deform_conv2d``), in plain PyTorch so
that it runs on any device and in float64, and so that autograd of it *is* the
reference gradient for ``input``, ``offset``, ``mask``, ``weight`` and ``bias``.
Readable before fast:

1. Tap k = i·kernel_w + j (row-major). Offset group g reads dy from offset
   channel 2·(g·kh·kw + k), dx from the next channel and its mask from channel
   g·kh·kw + k.
2. Sample y = ho·stride_h − pad_h + i·dilation_h + dy,
   x = wo·stride_w − pad_w + j·dilation_w + dx.
3. Every input channel c of offset group c // (C_in/offset_groups) is read at
   (y, x) by the bilinear rule B0 (zero outside), then multiplied by the mask.
4. Those values form the columns [N, C_in·kh·kw, H_out·W_out]; a grouped
   matrix product with the weight, plus the bias, gives the output.

Memory: the columns of one image are C_in·kh·kw·H_out·W_out values, and
autograd keeps about a dozen tensors of that size per chunk (four gathered
corners, their weighted terms, the sum, the masked columns, and as many
gradients). The work is therefore split into chunks of images (and, when one
image is too big, of taps) of at most ``MAX_CHUNK_ELEMENTS`` column values,
and each chunk runs under activation checkpointing, so the backward pass holds
one chunk's intermediates at a time and recomputes them instead of keeping
them all. With the default 2**24 elements (128 MiB in float64) a forward and
backward peaks at about 1.5 GiB on top of the arguments, the output and their
gradients, whatever the shape (measured on the CPU: +1.0 GiB for N=2,
C_in=C_out=512, 3×3, 40×60, one 84 MiB image per chunk). The largest suite
shape (N=8, C=512, 3×3, 100×168) runs one tap of one image per chunk.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from kernels.checks import check_pair, conv_groups, offset_groups_from
from kernels.reference.conv2d import conv_output_size

# Column values (channels × taps × output pixels × images) computed per chunk.
MAX_CHUNK_ELEMENTS = 2**24
# Where bilinear_b0 moves a position outside the map: both corners outside too.
OUTSIDE = -2.0


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int | None = None,
    offset_groups: int | None = None,
) -> torch.Tensor:
    """Deformable convolution (DCNv1), NCHW, in the dtype of its arguments.

    Args:
        input: [N, C_in, H, W].
        offset: [N, 2·offset_groups·kernel_h·kernel_w, H_out, W_out]; channel
            2·(g·kh·kw + k) is dy and 2·(g·kh·kw + k) + 1 is dx of tap k of
            offset group g.
        weight: [C_out, C_in/groups, kernel_h, kernel_w].
        bias: [C_out] or None.
        stride: (stride_h, stride_w), or one int for both.
        padding: (pad_h, pad_w), or one int for both.
        dilation: (dilation_h, dilation_w), or one int for both.
        groups: weight groups; divides C_in and C_out. None: C_in / weight.shape[1]
            (torchvision's inference).
        offset_groups: offset groups; divides C_in. None: offset.shape[1] / (2·kh·kw).

    N = 0 and C_in = 0 or C_out = 0 give an empty output (or the bias alone)
    whose gradients are zero, as torchvision's.

    Returns:
        [N, C_out, H_out, W_out] with
        H_out = (H + 2·pad_h − dilation_h·(kernel_h − 1) − 1) // stride_h + 1,
        likewise W_out.
    """
    return _deform_conv(
        input, offset, None, weight, bias, stride, padding, dilation, groups, offset_groups
    )


def modulated_deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int | None = None,
    offset_groups: int | None = None,
) -> torch.Tensor:
    """Modulated deformable convolution (DCNv2), NCHW, in the dtype of its arguments.

    ``deform_conv2d`` with every sampled value multiplied by ``mask``:
    out[n,o,ho,wo] = bias[o] + Σ weight · mask · B0(input, y, x).

    Args:
        input: [N, C_in, H, W].
        offset: [N, 2·offset_groups·kernel_h·kernel_w, H_out, W_out].
        mask: [N, offset_groups·kernel_h·kernel_w, H_out, W_out]; channel
            g·kh·kw + k modulates tap k of offset group g. Used as given (no
            sigmoid here).
        weight: [C_out, C_in/groups, kernel_h, kernel_w].
        bias: [C_out] or None.
        stride, padding, dilation, groups, offset_groups: as ``deform_conv2d``.

    Returns:
        [N, C_out, H_out, W_out].
    """
    return _deform_conv(
        input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups
    )


def base_coordinates(
    out_size: tuple[int, int],
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Undeformed sample position of every tap and output pixel.

    Returns (base_y, base_x), each [kernel_h·kernel_w, H_out, W_out], with
    base_y[k, ho, wo] = ho·stride_h − pad_h + i·dilation_h and
    base_x[k, ho, wo] = wo·stride_w − pad_w + j·dilation_w for tap k = i·kernel_w + j.
    The sample position is the base plus the tap's (dy, dx).
    """
    (out_h, out_w), (kernel_h, kernel_w) = out_size, kernel_size
    ho = torch.arange(out_h, dtype=dtype, device=device)
    wo = torch.arange(out_w, dtype=dtype, device=device)
    i = torch.arange(kernel_h, dtype=dtype, device=device).repeat_interleave(kernel_w)
    j = torch.arange(kernel_w, dtype=dtype, device=device).repeat(kernel_h)
    base_y = ho[None, :, None] * stride[0] - padding[0] + i[:, None, None] * dilation[0]
    base_x = wo[None, None, :] * stride[1] - padding[1] + j[:, None, None] * dilation[1]
    shape = (kernel_h * kernel_w, out_h, out_w)
    return base_y.expand(shape), base_x.expand(shape)


def sample_coordinates(
    offset: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    offset_groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where every tap of every offset group samples the input.

    Args:
        offset: [N, 2·offset_groups·kernel_h·kernel_w, H_out, W_out].

    Returns:
        (y, x), each [N, offset_groups, kernel_h·kernel_w, H_out, W_out]:
        y = ho·stride_h − pad_h + i·dilation_h + dy, x likewise with dx.
    """
    batch, _, out_h, out_w = offset.shape
    taps = kernel_size[0] * kernel_size[1]
    dy_dx = offset.view(batch, offset_groups, taps, 2, out_h, out_w)
    base_y, base_x = base_coordinates(
        (out_h, out_w),
        kernel_size,
        stride,
        padding,
        dilation,
        dtype=offset.dtype,
        device=offset.device,
    )
    return base_y + dy_dx[:, :, :, 0], base_x + dy_dx[:, :, :, 1]


def bilinear_b0(input: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Values of the maps at real positions by the zero-outside rule B0.

    B0: 0 when y <= -1, y >= H, x <= -1 or x >= W, or y or x is NaN or
    infinite (a non-finite offset puts a sample outside the map, with no
    gradient through it); otherwise the bilinear
    blend of the corners (floor(y), floor(x)) … (floor(y)+1, floor(x)+1),
    where a corner outside [0, H-1]×[0, W-1] contributes 0.

    Args:
        input: [B, G, C, H, W]: G groups of C maps each.
        y, x: [B, G, *S]: positions shared by the C maps of a group.

    Returns:
        [B, G, C, *S].

    Differentiable w.r.t. ``input``, ``y`` and ``x``: the corner indices come
    from a detached floor, so d/dy flows through the bilinear weights only.
    """
    batch, groups, channels, height, width = input.shape
    sample_shape = y.shape[2:]
    samples = math.prod(sample_shape)  # not -1: that is ambiguous for an empty batch
    y = y.reshape(batch, groups, samples)
    x = x.reshape(batch, groups, samples)
    maps = input.reshape(batch, groups, channels, height * width)

    # The rule's first clause. A position outside (NaN or infinite ones too: the
    # comparisons are false) moves to a point with every corner outside: its value
    # and gradient are 0, and no NaN reaches a weight (NaN * 0 is NaN). At y = -1
    # or x = -1 exactly this decides the gradient, where the blend alone would
    # give a one-sided nonzero slope.
    inside = (y > -1) & (y < height) & (x > -1) & (x < width)
    y = torch.where(inside, y, OUTSIDE)
    x = torch.where(inside, x, OUTSIDE)
    y_low = torch.floor(y).detach()
    x_low = torch.floor(x).detach()
    frac_y = y - y_low
    frac_x = x - x_low

    value = None
    for corner_y, weight_y in ((y_low, 1 - frac_y), (y_low + 1, frac_y)):
        for corner_x, weight_x in ((x_low, 1 - frac_x), (x_low + 1, frac_x)):
            valid = (
                inside
                & (corner_y >= 0)
                & (corner_y <= height - 1)
                & (corner_x >= 0)
                & (corner_x <= width - 1)
            )
            # Invalid corners read pixel 0 and are then weighted by 0.
            index = torch.where(valid, corner_y.long() * width + corner_x.long(), 0)
            corner = maps.gather(3, index[:, :, None, :].expand(-1, -1, channels, -1))
            weight = torch.where(valid, weight_y * weight_x, 0)
            term = corner * weight[:, :, None, :]
            value = term if value is None else value + term
    return value.reshape(batch, groups, channels, *sample_shape)


def _deform_conv(
    input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups
):
    """Both operators; ``mask`` is None for DCNv1. Shapes as in ``modulated_deform_conv2d``."""
    stride = check_pair("stride", stride, 1)
    padding = check_pair("padding", padding, 0)
    dilation = check_pair("dilation", dilation, 1)
    for name, tensor in (("input", input), ("offset", offset), ("mask", mask), ("weight", weight)):
        if tensor is not None and tensor.dim() != 4:
            raise ValueError(f"{name} must be 4-D, got shape {tuple(tensor.shape)}")
    groups = conv_groups(groups, input.shape[1], weight)
    offset_groups = offset_groups_from(offset_groups, offset, weight.shape[2] * weight.shape[3])
    out_h, out_w = _check_arguments(
        input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups
    )
    batch, in_channels = input.shape[:2]
    out_channels, _, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w
    columns_per_image = max(in_channels * taps * out_h * out_w, 1)
    images_per_chunk = max(1, MAX_CHUNK_ELEMENTS // columns_per_image)
    taps_per_chunk = (
        taps
        if images_per_chunk > 1
        else max(1, MAX_CHUNK_ELEMENTS // (in_channels * out_h * out_w))
    )
    geometry = ((kernel_h, kernel_w), stride, padding, dilation, groups, offset_groups)

    outputs = []
    # At least one chunk, empty for N = 0: the output then still depends on
    # the weight (a zero gradient, not "unused in the graph").
    for first_image in range(0, max(batch, 1), images_per_chunk):
        images = slice(first_image, first_image + images_per_chunk)
        image_mask = None if mask is None else mask[images]
        out = 0
        for first_tap in range(0, taps, taps_per_chunk):
            tap_range = (first_tap, min(first_tap + taps_per_chunk, taps))
            out = out + checkpoint(
                _partial_output,
                input[images],
                offset[images],
                image_mask,
                weight,
                tap_range,
                geometry,
                use_reentrant=False,
                preserve_rng_state=False,
            )
        outputs.append(out)
    output = torch.cat(outputs).view(batch, out_channels, out_h, out_w)
    if bias is not None:
        output = output + bias.view(1, out_channels, 1, 1)
    return output


def _partial_output(input, offset, mask, weight, tap_range, geometry):
    """Output (without bias) of the taps in ``tap_range`` = (first, stop) only.

    input [n, C_in, H, W], offset [n, 2·G·K, H_out, W_out], mask
    [n, G·K, H_out, W_out] or None, weight [C_out, C_in/groups, kh, kw]
    (G = offset_groups, K = kh·kw). Returns [n, C_out, H_out, W_out].
    """
    kernel_size, stride, padding, dilation, groups, offset_groups = geometry
    batch, in_channels, height, width = input.shape
    out_channels = weight.shape[0]
    out_h, out_w = offset.shape[2:]
    taps = slice(*tap_range)
    n_taps = tap_range[1] - tap_range[0]

    y, x = sample_coordinates(offset, kernel_size, stride, padding, dilation, offset_groups)
    grouped_input = input.view(batch, offset_groups, in_channels // offset_groups, height, width)
    # [n, G, C_in/G, taps, H_out, W_out]
    sampled = bilinear_b0(grouped_input, y[:, :, taps], x[:, :, taps])
    if mask is not None:
        all_taps = kernel_size[0] * kernel_size[1]
        group_mask = mask.view(batch, offset_groups, all_taps, out_h, out_w)[:, :, taps]
        sampled = sampled * group_mask[:, :, None]

    # Columns [n, groups, (C_in/groups)·taps, H_out·W_out], ordered (channel, tap)
    # like the weight's flattened [C_in/groups, kh·kw].
    columns = sampled.reshape(batch, groups, (in_channels // groups) * n_taps, out_h * out_w)
    group_weight = weight.reshape(
        groups, out_channels // groups, in_channels // groups, kernel_size[0] * kernel_size[1]
    )
    group_weight = group_weight[..., taps].reshape(
        groups, out_channels // groups, (in_channels // groups) * n_taps
    )
    out = torch.einsum("gok,ngkl->ngol", group_weight, columns)
    return out.reshape(batch, out_channels, out_h, out_w)


def _check_arguments(
    input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups
):
    """Raise ValueError naming the argument, what was expected and what came.

    Returns (H_out, W_out).
    """
    batch, in_channels, height, width = input.shape
    out_channels, weight_in_channels, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups must divide C_in and C_out, got groups={groups}, C_in={in_channels}, "
            f"C_out={out_channels}"
        )
    if weight_in_channels != in_channels // groups:
        raise ValueError(
            f"weight must be [C_out, C_in/groups, kh, kw] = [{out_channels}, "
            f"{in_channels // groups}, {kernel_h}, {kernel_w}], got {tuple(weight.shape)}"
        )
    if in_channels % offset_groups:
        raise ValueError(
            f"offset_groups must divide C_in, got offset_groups={offset_groups}, C_in={in_channels}"
        )
    out_h = conv_output_size(height, kernel_h, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(width, kernel_w, stride[1], padding[1], dilation[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"the output is empty: H_out={out_h}, W_out={out_w}")
    expected = {
        "offset": (batch, 2 * offset_groups * taps, out_h, out_w),
        "mask": (batch, offset_groups * taps, out_h, out_w),
        "bias": (out_channels,),
    }
    for name, tensor in (("offset", offset), ("mask", mask), ("bias", bias)):
        if tensor is not None and tuple(tensor.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(tensor.shape)}")
    for name, tensor in (("offset", offset), ("mask", mask), ("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype != input.dtype or tensor.device != input.device:
            raise ValueError(
                f"{name} must be {input.dtype} on {input.device} like input, "
                f"got {tensor.dtype} on {tensor.device}"
            )
    return out_h, out_w
