"""Our DCNv1 / DCNv2 kernels: ``deform_conv2d`` and ``modulated_deform_conv2d``.

Semantics: ``shared/ops-semantics.md`` (those of ``torchvision.ops.deform_conv2d``),
NCHW, float32 / float16 / bfloat16 with float32 accumulation, and float64 (in
double throughout, for ``torch.autograd.gradcheck``). Design notes and
what to measure: ``docs/kernels/deform_conv2d.md``.

Forward, per chunk of samples: ``deform_im2col`` (``kernels/cuda/deform_conv2d.cu``)
builds columns [chunk, C_in·kh·kw, H_out·W_out] in the input dtype, then one
strided-batched cuBLAS GEMM per weight group (stride-0 weight batch) writes the
output in place, bias fused as the GEMM's C operand.

Backward, per chunk: the transposed-weight GEMM gives grad_columns, the fused
``deform_col2im`` scatters grad_input (float32 atomics; under
``torch.use_deterministic_algorithms(True)`` fixed-point int64 atomics, bit-
reproducible, see ``kernels/determinism.py``) and reduces
grad_offset / grad_mask; for grad_weight the columns are rebuilt (cheaper than
keeping them from the forward) and multiplied by grad_output with a float32
result; grad_bias is a float32 sum of grad_output. Only requested gradients are
computed.

That is the default design, ``design="im2col"``. ``design="implicit_gemm"``
(``kernels/cuda/deform_conv2d_implicit_gemm.cu``) gathers the columns straight
into the shared-memory tiles of its own GEMM kernels (tensor cores for half
types, SIMT for float32 / float64): forward, grad_weight as one GEMM over every
pixel of the batch, and grad_columns tile by tile fused with the scatter and
the offset / mask gradients; no columns buffer, no cuBLAS.

The im2col design's GEMMs run through ``torch.bmm`` / ``torch.baddbmm`` (cuBLAS on a GPU) and
follow PyTorch's global flags: ``torch.backends.cuda.matmul.allow_tf32`` for
float32 and ``allow_fp16_reduced_precision_reduction`` /
``allow_bf16_reduced_precision_reduction`` for half types. We never change
them: the caller decides, and the contract's float32 accumulation needs all
three off (split-K partial sums otherwise round to TF32 / half).

On a CPU tensor everything runs the same way, the kernels through
``kernels.emulator``: for correctness checks, never for timing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from kernels import determinism, launch
from kernels.checks import (
    as_bool,
    as_int,
    check_pair,
    check_shape,
    check_tensor,
    conv_groups,
    offset_groups_from,
)
from kernels.cuda_sources import COMPILE_OPTIONS, CudaSource, register

__all__ = [
    "DeformConv2d",
    "ModulatedDeformConv2d",
    "deform_conv2d",
    "modulated_deform_conv2d",
    "prepare",
]

# Threads per block of both kernels; the .cu file gets it as a macro so its
# __launch_bounds__ and our grids cannot disagree.
BLOCK_SIZE = 256
# Scratch (columns, float32 accumulators) per chunk of samples; the batch is
# processed in chunks that fit, so any N works.
WORKSPACE_BUDGET_BYTES = 256 * 2**20

_CTYPES = {
    torch.float32: "float",
    torch.float16: "__half",
    torch.bfloat16: "__nv_bfloat16",
    torch.float64: "double",
}
SUPPORTED_DTYPES = tuple(_CTYPES)
_KERNELS = ("deform_im2col", "deform_col2im")


def _name_expression(kernel: str, dtype: torch.dtype, has_mask: bool) -> str:
    return f"{kernel}<{_CTYPES[dtype]}, {'true' if has_mask else 'false'}>"


SOURCE = register(
    CudaSource(
        filename="deform_conv2d.cu",
        name_expressions=tuple(
            _name_expression(kernel, dtype, has_mask)
            for kernel in _KERNELS
            for dtype in SUPPORTED_DTYPES
            for has_mask in (False, True)
        ),
        block_sizes=dict.fromkeys(_KERNELS, BLOCK_SIZE),
        options=(*COMPILE_OPTIONS, f"-DDEFORM_CONV_BLOCK_SIZE={BLOCK_SIZE}"),
    )
)

# The implicit GEMM design (deform_conv2d_implicit_gemm.cu): blocks of 256
# threads computing output tiles of 64 pixels (or (channel, tap) rows,
# grad_weight: the taps of a chunk of up to the point table's 9, 5 in float64)
# by 128 output channels (forward, grad_weight) or 128 (channel, tap) rows
# (grad_sampling; 64 in float64), whose epilogue gives each of a pixel's 4
# threads some taps (or, below 4 taps, a part of the channels), each with its
# own partial sums.
DESIGNS = ("im2col", "implicit_gemm")
IMPLICIT_GEMM_THREADS = 256
IMPLICIT_GEMM_TILE = 64
IMPLICIT_GEMM_GATHER_ROWS = 128
IMPLICIT_GEMM_EPILOGUE_SPLIT = IMPLICIT_GEMM_THREADS // IMPLICIT_GEMM_TILE
_IMPLICIT_GEMM_KERNELS = (
    "implicit_gemm_forward",
    "implicit_gemm_backward_weight",
    "implicit_gemm_backward_sampling",
)


def _implicit_gemm_name(kernel: str, dtype: torch.dtype, has_mask: bool, tf32: bool) -> str:
    """The kernel's instantiation; TF32 only for float32 (a third template argument)."""
    name = _name_expression(kernel, dtype, has_mask)
    return f"{name[:-1]}, true>" if tf32 and dtype == torch.float32 else name


IMPLICIT_GEMM_SOURCE = register(
    CudaSource(
        filename="deform_conv2d_implicit_gemm.cu",
        name_expressions=tuple(
            _implicit_gemm_name(kernel, dtype, has_mask, tf32)
            for kernel in _IMPLICIT_GEMM_KERNELS
            for dtype in SUPPORTED_DTYPES
            for has_mask in (False, True)
            for tf32 in ((False, True) if dtype == torch.float32 else (False,))
        ),
        block_sizes=dict.fromkeys(_IMPLICIT_GEMM_KERNELS, IMPLICIT_GEMM_THREADS),
        options=(*COMPILE_OPTIONS, f"-DIMPLICIT_GEMM_THREADS={IMPLICIT_GEMM_THREADS}"),
    )
)


# --------------------------------------------------------------------------- #
# Argument checking.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Every size of one call, checked against the contract."""

    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    offset_groups: int
    out_h: int
    out_w: int

    @property
    def taps(self) -> int:
        return self.kernel_h * self.kernel_w

    @property
    def pixels(self) -> int:
        return self.out_h * self.out_w

    @property
    def group_columns(self) -> int:
        """Rows of one weight group's columns: (C_in/groups)·kh·kw."""
        return self.in_channels // self.groups * self.taps

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_channels, self.out_h, self.out_w)


def check_arguments(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int | None,
    offset_groups: int | None,
) -> Geometry:
    """Check every argument against the contract; return the call's sizes.

    Each error names the argument, what was expected and what was given.
    ``groups=None`` infers it from weight's channels, ``offset_groups=None``
    from offset's, as torchvision does.
    """
    check_tensor("input", input, 4)
    check_tensor("offset", offset, 4)
    check_tensor("weight", weight, 4)
    if mask is not None:
        check_tensor("mask", mask, 4)
    if bias is not None:
        check_tensor("bias", bias, 1)
    stride_hw = check_pair("stride", stride, 1)
    padding_hw = check_pair("padding", padding, 0)
    dilation_hw = check_pair("dilation", dilation, 1)

    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"input has dtype {input.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}"
        )
    if input.device.type not in ("cuda", "cpu"):
        raise ValueError(f"input is on {input.device}; supported: CUDA, or CPU (emulated)")
    for name, tensor in (("offset", offset), ("mask", mask), ("weight", weight), ("bias", bias)):
        if tensor is None:
            continue
        if tensor.dtype != input.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype}, expected input's dtype {input.dtype}"
            )
        if tensor.device != input.device:
            raise ValueError(
                f"{name} is on {tensor.device}, expected input's device {input.device}"
            )

    batch, in_channels, height, width = input.shape
    out_channels, weight_channels, kernel_h, kernel_w = weight.shape
    groups = conv_groups(groups, in_channels, weight)
    if in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups={groups} must divide input's channels ({in_channels}) and weight's "
            f"output channels ({out_channels})"
        )
    # Empty batches and channels are fine (an empty output, zero gradients).
    if min(height, width, kernel_h, kernel_w) < 1:
        raise ValueError(
            f"input {tuple(input.shape)} and weight {tuple(weight.shape)} must have non-empty "
            "spatial and kernel sizes"
        )
    if weight_channels * groups != in_channels:
        raise ValueError(
            f"weight must have shape ({out_channels}, {in_channels // groups}, {kernel_h}, {kernel_w}) "
            f"(C_in/groups = {in_channels}/{groups} input channels), got {tuple(weight.shape)}"
        )
    out_h = (height + 2 * padding_hw[0] - dilation_hw[0] * (kernel_h - 1) - 1) // stride_hw[0] + 1
    out_w = (width + 2 * padding_hw[1] - dilation_hw[1] * (kernel_w - 1) - 1) // stride_hw[1] + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"the output would be {out_h}x{out_w}: input {height}x{width} is smaller than the "
            f"dilated {kernel_h}x{kernel_w} kernel with padding {padding_hw}"
        )

    taps = kernel_h * kernel_w
    offset_groups = offset_groups_from(offset_groups, offset, taps)
    if in_channels % offset_groups:
        raise ValueError(
            f"offset_groups={offset_groups} must divide input's channels ({in_channels})"
        )
    check_shape(
        "offset",
        offset,
        (batch, 2 * offset_groups * taps, out_h, out_w),
        f"N, 2·offset_groups·kh·kw with offset_groups={offset_groups}, H_out, W_out",
    )
    if mask is not None:
        check_shape(
            "mask",
            mask,
            (batch, offset_groups * taps, out_h, out_w),
            f"N, offset_groups·kh·kw with offset_groups={offset_groups}, H_out, W_out",
        )
    if bias is not None:
        check_shape("bias", bias, (out_channels,), "C_out")
    # 32-bit indices inside the kernels (see the .cu header).
    if height * width > launch.INT32_MAX:
        raise ValueError(f"input planes of {height}x{width} exceed 2^31 elements")
    if 2 * offset_groups * taps * out_h * out_w > launch.INT32_MAX:
        raise ValueError(f"offset {tuple(offset.shape)} exceeds 2^31 elements per sample")
    return Geometry(
        batch=batch,
        in_channels=in_channels,
        height=height,
        width=width,
        out_channels=out_channels,
        kernel_h=kernel_h,
        kernel_w=kernel_w,
        stride=stride_hw,
        padding=padding_hw,
        dilation=dilation_hw,
        groups=groups,
        offset_groups=offset_groups,
        out_h=out_h,
        out_w=out_w,
    )


# --------------------------------------------------------------------------- #
# Launch configuration.
# --------------------------------------------------------------------------- #


def _channel_slicing(g: Geometry, samples: int, device: torch.device) -> launch.Slicing:
    """Slices of an offset group's channels over the (sample, offset group,
    tap, pixel) items; the slice count times the items must stay an int."""
    per_slice_items = g.offset_groups * g.taps * g.pixels
    return launch.channel_slicing(g.in_channels // g.offset_groups, samples * per_slice_items,
                                  device, max_slices=launch.INT32_MAX // per_slice_items)


def _chunk_size(g: Geometry, bytes_per_sample: int) -> int:
    """Samples per chunk: as many as the workspace budget holds (at least 1,
    at most the grid's y limit, since blockIdx.y is the sample)."""
    chunk = max(1, WORKSPACE_BUDGET_BYTES // max(bytes_per_sample, 1))
    return min(chunk, max(g.batch, 1), launch.MAX_GRID_DIM[1])


def _launch_sampling_kernel(
    kernel: launch.Kernel,
    g: Geometry,
    samples: int,
    slicing: launch.Slicing,
    tensors: Sequence[object],
) -> None:
    """Launches ``kernel`` with ``tensors`` (pointer and scale arguments) then the geometry."""
    items = g.offset_groups * slicing.slices * g.taps * g.pixels
    geometry = (
        g.in_channels,
        g.height,
        g.width,
        g.kernel_h,
        g.kernel_w,
        *g.stride,
        *g.padding,
        *g.dilation,
        g.offset_groups,
        g.out_h,
        g.out_w,
        slicing.channels_per_thread,
        slicing.slices,
    )
    kernel(
        (launch.blocks(items, BLOCK_SIZE), samples),
        BLOCK_SIZE,
        (*tensors, *(launch.int32(v) for v in geometry)),
    )


def _im2col(
    g: Geometry,
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    columns: torch.Tensor,
) -> None:
    """columns [n, C_in·kh·kw, H_out·W_out] of the samples in input/offset/mask."""
    samples = input.shape[0]
    has_mask = mask is not None
    kernel = launch.module(SOURCE, input.device).function(
        _name_expression("deform_im2col", input.dtype, has_mask)
    )
    if not has_mask:
        mask = launch.null(input.dtype, input.device)  # unread without HAS_MASK
    slicing = _channel_slicing(g, samples, input.device)
    _launch_sampling_kernel(kernel, g, samples, slicing, (input, offset, mask, columns))


# --------------------------------------------------------------------------- #
# Forward and backward on already checked, contiguous tensors.
# --------------------------------------------------------------------------- #


def _forward_into(
    out: torch.Tensor,
    g: Geometry,
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> None:
    group_out = g.out_channels // g.groups
    chunk = _chunk_size(g, g.in_channels * g.taps * g.pixels * input.element_size())
    columns = launch.new_output(
        (chunk, g.in_channels * g.taps, g.pixels), input.dtype, input.device
    )
    weights = weight.view(g.groups, group_out, g.group_columns)
    for start in range(0, g.batch, chunk):
        stop = min(start + chunk, g.batch)
        samples = stop - start
        cols = columns[:samples]
        _im2col(
            g,
            input[start:stop],
            offset[start:stop],
            mask if mask is None else mask[start:stop],
            cols,
        )
        cols_by_group = cols.view(samples, g.groups, g.group_columns, g.pixels)
        out_by_group = out[start:stop].view(samples, g.groups, group_out, g.pixels)
        for group in range(g.groups):
            # The weight expanded with batch stride 0 (a view): one strided-batched GEMM.
            w = weights[group].expand(samples, group_out, g.group_columns)
            if bias is None:
                torch.bmm(w, cols_by_group[:, group], out=out_by_group[:, group])
            else:
                # The bias as C with beta = 1: added in float32 before the one rounding.
                bias_rows = bias[group * group_out : (group + 1) * group_out].view(group_out, 1)
                torch.baddbmm(bias_rows, w, cols_by_group[:, group], out=out_by_group[:, group])


def _forward(
    g: Geometry,
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    design: str,
    allow_tf32: bool,
) -> torch.Tensor:
    out = launch.new_output(g.output_shape, input.dtype, input.device)
    _forward_into_design(out, g, input, offset, mask, weight, bias, design, allow_tf32)
    return out


def _forward_into_design(out, g, input, offset, mask, weight, bias, design, allow_tf32) -> None:
    if design == "implicit_gemm":
        _forward_implicit_gemm(out, g, input, offset, mask, weight, bias, allow_tf32)
    else:
        _forward_into(out, g, input, offset, mask, weight, bias)


# --------------------------------------------------------------------------- #
# The implicit GEMM design: no columns buffer (deform_conv2d_implicit_gemm.cu).
# --------------------------------------------------------------------------- #


def _implicit_gemm_geometry(g: Geometry) -> tuple:
    """The kernels' trailing int arguments, in their order."""
    return tuple(
        launch.int32(v)
        for v in (
            g.in_channels, g.height, g.width, g.kernel_h, g.kernel_w, *g.stride, *g.padding,
            *g.dilation, g.groups, g.offset_groups, g.out_h, g.out_w, g.out_channels, g.batch,
        )
    )  # fmt: skip


def _implicit_gemm_kernel(
    kernel: str, input: torch.Tensor, has_mask: bool, allow_tf32: bool
) -> launch.Kernel:
    return launch.module(IMPLICIT_GEMM_SOURCE, input.device).function(
        _implicit_gemm_name(kernel, input.dtype, has_mask, allow_tf32)
    )


def _tiles(n: int) -> int:
    return launch.blocks(n, IMPLICIT_GEMM_TILE)


def _forward_implicit_gemm(
    out: torch.Tensor,
    g: Geometry,
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    allow_tf32: bool,
) -> None:
    """One implicit GEMM per launch over all N·H_out·W_out pixels (grid z: weight group)."""
    if out.numel() == 0:
        return
    null = launch.null(input.dtype, input.device)
    grid = (
        _tiles(g.batch * g.pixels),
        launch.blocks(g.out_channels // g.groups, IMPLICIT_GEMM_GATHER_ROWS),
        g.groups,
    )
    _implicit_gemm_kernel("implicit_gemm_forward", input, mask is not None, allow_tf32)(
        grid,
        IMPLICIT_GEMM_THREADS,
        (
            input,
            offset,
            null if mask is None else mask,
            weight,
            null if bias is None else bias,
            out,
            *_implicit_gemm_geometry(g),
        ),
    )


def _row_blocks(g: Geometry, block_rows: int, most_taps: int) -> tuple[int, int, int]:
    """Blocks of ``block_rows`` (channel, tap) rows, taps fastest, as grad_weight's and
    grad_sampling's kernels derive them: (channel blocks, tap chunks, taps of the last
    chunk) for chunks of min(kh·kw, ``most_taps``) taps."""
    chunk_taps = min(g.taps, most_taps)
    tap_chunks = launch.blocks(g.taps, chunk_taps)
    channel_blocks = launch.blocks(g.in_channels // g.groups, block_rows // chunk_taps)
    return channel_blocks, tap_chunks, g.taps - (tap_chunks - 1) * chunk_taps


def _sampling_blocks(g: Geometry, dtype: torch.dtype) -> tuple[int, int, int]:
    """grad_sampling's blocks of (channel, tap) rows: (channel blocks, tap chunks,
    partial-sum slices per channel block), as the kernel derives them."""
    rows = 64 if dtype == torch.float64 else 128  # the kernel's sampling_rows()
    channel_blocks, tap_chunks, last_chunk = _row_blocks(g, rows, rows)
    return channel_blocks, tap_chunks, max(1, IMPLICIT_GEMM_EPILOGUE_SPLIT // last_chunk)


def _weight_blocks(g: Geometry, dtype: torch.dtype) -> int:
    """grad_weight's blocks of (channel, tap) rows, per block of output channels and
    weight group: channel blocks times tap chunks, as the kernel derives them."""
    table_taps = 5 if dtype == torch.float64 else 9  # the kernel's PointTable::TAPS
    channel_blocks, tap_chunks, _ = _row_blocks(g, IMPLICIT_GEMM_TILE, table_taps)
    return channel_blocks * tap_chunks


def _column_bound(weight: torch.Tensor, g: Geometry, grad_output: torch.Tensor) -> float:
    """A bound on |grad_columns| = |W_gᵀ · grad_output|: max|grad_output| times the
    largest sum of |W| over one group's output channels (for the fixed-point scale)."""
    per_column = weight.abs().view(g.groups, g.out_channels // g.groups, -1).sum(1)
    return determinism.max_abs(grad_output) * determinism.max_abs(per_column)


def _backward_implicit_gemm(
    g: Geometry,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    output_mask: Sequence[bool],
    allow_tf32: bool,
) -> tuple[torch.Tensor, ...]:
    """Gradients (input, offset, mask, weight, bias) as :func:`_backward_im2col`, with the
    grad_sampling kernel (grad_columns tile by tile, scattered at once) and the
    grad_weight kernel (one GEMM over every pixel); no columns in memory."""
    want_input, want_offset, want_mask, want_weight, want_bias = output_mask
    want_mask = want_mask and mask is not None
    dtype, device = input.dtype, input.device
    accumulate = accumulate_dtype(dtype)
    has_mask = mask is not None
    kernel_mask = mask if has_mask else launch.null(dtype, device)
    group_channels = g.in_channels // g.groups
    geometry = _implicit_gemm_geometry(g)
    launches = g.batch * g.pixels > 0 and group_channels > 0

    def empty() -> torch.Tensor:  # a fresh one each: op outputs must not alias
        return input.new_empty(0)

    grad_input = torch.zeros_like(input) if want_input else empty()
    grad_offset = torch.zeros_like(offset) if want_offset else empty()
    grad_mask = torch.zeros_like(mask) if want_mask else empty()
    if launches and (want_input or want_offset or want_mask):
        fixed_sums = None
        fixed_args = determinism.FixedPointSum.unused(device)
        if not want_input:
            accumulator = launch.null(accumulate, device)  # the kernel skips the scatter
        elif determinism.enabled():
            accumulator = launch.null(accumulate, device)
            # Each (tap, pixel) adds at most one value (weight ≤ 1 times mask times
            # grad_column) to an input element.
            fixed_sums = determinism.FixedPointSum(
                input.shape,
                device,
                max_abs=_column_bound(weight, g, grad_output) * determinism.max_abs(mask),
                max_addends=g.taps * g.pixels,
            )
            fixed_args = fixed_sums.kernel_args()
        elif dtype == accumulate:
            accumulator = grad_input
        else:  # float32 atomics for half types, rounded once below
            accumulator = torch.zeros(input.shape, dtype=torch.float32, device=device)
        # Zeros: a slice writes only the offset groups of its channels.
        channel_blocks, tap_chunks, slice_parts = _sampling_blocks(g, dtype)
        slices = g.groups * channel_blocks * slice_parts
        offset_partial = torch.zeros((slices, *offset.shape), dtype=accumulate, device=device)
        mask_partial = (
            torch.zeros((slices, *mask.shape), dtype=accumulate, device=device)
            if has_mask
            else launch.null(accumulate, device)
        )
        grid = (_tiles(g.batch * g.pixels), channel_blocks * tap_chunks, g.groups)
        _implicit_gemm_kernel("implicit_gemm_backward_sampling", input, has_mask, allow_tf32)(
            grid,
            IMPLICIT_GEMM_THREADS,
            (
                input, offset, kernel_mask, weight, grad_output, accumulator, *fixed_args,
                offset_partial, mask_partial, *geometry,
            ),
        )  # fmt: skip
        if fixed_sums is not None:
            grad_input.copy_(fixed_sums.result(dtype))
        elif want_input and accumulator is not grad_input:
            grad_input.copy_(accumulator)
        if want_offset:
            grad_offset.copy_(_sum_slices(offset_partial))
        if want_mask:
            grad_mask.copy_(_sum_slices(mask_partial))

    grad_weight = empty()
    if want_weight:
        grad_weight = launch.new_output(weight.shape, dtype, device)
        group_out = g.out_channels // g.groups
        if grad_weight.numel() > 0:
            grid = (
                _weight_blocks(g, dtype),
                launch.blocks(group_out, IMPLICIT_GEMM_GATHER_ROWS),
                g.groups,
            )
            _implicit_gemm_kernel("implicit_gemm_backward_weight", input, has_mask, allow_tf32)(
                grid,
                IMPLICIT_GEMM_THREADS,
                (input, offset, kernel_mask, grad_output, grad_weight, *geometry),
            )
    grad_bias = (
        grad_output.sum(dim=(0, 2, 3), dtype=accumulate).to(dtype) if want_bias else empty()
    )
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels compute and accumulate in: float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _accumulating_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a @ b with a float32 result, accumulated in float32 (float64: as is).

    cuBLAS takes half inputs with a float32 output directly; PyTorch's CPU
    backend has no such kernel, so there the operands are widened (exact).
    """
    if a.dtype in (torch.float32, torch.float64):
        return torch.bmm(a, b)
    if a.is_cuda:
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def _sum_slices(partial: torch.Tensor) -> torch.Tensor:
    """Sum of the channel slices' partial offset / mask gradients (accumulate_dtype)."""
    return partial[0] if partial.shape[0] == 1 else partial.sum(0)


def _backward_im2col(
    g: Geometry,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    output_mask: Sequence[bool],
) -> tuple[torch.Tensor, ...]:
    """Gradients (input, offset, mask, weight, bias); an empty tensor for each
    one ``output_mask`` does not ask for."""
    want_input, want_offset, want_mask, want_weight, want_bias = output_mask
    want_mask = want_mask and mask is not None
    want_sampling = want_input or want_offset or want_mask
    dtype, device = input.dtype, input.device
    accumulate = accumulate_dtype(dtype)
    group_out = g.out_channels // g.groups

    def empty() -> torch.Tensor:  # a fresh one each: op outputs must not alias
        return input.new_empty(0)

    # Per sample: the columns (reused: grad_columns, then the rebuilt
    # columns), the float32 grad_input accumulator for half types, and one
    # group's float32 grad_weight partial product.
    deterministic = want_input and determinism.enabled()
    bytes_per_sample = g.in_channels * g.taps * g.pixels * input.element_size()
    if deterministic:
        bytes_per_sample += g.in_channels * g.height * g.width * 8
    elif want_input and dtype != accumulate:
        bytes_per_sample += g.in_channels * g.height * g.width * 4
    if want_weight:
        bytes_per_sample += group_out * g.group_columns * 4
    chunk = _chunk_size(g, bytes_per_sample)
    columns = launch.new_output((chunk, g.in_channels * g.taps, g.pixels), dtype, device)
    weights = weight.view(g.groups, group_out, g.group_columns)

    # grad_input accumulates with float32 atomics: into grad_input itself for
    # float32, else into a per-chunk float32 buffer rounded once at the end of
    # the chunk (half-precision atomics would round at every one of the many
    # additions, and small contributions would vanish against large sums).
    # Under torch.use_deterministic_algorithms(True): into per-chunk
    # fixed-point sums instead (kernels/determinism.py).
    input_accumulator = None
    if not want_input:
        grad_input = empty()
    elif deterministic:
        grad_input = launch.new_output(input.shape, dtype, device)
    elif dtype == accumulate:
        grad_input = torch.zeros_like(input)
    else:
        grad_input = launch.new_output(input.shape, dtype, device)
        input_accumulator = torch.zeros(
            (chunk, g.in_channels, g.height, g.width), dtype=torch.float32, device=device
        )
    grad_offset = launch.new_output(offset.shape, dtype, device) if want_offset else empty()
    grad_mask = launch.new_output(mask.shape, dtype, device) if want_mask else empty()
    weight_accumulator = (
        torch.zeros((g.groups, group_out, g.group_columns), dtype=accumulate, device=device)
        if want_weight
        else None
    )

    col2im = launch.module(SOURCE, device).function(
        _name_expression("deform_col2im", dtype, mask is not None)
    )
    for start in range(0, g.batch, chunk):
        stop = min(start + chunk, g.batch)
        samples = stop - start
        cols = columns[:samples]
        cols_by_group = cols.view(samples, g.groups, g.group_columns, g.pixels)
        grad_out_by_group = grad_output[start:stop].view(samples, g.groups, group_out, g.pixels)
        chunk_offset = offset[start:stop]
        chunk_mask = None if mask is None else mask[start:stop]
        if want_sampling:
            for group in range(g.groups):
                w_t = weights[group].t().expand(samples, g.group_columns, group_out)
                torch.bmm(w_t, grad_out_by_group[:, group], out=cols_by_group[:, group])
            fixed_sums = None
            fixed_args = determinism.FixedPointSum.unused(device)
            if not want_input:
                accumulator = launch.null(accumulate, device)  # the kernel skips the scatter
            elif deterministic:
                accumulator = launch.null(accumulate, device)
                # Each (tap, pixel) item adds at most one value (weight ≤ 1
                # times mask times grad_column) to an input element.
                fixed_sums = determinism.FixedPointSum(
                    (samples, g.in_channels, g.height, g.width),
                    device,
                    max_abs=determinism.max_abs(cols) * determinism.max_abs(chunk_mask),
                    max_addends=g.taps * g.pixels,
                )
                fixed_args = fixed_sums.kernel_args()
            elif input_accumulator is None:
                accumulator = grad_input[start:stop]
            else:
                accumulator = input_accumulator[:samples]
                if start:  # the first chunk has fresh zeros
                    accumulator.zero_()
            slicing = _channel_slicing(g, samples, device)
            offset_partial = launch.new_output(
                (slicing.slices, *chunk_offset.shape), accumulate, device
            )
            if mask is None:  # HAS_MASK = false reads no mask and writes no mask gradient
                kernel_mask = launch.null(dtype, device)
                mask_partial = launch.null(accumulate, device)
            else:
                kernel_mask = chunk_mask
                mask_partial = launch.new_output(
                    (slicing.slices, *chunk_mask.shape), accumulate, device
                )
            _launch_sampling_kernel(
                col2im,
                g,
                samples,
                slicing,
                (
                    input[start:stop],
                    chunk_offset,
                    kernel_mask,
                    cols,
                    accumulator,
                    *fixed_args,
                    offset_partial,
                    mask_partial,
                ),
            )
            if fixed_sums is not None:
                grad_input[start:stop].copy_(fixed_sums.result(dtype))
            elif input_accumulator is not None:
                grad_input[start:stop].copy_(accumulator)
            if want_offset:
                grad_offset[start:stop].copy_(_sum_slices(offset_partial))
            if want_mask:
                grad_mask[start:stop].copy_(_sum_slices(mask_partial))
        if want_weight:
            _im2col(g, input[start:stop], chunk_offset, chunk_mask, cols)
            for group in range(g.groups):
                partial = _accumulating_bmm(
                    grad_out_by_group[:, group], cols_by_group[:, group].transpose(1, 2)
                )
                weight_accumulator[group] += partial.sum(0)

    grad_weight = weight_accumulator.view(weight.shape).to(dtype) if want_weight else empty()
    grad_bias = (
        grad_output.sum(dim=(0, 2, 3), dtype=accumulate).to(dtype) if want_bias else empty()
    )
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


# --------------------------------------------------------------------------- #
# torch.library operators: what autograd and torch.compile see.
# --------------------------------------------------------------------------- #

_PARAMS_SCHEMA = (
    "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, "
    "int groups, int offset_groups"
)
_DESIGN_SCHEMA = "str design, bool allow_tf32"


def _geometry_from_op(input, offset, mask, weight, params) -> Geometry:
    """The sizes of an already checked call, from the operator's arguments (no checks:
    the public functions and :func:`prepare` check before calling the operator)."""
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups = params
    batch, in_channels, height, width = input.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    return Geometry(
        batch=batch,
        in_channels=in_channels,
        height=height,
        width=width,
        out_channels=out_channels,
        kernel_h=kernel_h,
        kernel_w=kernel_w,
        stride=(stride_h, stride_w),
        padding=(pad_h, pad_w),
        dilation=(dilation_h, dilation_w),
        groups=groups,
        offset_groups=offset_groups,
        out_h=offset.shape[2],
        out_w=offset.shape[3],
    )


@torch.library.custom_op(
    "dcnbench::deform_conv2d",
    mutates_args=(),
    schema="(Tensor input, Tensor offset, Tensor? mask, Tensor weight, Tensor? bias, "
    f"{_PARAMS_SCHEMA}, {_DESIGN_SCHEMA}) -> Tensor",
)
def _deform_conv2d_op(input, offset, mask, weight, bias, *params_and_design):
    *params, design, allow_tf32 = params_and_design
    g = _geometry_from_op(input, offset, mask, weight, params)
    return _forward(g, input, offset, mask, weight, bias, design, allow_tf32)


@_deform_conv2d_op.register_fake
def _(input, offset, mask, weight, bias, *params_and_design):
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, *_ = params_and_design
    kernel_h, kernel_w = weight.shape[2], weight.shape[3]
    out_h = (input.shape[2] + 2 * pad_h - dilation_h * (kernel_h - 1) - 1) // stride_h + 1
    out_w = (input.shape[3] + 2 * pad_w - dilation_w * (kernel_w - 1) - 1) // stride_w + 1
    return input.new_empty((input.shape[0], weight.shape[0], out_h, out_w))


@torch.library.custom_op(
    "dcnbench::deform_conv2d_backward",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor offset, Tensor? mask, Tensor weight, "
    f"{_PARAMS_SCHEMA}, {_DESIGN_SCHEMA}, bool[] output_mask) -> (Tensor, Tensor, Tensor, "
    "Tensor, Tensor)",
)
def _deform_conv2d_backward_op(grad_output, input, offset, mask, weight, *params_and_mask):
    *params, design, allow_tf32, output_mask = params_and_mask
    g = _geometry_from_op(input, offset, mask, weight, params)
    grad_output = grad_output.contiguous()
    if design == "implicit_gemm":
        return _backward_implicit_gemm(
            g, grad_output, input, offset, mask, weight, output_mask, allow_tf32
        )
    return _backward_im2col(g, grad_output, input, offset, mask, weight, output_mask)


@_deform_conv2d_backward_op.register_fake
def _(grad_output, input, offset, mask, weight, *params_and_mask):
    output_mask = params_and_mask[-1]
    shapes = (
        input.shape,
        offset.shape,
        mask.shape if mask is not None else (0,),
        weight.shape,
        (weight.shape[0],),
    )
    return tuple(
        input.new_empty(shape if wanted else (0,))
        for shape, wanted in zip(shapes, output_mask, strict=True)
    )


def _setup_context(ctx, inputs, output):
    input, offset, mask, weight, bias, *params = inputs
    ctx.save_for_backward(input, offset, mask, weight)
    ctx.params = params
    ctx.has_bias = bias is not None


def _autograd_backward(ctx, grad_output):
    input, offset, mask, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [
        needs[0],
        needs[1],
        mask is not None and needs[2],
        needs[3],
        ctx.has_bias and needs[4],
    ]
    grads = torch.ops.dcnbench.deform_conv2d_backward(
        grad_output, input, offset, mask, weight, *ctx.params, output_mask
    )
    tensor_grads = tuple(
        grad if wanted else None for grad, wanted in zip(grads, output_mask, strict=True)
    )
    return (*tensor_grads, *(None for _ in ctx.params))


_deform_conv2d_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- #
# Public functions.
# --------------------------------------------------------------------------- #


def _checked_operands(
    input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups, design,
    allow_tf32,
) -> tuple[Geometry, tuple]:
    """Check every argument; the call's sizes and the operator's arguments, dense."""
    g = check_arguments(
        input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups
    )
    allow_tf32 = check_design(design, allow_tf32, g)
    # Kernels read dense NCHW: a non-contiguous argument is copied once here.
    operands = (
        input.contiguous(),
        offset.contiguous(),
        None if mask is None else mask.contiguous(),
        weight.contiguous(),
        None if bias is None else bias.contiguous(),
        *g.stride,
        *g.padding,
        *g.dilation,
        g.groups,
        g.offset_groups,
        design,
        allow_tf32,
    )
    return g, operands


def check_design(design: object, allow_tf32: object, g: Geometry) -> bool:
    """``design`` names one of :data:`DESIGNS`, the call fits its kernels' indices, and
    ``allow_tf32`` (returned as a bool) asks for TF32 only of the implicit GEMM."""
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {', '.join(map(repr, DESIGNS))}, got {design!r}")
    allow_tf32 = as_bool("allow_tf32", allow_tf32)
    if allow_tf32 and design != "implicit_gemm":
        raise ValueError(
            "allow_tf32=True needs design='implicit_gemm' (the im2col design's cuBLAS GEMMs "
            f"follow torch.backends.cuda.matmul.allow_tf32), got design={design!r}"
        )
    if design != "implicit_gemm":
        return allow_tf32
    # One GEMM over every output pixel of the batch: its column index is an int,
    # and the weight group is grid z.
    if g.batch * g.pixels > launch.INT32_MAX:
        raise ValueError(
            f"design='implicit_gemm' indexes the N·H_out·W_out = {g.batch}·{g.out_h}·{g.out_w} "
            "output pixels with 32 bits; expected fewer than 2^31"
        )
    if g.groups > launch.MAX_GRID_DIM[2]:
        raise ValueError(
            f"design='implicit_gemm' launches one grid z per weight group; expected groups <= "
            f"{launch.MAX_GRID_DIM[2]}, got {g.groups}"
        )
    return allow_tf32


def prepare(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    groups: int = 1,
    offset_groups: int | None = None,
    design: str = "im2col",
    allow_tf32: bool = False,
) -> Callable[[], torch.Tensor]:
    """Check the arguments of :func:`modulated_deform_conv2d` (``mask`` None:
    :func:`deform_conv2d`) once; the returned call runs the operator on them
    with no checks: the harness's timed call. Differentiable like the public
    functions; the tensors must not be resized between calls.
    """
    _, operands = _checked_operands(
        input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups,
        design, allow_tf32,
    )
    return functools.partial(torch.ops.dcnbench.deform_conv2d, *operands)


def _deform_conv(
    input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups, out,
    design, allow_tf32,
):
    g, operands = _checked_operands(
        input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups,
        design, allow_tf32,
    )
    if out is None:
        return torch.ops.dcnbench.deform_conv2d(*operands)
    input, offset, mask, weight, bias = operands[:5]
    _check_out(out, g, input)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, offset, mask, weight, bias)
    ):
        raise RuntimeError(
            "deform_conv2d with out=... does not support automatic differentiation, but one of "
            "the arguments requires grad"
        )
    _forward_into_design(out, g, input, offset, mask, weight, bias, *operands[-2:])
    return out


def _check_out(out: object, g: Geometry, input: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    check_shape("out", out, g.output_shape, "N, C_out, H_out, W_out")
    if out.dtype != input.dtype or out.device != input.device:
        raise TypeError(
            f"out must be {input.dtype} on {input.device}, got {out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


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
    out: torch.Tensor | None = None,
    design: str = "im2col",
    allow_tf32: bool = False,
) -> torch.Tensor:
    """Deformable convolution (DCNv1) with our CUDA kernels; differentiable.

    ``torchvision.ops.deform_conv2d`` without ``mask``. CUDA tensors run on
    the GPU (PyTorch's current stream), CPU tensors through the emulator.

    Args:
        input: [N, C_in, H, W], float32 / float16 / bfloat16 / float64. N = 0 and
            C_in = 0 are allowed (an empty output or one of only the bias;
            zero gradients), as in torchvision.
        offset: [N, 2·offset_groups·kh·kw, H_out, W_out]; channel 2·(g·kh·kw + k)
            is dy and the next one dx of tap k = i·kw + j of offset group g.
        weight: [C_out, C_in/groups, kh, kw] (C_out = 0 allowed).
        bias: [C_out] or None.
        stride, padding, dilation: ints or (h, w) pairs.
        groups: weight groups; divides C_in and C_out. None infers it from
            the shapes as torchvision does: C_in / weight.shape[1].
        offset_groups: divides C_in. None infers it from offset's channels
            as torchvision does: offset.shape[1] / (2·kh·kw).
        out: optional [N, C_out, H_out, W_out] contiguous tensor to write into
            (no autograd then).
        design: ``"im2col"`` (columns in memory, cuBLAS GEMMs) or
            ``"implicit_gemm"`` (the columns gathered straight into the GEMM's
            shared-memory tiles; ``docs/kernels/deform_conv2d.md``). Same results
            to the dtype's rounding.
        allow_tf32: float32 products of the implicit GEMM on TF32 tensor cores
            (operands rounded to 10 mantissa bits, float accumulation: errors of
            about float16's rounding instead of float32's). Default False: SIMT
            float32, as the contract asks. Only with ``design="implicit_gemm"``;
            other dtypes ignore it (half types always use tensor cores).

    All tensors share one dtype and device; non-contiguous ones are copied.
    The backward follows ``torch.use_deterministic_algorithms``: when it is
    on, grad_input is accumulated in fixed point and bit-reproducible
    (``kernels/determinism.py``: same atomics, an int64 buffer, a sync).

    Returns:
        [N, C_out, H_out, W_out], H_out = (H + 2·pad_h − dilation_h·(kh − 1) − 1) // stride_h + 1,
        likewise W_out.
    """
    return _deform_conv(
        input, offset, None, weight, bias, stride, padding, dilation, groups, offset_groups, out,
        design, allow_tf32,
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
    out: torch.Tensor | None = None,
    design: str = "im2col",
    allow_tf32: bool = False,
) -> torch.Tensor:
    """Modulated deformable convolution (DCNv2) with our CUDA kernels; differentiable.

    :func:`deform_conv2d` with every sampled value multiplied by ``mask``
    (used as given: no sigmoid), i.e. ``torchvision.ops.deform_conv2d`` with mask.

    Args:
        input: [N, C_in, H, W].
        offset: [N, 2·offset_groups·kh·kw, H_out, W_out].
        mask: [N, offset_groups·kh·kw, H_out, W_out]; channel g·kh·kw + k
            modulates tap k of offset group g.
        weight: [C_out, C_in/groups, kh, kw].
        bias: [C_out] or None.
        stride, padding, dilation, groups, offset_groups, out, design, allow_tf32: as
            :func:`deform_conv2d`.

    Returns:
        [N, C_out, H_out, W_out].
    """
    if mask is None:
        raise TypeError("mask must be a torch.Tensor (use deform_conv2d for DCNv1), got None")
    return _deform_conv(
        input, offset, mask, weight, bias, stride, padding, dilation, groups, offset_groups, out,
        design, allow_tf32,
    )


# --------------------------------------------------------------------------- #
# Modules.
# --------------------------------------------------------------------------- #


class _DeformConv2dBase(nn.Module):
    """Weight and bias of a deformable convolution, initialised like torchvision's.

    Defaults against the peers' layers:

    ========================  ===========  ====================  ==================================
    argument                  ours         torchvision           mmcv
    ========================  ===========  ====================  ==================================
    stride, padding,          1, 0, 1      1, 0, 1               1, 0, 1
    dilation
    groups                    1            1                     1
    offset_groups             None         (no argument:         ``deform_groups=1``
                              (inferred    inferred from the
                              from offset) offset)
    bias                      True         True                  False for ``DeformConv2d``, True for
                                                                 ``ModulatedDeformConv2d``
    initialisation            torchvision  kaiming_uniform(√5),  uniform(±1/√fan_in) weight,
                                           bias ±1/√fan_in       zero bias
    ========================  ===========  ====================  ==================================

    So ``DeformConv2d(c, c, 3, bias=False)`` stands in for mmcv's
    ``DeformConv2d(c, c, 3)``; the initial values differ from mmcv's (load a
    state dict to match them).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        offset_groups: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_channels = as_int("in_channels", in_channels, minimum=0)
        out_channels = as_int("out_channels", out_channels, minimum=0)
        groups = as_int("groups", groups, minimum=1)
        if offset_groups is not None:
            offset_groups = as_int("offset_groups", offset_groups, minimum=1)
        bias = as_bool("bias", bias)
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels ({in_channels}) and out_channels "
                f"({out_channels})"
            )
        if offset_groups is not None and in_channels % offset_groups:
            raise ValueError(
                f"offset_groups={offset_groups} must divide in_channels ({in_channels})"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = check_pair("kernel_size", kernel_size, 1)
        self.stride = check_pair("stride", stride, 1)
        self.padding = check_pair("padding", padding, 0)
        self.dilation = check_pair("dilation", dilation, 1)
        self.groups = groups
        self.offset_groups = offset_groups
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, offset_groups={self.offset_groups}, bias={self.bias is not None}"
        )

    def _convolve(self, input, offset, mask) -> torch.Tensor:
        return _deform_conv(
            input, offset, mask, self.weight, self.bias, self.stride, self.padding,
            self.dilation, self.groups, self.offset_groups, None, "im2col", False,
        )  # fmt: skip


class DeformConv2d(_DeformConv2dBase):
    """Deformable convolution layer, like ``torchvision.ops.DeformConv2d``:
    ``forward(input, offset, mask=None)``; DCNv1 without a mask, DCNv2 with one.

    offset [N, 2·offset_groups·kh·kw, H_out, W_out], mask [N,
    offset_groups·kh·kw, H_out, W_out] (used as given, no sigmoid). Defaults:
    the table of the base class.
    """

    def forward(
        self, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._convolve(input, offset, mask)


class ModulatedDeformConv2d(_DeformConv2dBase):
    """DCNv2 layer with the mask required, like mmcv's ``ModulatedDeformConv2d``
    (which takes the mask as given too): ``forward(input, offset, mask)``."""

    def forward(
        self, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        if mask is None:
            raise TypeError("mask must be a torch.Tensor (use DeformConv2d for DCNv1), got None")
        return self._convolve(input, offset, mask)
