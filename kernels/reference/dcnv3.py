"""Reference of ``dcnv3`` (InternImage's core op) and ``dcnv4`` (DCNv4's op).

Written straight from the contract (``docs/ops-semantics.md``, "DCNv3 and
DCNv4, channels-last"), in plain PyTorch so that it runs on any device and in
float64, and so that autograd of it *is* the reference gradient. Both
operators share one geometry (``Geometry``), one set of argument checks and
one sampling core; ``dcnv4`` only unpacks its fused ``offset_mask`` first.

1. Taps run column-major: p counts i over kernel_w (outer) and j over
   kernel_h (inner), skipping the centre tap when ``remove_center``;
   P = kh·kw (− 1 with ``remove_center``).
2. Group g, tap p reads (dx, dy) at offset channels g·P·2 + 2p and + 1 (x
   first) and its mask at g·P + p.
3. half_w = (dilation_w·(kw − 1)) // 2 and
   x = wo·stride_w − pad_w + half_w + (i·dilation_w − half_w + dx)·offset_scale,
   y likewise with j, dilation_h, kh.
4. Every channel of group g is read at (y, x) by the bilinear rule B0 (zero
   outside, ``kernels.reference.deform_conv2d.bilinear_b0``) on the unpadded
   input, multiplied by the tap's mask (softmax-normalised over the P taps of
   the group when ``softmax``) and summed over the taps.

Memory: autograd of B0 keeps about a dozen tensors of N·H_out·W_out·G·D·P
values. The work is split into chunks of images (and, when one image is too
big, of taps) of at most ``MAX_CHUNK_ELEMENTS`` sampled values, each run under
activation checkpointing, as in ``kernels.reference.deform_conv2d``; the
softmax runs on the whole mask first, since it spans every tap.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.utils.checkpoint import checkpoint

from kernels.reference.conv2d import conv_output_size
from kernels.reference.deform_conv2d import bilinear_b0

# Sampled values (images × output pixels × channels × taps) computed per chunk.
MAX_CHUNK_ELEMENTS = 2**24


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The sampling geometry shared by ``dcnv3``, ``dcnv4`` and their peers."""

    kernel_h: int = 3
    kernel_w: int = 3
    stride_h: int = 1
    stride_w: int = 1
    pad_h: int = 1
    pad_w: int = 1
    dilation_h: int = 1
    dilation_w: int = 1
    offset_scale: float = 1.0
    remove_center: bool = False

    def __post_init__(self) -> None:
        """Raise ValueError naming the first parameter no implementation can run."""
        minimums = {"kernel_h": 1, "kernel_w": 1, "stride_h": 1, "stride_w": 1,
                    "pad_h": 0, "pad_w": 0, "dilation_h": 1, "dilation_w": 1}
        for name, minimum in minimums.items():
            if getattr(self, name) < minimum:
                raise ValueError(f"parameter {name!r} must be >= {minimum}, got {getattr(self, name)}")
        if self.remove_center and (self.kernel_h % 2 == 0 or self.kernel_w % 2 == 0
                                   or self.kernel_h * self.kernel_w == 1):
            raise ValueError(
                "remove_center needs an odd kernel with a tap besides the centre: expected odd "
                f"kernel_h and kernel_w, not both 1, got kernel_h={self.kernel_h}, "
                f"kernel_w={self.kernel_w}"
            )
        if not math.isfinite(self.offset_scale):
            raise ValueError(f"parameter 'offset_scale' must be finite, got {self.offset_scale}")

    @classmethod
    def from_params(cls, params) -> Geometry:
        """The geometry named by a case's (or a call's) parameters; others are ignored."""
        return cls(**{field.name: params[field.name] for field in dataclasses.fields(cls)})

    @property
    def taps(self) -> int:
        """P: kernel_h·kernel_w, minus the centre with ``remove_center``."""
        return self.kernel_h * self.kernel_w - int(self.remove_center)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(H_out, W_out): the convolution formula (H + 2·pad − dilation·(k − 1) − 1) // stride + 1."""
        return (conv_output_size(height, self.kernel_h, self.stride_h, self.pad_h, self.dilation_h),
                conv_output_size(width, self.kernel_w, self.stride_w, self.pad_w, self.dilation_w))

    def tap_grid(self, *, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(tap_y, tap_x), each [P]: j·dilation_h − half_h and i·dilation_w − half_w of
        every tap, column-major (i over kernel_w outer, j over kernel_h inner),
        without the centre when ``remove_center``."""
        half_h = self.dilation_h * (self.kernel_h - 1) // 2
        half_w = self.dilation_w * (self.kernel_w - 1) // 2
        i = torch.arange(self.kernel_w, device=device).repeat_interleave(self.kernel_h)
        j = torch.arange(self.kernel_h, device=device).repeat(self.kernel_w)
        if self.remove_center:
            keep = (i != self.kernel_w // 2) | (j != self.kernel_h // 2)
            i, j = i[keep], j[keep]
        return ((j * self.dilation_h - half_h).to(dtype), (i * self.dilation_w - half_w).to(dtype))

    def window_origin(self, out_h: int, out_w: int, *, dtype: torch.dtype, device
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(base_y [H_out], base_x [W_out]): ho·stride_h − pad_h + half_h and
        wo·stride_w − pad_w + half_w, the undeformed centre of each window."""
        half_h = self.dilation_h * (self.kernel_h - 1) // 2
        half_w = self.dilation_w * (self.kernel_w - 1) // 2
        base_y = torch.arange(out_h, device=device) * self.stride_h - self.pad_h + half_h
        base_x = torch.arange(out_w, device=device) * self.stride_w - self.pad_w + half_w
        return base_y.to(dtype), base_x.to(dtype)

    def sample_positions(self, offset: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where every tap samples the input.

        Args:
            offset: [N, H_out, W_out, group·P·2], (dx, dy) per tap, x first.

        Returns:
            (y, x), each [N, H_out, W_out, group, P], in input pixels:
            x = base_x + (tap_x + dx)·offset_scale, y likewise.
        """
        batch, out_h, out_w, _ = offset.shape
        dx_dy = offset.reshape(batch, out_h, out_w, group, self.taps, 2)
        tap_y, tap_x = self.tap_grid(dtype=offset.dtype, device=offset.device)
        base_y, base_x = self.window_origin(out_h, out_w, dtype=offset.dtype, device=offset.device)
        x = base_x[None, None, :, None, None] + (tap_x + dx_dy[..., 0]) * self.offset_scale
        y = base_y[None, :, None, None, None] + (tap_y + dx_dy[..., 1]) * self.offset_scale
        return y, x


def offset_mask_channels(group: int, taps: int) -> int:
    """M, the last dimension of ``offset_mask``: group·P·3 rounded up to a multiple of 8."""
    return -(-group * taps * 3 // 8) * 8


def offset_mask_width(offset_mask: object, group: int, taps: int) -> int:
    """The width of ``offset_mask``'s last dimension, checked to hold the group·3P
    values that are read (any further columns are padding, ignored)."""
    if not isinstance(offset_mask, torch.Tensor) or offset_mask.dim() != 4:
        return offset_mask_channels(group, taps)  # the shape check names the problem
    width, needed = offset_mask.shape[-1], group * 3 * taps
    if width < needed:
        raise ValueError(
            f"offset_mask must have at least group·3·P = {group}·3·{taps} = {needed} columns in "
            f"its last dimension (usually ceil(group·3·P / 8)·8 = "
            f"{offset_mask_channels(group, taps)}), got shape {tuple(offset_mask.shape)}"
        )
    return width


def unpack_offset_mask(offset_mask: torch.Tensor, group: int, taps: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split DCNv4's ``offset_mask`` [N, H_out, W_out, M] into dcnv3's
    ``offset`` [N, H_out, W_out, group·P·2] and ``mask`` [N, H_out, W_out, group·P].

    Group g holds (dx, dy) of tap p at g·3P + 2p and + 1, then the mask of tap
    p at g·3P + 2P + p; the columns from group·3P on are padding, ignored.
    """
    batch, out_h, out_w, _ = offset_mask.shape
    per_group = offset_mask[..., : group * 3 * taps].reshape(batch, out_h, out_w, group, 3 * taps)
    offset = per_group[..., : 2 * taps].reshape(batch, out_h, out_w, group * 2 * taps)
    mask = per_group[..., 2 * taps:].reshape(batch, out_h, out_w, group * taps)
    return offset, mask


def check_arguments(input: torch.Tensor, others: dict[str, tuple[torch.Tensor, int]],
                    geometry: Geometry, group: int, group_channels: int) -> tuple[int, int]:
    """Raise ValueError naming the argument, what was expected and what came.

    ``others`` maps each per-pixel tensor's name to (tensor, expected last
    dimension). Every tensor must be a 4-D (channels-last) tensor of input's
    dtype and device, of any strides. N = 0 and group_channels = 0 are
    allowed (an empty output, zero gradients). Returns (H_out, W_out).
    """
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    if group_channels < 0:
        raise ValueError(f"group_channels must be >= 0, got {group_channels}")
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D [N, H, W, group·group_channels], got shape {tuple(input.shape)}")
    batch, height, width, channels = input.shape
    if channels != group * group_channels:
        raise ValueError(
            f"input must have group·group_channels = {group}·{group_channels} = "
            f"{group * group_channels} channels in its last dimension, got shape {tuple(input.shape)}"
        )
    out_h, out_w = geometry.output_size(height, width)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"the output is empty: H_out={out_h}, W_out={out_w} for input "
                         f"{tuple(input.shape)}")
    for name, (tensor, last) in others.items():
        expected = (batch, out_h, out_w, last)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} must have shape [N, H_out, W_out, {last}] = {expected}, "
                             f"got {tuple(tensor.shape)}")
        if tensor.dtype != input.dtype or tensor.device != input.device:
            raise ValueError(f"{name} must be {input.dtype} on {input.device} like input, "
                             f"got {tensor.dtype} on {tensor.device}")
    return out_h, out_w


def dcnv3(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    *,
    kernel_h: int = 3,
    kernel_w: int = 3,
    stride_h: int = 1,
    stride_w: int = 1,
    pad_h: int = 1,
    pad_w: int = 1,
    dilation_h: int = 1,
    dilation_w: int = 1,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    softmax: bool = False,
) -> torch.Tensor:
    """InternImage's DCNv3 core op, channels-last, in the dtype of its arguments.

    out[n, ho, wo, g·D + d] = Σ_p m(g, p) · B0(input[..., g·D + d], y, x), with
    m the mask as given, or its softmax over the P taps of group g when
    ``softmax``.

    Args:
        input: [N, H, W, group·group_channels].
        offset: [N, H_out, W_out, group·P·2]; (dx, dy) of tap p of group g at
            g·P·2 + 2p and + 1.
        mask: [N, H_out, W_out, group·P]; tap p of group g at g·P + p.
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
        dilation_w, offset_scale, remove_center: the geometry (``Geometry``).
        group, group_channels: G and D.
        softmax: normalise the mask over the taps of each group first.

    Returns:
        [N, H_out, W_out, group·group_channels], H_out and W_out by the
        convolution formula.
    """
    geometry = Geometry(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                        dilation_h, dilation_w, offset_scale, remove_center)
    taps = geometry.taps
    check_arguments(input, {"offset": (offset, group * taps * 2), "mask": (mask, group * taps)},
                    geometry, group, group_channels)
    return _sample_and_sum(input, offset, mask, geometry, group, softmax)


def dcnv4(
    input: torch.Tensor,
    offset_mask: torch.Tensor,
    *,
    kernel_h: int = 3,
    kernel_w: int = 3,
    stride_h: int = 1,
    stride_w: int = 1,
    pad_h: int = 1,
    pad_w: int = 1,
    dilation_h: int = 1,
    dilation_w: int = 1,
    group: int,
    group_channels: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> torch.Tensor:
    """DCNv4's op: ``dcnv3`` (mask as given, no softmax) on a fused ``offset_mask``.

    Args:
        input: [N, H, W, group·group_channels].
        offset_mask: [N, H_out, W_out, M], M ≥ group·3·P (DCNv4 pads it to
            ceil(group·P·3 / 8)·8); group g holds (dx, dy) of tap p at g·3P + 2p
            and + 1 and the mask of tap p at g·3P + 2P + p; columns from
            group·3P on are ignored.
        The other arguments as ``dcnv3``.

    Returns:
        [N, H_out, W_out, group·group_channels].
    """
    geometry = Geometry(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                        dilation_h, dilation_w, offset_scale, remove_center)
    taps = geometry.taps
    width = offset_mask_width(offset_mask, group, taps)
    check_arguments(input, {"offset_mask": (offset_mask, width)}, geometry, group, group_channels)
    offset, mask = unpack_offset_mask(offset_mask, group, taps)
    return _sample_and_sum(input, offset, mask, geometry, group, softmax=False)


def _sample_and_sum(input, offset, mask, geometry: Geometry, group: int, softmax: bool):
    """The shared core on checked arguments; chunked as the module docstring says."""
    batch, _, _, channels = input.shape
    _, out_h, out_w, _ = offset.shape
    taps = geometry.taps
    y, x = geometry.sample_positions(offset, group)  # [N, H_out, W_out, G, P]
    weights = mask.reshape(batch, out_h, out_w, group, taps)
    if softmax:
        weights = torch.softmax(weights, dim=-1)
    per_image = max(out_h * out_w * channels * taps, taps)
    images_per_chunk = max(1, MAX_CHUNK_ELEMENTS // per_image)
    taps_per_chunk = taps if images_per_chunk > 1 else max(1, MAX_CHUNK_ELEMENTS // (per_image // taps))
    outputs = []
    # At least one chunk, empty for N = 0 (so that torch.cat has a tensor).
    for first in range(0, max(batch, 1), images_per_chunk):
        images = slice(first, first + images_per_chunk)
        out = 0
        for first_tap in range(0, taps, taps_per_chunk):
            chunk = slice(first_tap, first_tap + taps_per_chunk)
            out = out + checkpoint(_partial_output, input[images], y[images, ..., chunk],
                                   x[images, ..., chunk], weights[images, ..., chunk], group,
                                   use_reentrant=False, preserve_rng_state=False)
        outputs.append(out)
    return torch.cat(outputs)


def _partial_output(input, y, x, weights, group):
    """Σ over the given taps of weight · B0(input, y, x).

    input [n, H, W, G·D]; y, x, weights [n, H_out, W_out, G, p]. Returns
    [n, H_out, W_out, G·D].
    """
    batch, height, width, channels = input.shape
    grouped = input.reshape(batch, height, width, group, channels // group).permute(0, 3, 4, 1, 2)

    def group_major(t):  # [n, H_out, W_out, G, p] -> [n, G, H_out, W_out, p]
        return t.permute(0, 3, 1, 2, 4)

    sampled = bilinear_b0(grouped, group_major(y), group_major(x))  # [n, G, D, H_out, W_out, p]
    out = (sampled * group_major(weights)[:, :, None]).sum(-1)  # [n, G, D, H_out, W_out]
    return out.permute(0, 3, 4, 1, 2).reshape(batch, *out.shape[3:5], channels)
