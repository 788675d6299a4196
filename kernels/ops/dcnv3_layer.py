"""InternImage's DCNv3 layer, parameterised by the core op it calls.

The contract's ``DCNv3`` module (``docs/ops-semantics.md``, "DCNv3 and DCNv4"),
as InternImage builds it, on channels-last input x [N, H, W, C], C = G·D:

1. x_proj = input_proj(x), Linear(C, C).
2. x1 = GELU(LayerNorm(dw_conv(x))): a depthwise Conv2d (kernel
   ``dw_kernel_size``, bias) and LayerNorm over C with eps 1e-6, InternImage's.
   The depthwise conv has the core's stride and is centred where the core's
   windows are: output pixel (ho, wo) of both is centred on input pixel
   (ho·stride_h − pad_h + half_h, likewise w), half = dilation·(k − 1) // 2;
   so its padding is (dw_kernel_size − 1) // 2 + pad − half (which must not
   be negative). With stride 1 and the default padding half ("same") that is
   InternImage's layer: padding (dw_kernel_size − 1) // 2, output H × W.
3. offset = Linear(C, G·P·2)(x1); mask logits = Linear(C, G·P)(x1): one row
   per output pixel.
4. out = core(x_proj, offset, mask logits, softmax=True) with the layer's
   stride and padding: the softmax over the P taps of each group fused into
   the core op (the same function as InternImage's softmax followed by its
   core op with the mask as given).
5. With ``center_feature_scale``: s = sigmoid(Linear(C, G)(x1)) per group,
   repeated over the group's D channels, out = out·(1 − s) + x_c·s, x_c the
   x_proj pixel at each window's centre (zero outside the map; x_proj itself
   with stride 1 and "same" padding: InternImage computes s from x1, and
   blends before the output projection).
6. output_proj(out), Linear(C, C).

``dcnv3_layer`` is the function of the input and the weights (a dict keyed by
``LAYER_WEIGHTS`` names), so every implementation of the harness's
``dcnv3_layer`` operator runs the very same weights; ``DCNv3Layer`` is the
``nn.Module`` holding them as parameters. ``core`` is any function with the
signature of ``kernels.reference.dcnv3.dcnv3``: the reference, the grid_sample
peer or ``functools.partial(kernels.ops.dcnv3.dcnv3, design=...)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from kernels import checks
from kernels.reference import dcnv3 as reference

LAYER_NORM_EPS = 1e-6


def layer_weight_shapes(channels: int, group: int, taps: int, dw_kernel_size: int,
                        center_feature_scale: bool) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight of the layer, in the order they are used."""
    shapes = {
        "input_proj_weight": (channels, channels),
        "input_proj_bias": (channels,),
        "dw_weight": (channels, 1, dw_kernel_size, dw_kernel_size),
        "dw_bias": (channels,),
        "norm_weight": (channels,),
        "norm_bias": (channels,),
        "offset_weight": (group * taps * 2, channels),
        "offset_bias": (group * taps * 2,),
        "mask_weight": (group * taps, channels),
        "mask_bias": (group * taps,),
        "output_proj_weight": (channels, channels),
        "output_proj_bias": (channels,),
    }
    if center_feature_scale:
        shapes.update(center_feature_scale_weight=(group, channels), center_feature_scale_bias=(group,))
    return shapes


LAYER_WEIGHTS = tuple(layer_weight_shapes(1, 1, 1, 1, True))


def dcnv3_layer(
    input: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    *,
    core: Callable[..., torch.Tensor] = reference.dcnv3,
    group: int,
    group_channels: int,
    kernel_h: int = 3,
    kernel_w: int = 3,
    stride_h: int = 1,
    stride_w: int = 1,
    pad_h: int | None = None,
    pad_w: int | None = None,
    dilation_h: int = 1,
    dilation_w: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    dw_kernel_size: int = 3,
) -> torch.Tensor:
    """The DCNv3 layer (module docstring) on ``input`` [N, H, W, group·group_channels].

    Args:
        weights: every tensor ``layer_weight_shapes`` names, of input's dtype
            and device; with ``center_feature_scale_weight`` [G, C] and
            ``center_feature_scale_bias`` [G] the centre-feature blend is on.
        core: the core op (``kernels.reference.dcnv3.dcnv3``'s signature).
        kernel_h, kernel_w (odd), stride_h, stride_w, pad_h, pad_w, dilation_h,
        dilation_w, offset_scale, remove_center: the core op's geometry; a
            padding of None is "same", dilation·(k − 1) // 2 (with stride 1 the
            output keeps H × W).
        dw_kernel_size: the depthwise convolution's (odd) kernel.

    Returns:
        [N, H_out, W_out, group·group_channels], H_out by the convolution
        formula (H with stride 1 and "same" padding).
    """
    return prepare_layer(
        input, weights, core=core, group=group, group_channels=group_channels,
        kernel_h=kernel_h, kernel_w=kernel_w, stride_h=stride_h, stride_w=stride_w,
        pad_h=pad_h, pad_w=pad_w, dilation_h=dilation_h, dilation_w=dilation_w,
        offset_scale=offset_scale, remove_center=remove_center, dw_kernel_size=dw_kernel_size,
    )()  # fmt: skip


def prepare_layer(
    input: torch.Tensor,
    weights: Mapping[str, torch.Tensor],
    *,
    core: Callable[..., torch.Tensor] = reference.dcnv3,
    group: int,
    group_channels: int,
    kernel_h: int = 3,
    kernel_w: int = 3,
    stride_h: int = 1,
    stride_w: int = 1,
    pad_h: int | None = None,
    pad_w: int | None = None,
    dilation_h: int = 1,
    dilation_w: int = 1,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    dw_kernel_size: int = 3,
) -> Callable[[], torch.Tensor]:
    """Check the arguments of :func:`dcnv3_layer` (the same ones) once; the returned
    call computes the layer with no checks (the harness's timed call). ``core`` is
    called on tensors right by construction: an unchecked core fits.
    """
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D [N, H, W, C], got shape {tuple(input.shape)}")
    for name, size in (("kernel_h", kernel_h), ("kernel_w", kernel_w), ("dw_kernel_size", dw_kernel_size)):
        if size < 1 or size % 2 == 0:
            raise ValueError(f"{name} must be odd and >= 1 (the windows and the depthwise "
                             f"conv are centred on a pixel), got {size}")
    channels = input.shape[3]
    half_h, half_w = dilation_h * (kernel_h - 1) // 2, dilation_w * (kernel_w - 1) // 2
    pad_h = half_h if pad_h is None else pad_h
    pad_w = half_w if pad_w is None else pad_w
    geometry = dict(kernel_h=kernel_h, kernel_w=kernel_w, stride_h=stride_h, stride_w=stride_w,
                    pad_h=pad_h, pad_w=pad_w, dilation_h=dilation_h, dilation_w=dilation_w,
                    offset_scale=offset_scale, remove_center=remove_center)
    taps = reference.Geometry(**geometry).taps
    # Where the windows' centres are relative to "same" padding.
    shift_h, shift_w = pad_h - half_h, pad_w - half_w
    dw_pad = ((dw_kernel_size - 1) // 2 + shift_h, (dw_kernel_size - 1) // 2 + shift_w)
    for name, value, pad, half in (("pad_h", dw_pad[0], pad_h, half_h),
                                   ("pad_w", dw_pad[1], pad_w, half_w)):
        if value < 0:
            raise ValueError(
                f"{name} must be >= dilation·(k − 1) // 2 − (dw_kernel_size − 1) // 2 = "
                f"{half - (dw_kernel_size - 1) // 2} (the depthwise conv, centred on the "
                f"windows, would need a negative padding), got {pad}"
            )
    with_scale = "center_feature_scale_weight" in weights
    expected = layer_weight_shapes(channels, group, taps, dw_kernel_size, with_scale)
    for name, shape in expected.items():
        if name not in weights:
            raise ValueError(f"weights has no {name!r}; expected {shape}")
        tensor = weights[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if tensor.dtype != input.dtype or tensor.device != input.device:
            raise ValueError(f"{name} must be {input.dtype} on {input.device} like input, "
                             f"got {tensor.dtype} on {tensor.device}")
    return functools.partial(_layer, input, dict(weights), core, group, group_channels,
                             geometry, dw_pad, (shift_h, shift_w), with_scale)


def _layer(input, w, core, group, group_channels, geometry, dw_pad, shift, with_scale):
    """The layer's steps (module docstring) on checked arguments."""
    channels = input.shape[3]
    x_proj = F.linear(input, w["input_proj_weight"], w["input_proj_bias"])
    x1 = F.conv2d(input.permute(0, 3, 1, 2), w["dw_weight"], w["dw_bias"],
                  stride=(geometry["stride_h"], geometry["stride_w"]), padding=dw_pad,
                  groups=channels).permute(0, 2, 3, 1)
    x1 = F.gelu(F.layer_norm(x1, (channels,), w["norm_weight"], w["norm_bias"], eps=LAYER_NORM_EPS))
    offset = F.linear(x1, w["offset_weight"], w["offset_bias"])
    mask_logits = F.linear(x1, w["mask_weight"], w["mask_bias"])
    out = core(x_proj.contiguous(), offset.contiguous(), mask_logits.contiguous(), group=group,
               group_channels=group_channels, softmax=True, **geometry)
    if with_scale:
        scale = torch.sigmoid(F.linear(x1, w["center_feature_scale_weight"],
                                       w["center_feature_scale_bias"]))
        scale = scale.repeat_interleave(group_channels, dim=-1)
        # x_proj at the windows' centres (F.pad crops where the shift is negative).
        shift_h, shift_w = shift
        centres = F.pad(x_proj, (0, 0, shift_w, shift_w, shift_h, shift_h))
        centres = centres[:, :: geometry["stride_h"], :: geometry["stride_w"]]
        centres = centres[:, : out.shape[1], : out.shape[2]]
        out = out * (1 - scale) + centres * scale
    return F.linear(out, w["output_proj_weight"], w["output_proj_bias"])


class DCNv3Layer(nn.Module):
    """InternImage's DCNv3 block as an ``nn.Module``; ``core`` picks the core op.

    Input [N, H, W, channels], channels = group·group_channels; output [N,
    H_out, W_out, channels] (H × W with the defaults: stride 1 and ``pad`` None,
    "same" padding, as InternImage's ``DCNv3(stride=1, pad=1)`` for 3 × 3). The
    weights are initialised as ``nn.Linear`` / ``nn.Conv2d`` / ``nn.LayerNorm``
    would be (not InternImage's zero offsets), so an untrained layer already
    deforms.
    """

    def __init__(self, channels: int, group: int, *, kernel_size: int = 3, stride: int = 1,
                 pad: int | None = None, dilation: int = 1, offset_scale: float = 1.0,
                 remove_center: bool = False, dw_kernel_size: int = 3,
                 center_feature_scale: bool = False,
                 core: Callable[..., torch.Tensor] = reference.dcnv3) -> None:
        super().__init__()
        channels, group = checks.as_int("channels", channels, 1), checks.as_int("group", group, 1)
        kernel_size = checks.as_int("kernel_size", kernel_size, 1)
        stride = checks.as_int("stride", stride, 1)
        pad = None if pad is None else checks.as_int("pad", pad, 0)
        dilation = checks.as_int("dilation", dilation, 1)
        offset_scale = checks.as_float("offset_scale", offset_scale)
        remove_center = checks.as_bool("remove_center", remove_center)
        dw_kernel_size = checks.as_int("dw_kernel_size", dw_kernel_size, 1)
        center_feature_scale = checks.as_bool("center_feature_scale", center_feature_scale)
        if channels % group:
            raise ValueError(f"group must divide channels, got channels={channels}, group={group}")
        self.core = core
        self.options = dict(group=group, group_channels=channels // group, kernel_h=kernel_size,
                            kernel_w=kernel_size, stride_h=stride, stride_w=stride, pad_h=pad,
                            pad_w=pad, dilation_h=dilation, dilation_w=dilation,
                            offset_scale=offset_scale, remove_center=remove_center,
                            dw_kernel_size=dw_kernel_size)
        taps = kernel_size * kernel_size - int(remove_center)
        shapes = layer_weight_shapes(channels, group, taps, dw_kernel_size, center_feature_scale)
        self.weights = nn.ParameterDict({name: nn.Parameter(torch.empty(shape))
                                         for name, shape in shapes.items()})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, weight in self.weights.items():
            if name == "norm_weight":
                nn.init.ones_(weight)
            elif name == "norm_bias":
                nn.init.zeros_(weight)
            else:  # U(±1/sqrt(fan_in)) for weights and biases, as nn.Linear's biases
                fan_in = self.weights[name.replace("_bias", "_weight")][0].numel()
                nn.init.uniform_(weight, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """input [N, H, W, channels] -> [N, H_out, W_out, channels]."""
        return dcnv3_layer(input, dict(self.weights), core=self.core, **self.options)
