"""Our deformable position-sensitive RoI pooling kernels: ``deform_psroi_pool``.

Semantics: ``shared/ops-semantics.md`` ("RoI pooling, NCHW"): R-FCN's
deformable PSRoI pooling as in the original Deformable ConvNets (and mmcv's
DeformRoIPoolingFunction of mmdet v1), sampling rule B2. float32 / float16 /
bfloat16 with float32 accumulation, float64 in float64. Design notes:
``docs/kernels/roi_pool.md``.

Forward and backward kernels: ``kernels/cuda/deform_psroi_pool.cu``
(HAS_TRANS = false for ``no_trans``). The backward scatters grad_input with
atomics into a buffer of the accumulation dtype (cast once at the end; under
``torch.use_deterministic_algorithms(True)`` fixed-point int64 atomics, see
``kernels.ops.deform_roi_pool.InputGradient``) and writes
per-bin, per-channel-slice partial sums of the trans gradient; here they are
summed over slices and over the bins that share a part cell. Only requested
gradients are computed.

A second design, ``design="channels_fastest"``
(``kernels/cuda/deform_psroi_pool_channels_fastest.cu``): lanes over 32 output
channels of one bin, reading a staging of the input with the output channels
innermost ([N, H, W, group_size², output_dim]) and scattering into one,
transposed back; the trans gradient per output channel, summed here per class.

A third, ``design="samples_fastest"``
(``kernels/cuda/deform_psroi_pool_samples_fastest.cu``): the lanes of a warp
over the samples of one bin (16 lanes for sample_per_part 4), which lie in one
input plane whatever the trans; sums reduced with shuffles. For per-class
trans, where every output channel samples at its own positions.

``rois`` (a [K, 5] tensor or a list of [L, 4] boxes
per image, float32 or the input's dtype) values are checked on the host, as
in :mod:`kernels.ops.deform_roi_pool` (one synchronisation per forward on a
GPU); ``trans`` values are not (a non-finite one puts its bins' samples
outside the map, uncounted). K = 0 RoIs or output_dim = 0 give an empty output and zero
gradients, without a launch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import nn

from kernels import determinism, launch
from kernels.checks import check_shape, check_tensor
from kernels.cuda_sources import COMPILE_OPTIONS, CudaSource, register
from kernels.ops.deform_roi_pool import (
    BIN_TILE,
    CHANNELS_PER_WARP,
    SUPPORTED_DTYPES,
    TRANSPOSE_BLOCK_SIZE,
    TRANSPOSE_OPTIONS,
    TRANSPOSE_PAIRS,
    InputGradient,
    PerRoi,
    accumulate_dtype,
    accumulate_scalar,
    channel_slicing,
    check_bool,
    check_design,
    check_finite_float,
    check_input_and_rois,
    check_positive_int,
    check_same_dtype_and_device,
    check_values,
    fully_connected,
    launch_per_roi_chunk,
    transpose_name,
    transpose_rows_and_columns,
)
from kernels.ops.deform_roi_pool import DESIGNS as ROI_POOL_DESIGNS
from kernels.rois import as_rois, check_explicit_grid

__all__ = ["DESIGNS", "DeformPSRoIPool", "DeformPSRoIPoolPack", "deform_psroi_pool", "prepare"]

# The RoI pools' designs and the samples-fastest one, which only this op has.
DESIGNS = (*ROI_POOL_DESIGNS, "samples_fastest")

# Lanes of a warp: the samples-fastest design's most lanes per element.
WARP_SIZE = 32

# Threads per block of every design's pool kernels (a macro in the .cu, see deform_roi_pool).
BLOCK_SIZE = 256

_CTYPES = {
    torch.float32: "float",
    torch.float16: "__half",
    torch.bfloat16: "__nv_bfloat16",
    torch.float64: "double",
}
_KERNELS = ("deform_psroi_pool_forward", "deform_psroi_pool_backward")


def _name_expression(kernel: str, dtype: torch.dtype, has_trans: bool) -> str:
    return f"{kernel}<{_CTYPES[dtype]}, {'true' if has_trans else 'false'}>"


SOURCE = register(
    CudaSource(
        filename="deform_psroi_pool.cu",
        name_expressions=tuple(
            _name_expression(kernel, dtype, has_trans)
            for kernel in _KERNELS
            for dtype in SUPPORTED_DTYPES
            for has_trans in (False, True)
        ),
        block_sizes=dict.fromkeys(_KERNELS, BLOCK_SIZE),
        options=(*COMPILE_OPTIONS, f"-DPSROI_POOL_BLOCK_SIZE={BLOCK_SIZE}"),
    )
)

# The channels-fastest design (kernels/cuda/deform_psroi_pool_channels_fastest.cu):
# lanes over 32 output channels of one bin, blocks of 32 channels by BIN_TILE bins,
# the staging transposes of kernels.ops.deform_roi_pool.
_CHANNELS_FASTEST_KERNELS = (
    "deform_psroi_pool_channels_fastest_forward",
    "deform_psroi_pool_channels_fastest_backward",
)
CHANNELS_FASTEST_SOURCE = register(
    CudaSource(
        filename="deform_psroi_pool_channels_fastest.cu",
        name_expressions=(
            *(
                _name_expression(kernel, dtype, has_trans)
                for kernel in _CHANNELS_FASTEST_KERNELS
                for dtype in SUPPORTED_DTYPES
                for has_trans in (False, True)
            ),
            *(transpose_name(a, b) for a, b in TRANSPOSE_PAIRS),
        ),
        block_sizes={
            **dict.fromkeys(_CHANNELS_FASTEST_KERNELS, BLOCK_SIZE),
            "transpose_rows_and_columns": TRANSPOSE_BLOCK_SIZE,
        },
        options=(*SOURCE.options, f"-DPSROI_POOL_BIN_TILE={BIN_TILE}", *TRANSPOSE_OPTIONS),
    )
)


# The samples-fastest design (kernels/cuda/deform_psroi_pool_samples_fastest.cu):
# lanes over one bin's samples, the first design's blocks of BLOCK_SIZE threads.
_SAMPLES_FASTEST_KERNELS = (
    "deform_psroi_pool_samples_fastest_forward",
    "deform_psroi_pool_samples_fastest_backward",
)
SAMPLES_FASTEST_SOURCE = register(
    CudaSource(
        filename="deform_psroi_pool_samples_fastest.cu",
        name_expressions=tuple(
            _name_expression(kernel, dtype, has_trans)
            for kernel in _SAMPLES_FASTEST_KERNELS
            for dtype in SUPPORTED_DTYPES
            for has_trans in (False, True)
        ),
        block_sizes=dict.fromkeys(_SAMPLES_FASTEST_KERNELS, BLOCK_SIZE),
        options=SOURCE.options,
    )
)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Every size and parameter of one call, checked against the contract."""

    batch: int
    channels: int
    height: int
    width: int
    num_rois: int
    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int  # resolved: pooled_size when given as 0
    sample_per_part: int
    num_classes: int  # 1 without trans
    spatial_scale: float
    trans_std: float

    @property
    def bins(self) -> int:
        return self.pooled_size * self.pooled_size

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.num_rois, self.output_dim, self.pooled_size, self.pooled_size)

    @property
    def lanes_per_bin(self) -> int:
        """The samples-fastest design's lanes per output element: sample_per_part²
        rounded up to a power of two, at most a warp (which then loops)."""
        return min(WARP_SIZE, 1 << (self.sample_per_part**2 - 1).bit_length())

    @property
    def empty(self) -> bool:
        """No RoI or no output channel: nothing to launch, the output has no element."""
        return self.num_rois == 0 or self.output_dim == 0


def check_arguments(
    input: torch.Tensor,
    rois: torch.Tensor,
    trans: torch.Tensor | None,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
    trans_std: float,
) -> Geometry:
    """Check shapes, dtypes, devices and parameters (not values); ``trans``
    None means no_trans. Returns the call's sizes."""
    num_rois = check_input_and_rois(input, rois)
    spatial_scale = check_finite_float("spatial_scale", spatial_scale, positive=True)
    check_positive_int("output_dim", output_dim, minimum=0)
    check_positive_int("group_size", group_size)
    check_positive_int("pooled_size", pooled_size)
    check_positive_int("part_size", part_size, minimum=0)
    check_positive_int("sample_per_part", sample_per_part)
    check_explicit_grid("sample_per_part", sample_per_part)
    trans_std = check_finite_float("trans_std", trans_std)
    part_size = part_size or pooled_size
    batch, channels, height, width = input.shape
    if channels != output_dim * group_size * group_size:
        raise ValueError(
            f"input must have output_dim·group_size² = {output_dim}·{group_size}² = "
            f"{output_dim * group_size * group_size} channels, got {channels}"
        )
    num_classes = 1
    if trans is not None:
        check_tensor("trans", trans, 4)
        check_same_dtype_and_device("trans", trans, input)
        trans_channels = trans.shape[1]
        if trans_channels == 0 or trans_channels % 2:
            raise ValueError(
                f"trans must have 2·num_classes channels (an even number >= 2), got {trans_channels}"
            )
        num_classes = trans_channels // 2
        if output_dim % num_classes:
            raise ValueError(
                f"trans has {trans_channels} channels, i.e. num_classes = {num_classes}, which must "
                f"divide output_dim ({output_dim})"
            )
        check_shape(
            "trans",
            trans,
            (num_rois, trans_channels, part_size, part_size),
            "K, 2·num_classes, part_size, part_size",
        )
    if output_dim * pooled_size * pooled_size > launch.INT32_MAX:
        raise ValueError(f"{output_dim} channels of {pooled_size}² bins exceed 2^31 per RoI")
    return Geometry(
        batch=batch,
        channels=channels,
        height=height,
        width=width,
        num_rois=num_rois,
        output_dim=output_dim,
        group_size=group_size,
        pooled_size=pooled_size,
        part_size=part_size,
        sample_per_part=sample_per_part,
        num_classes=num_classes,
        spatial_scale=spatial_scale,
        trans_std=trans_std,
    )


# --------------------------------------------------------------------------- #
# Launches on already checked, contiguous tensors.
# --------------------------------------------------------------------------- #


def _geometry_arguments(g: Geometry, dtype: torch.dtype) -> tuple:
    ints = (
        g.batch,
        g.channels,
        g.height,
        g.width,
        g.output_dim,
        g.group_size,
        g.pooled_size,
        g.part_size,
        g.sample_per_part,
        g.num_classes,
    )
    return (
        *(launch.int32(v) for v in ints),
        accumulate_scalar(g.spatial_scale, dtype),
        accumulate_scalar(g.trans_std, dtype),
    )


def _staging_shape(g: Geometry) -> tuple[int, int, int, int]:
    """The input as [N, output_dim, group_size², H·W], the rows and columns its staging
    [N, H·W, group_size², output_dim] swaps."""
    return (g.batch, g.output_dim, g.group_size**2, g.height * g.width)


def _channels_fastest_blocks(g: Geometry) -> int:
    """Blocks of one RoI: a chunk of 32 output channels by a tile of BIN_TILE bins each."""
    return launch.blocks(g.output_dim, CHANNELS_PER_WARP) * launch.blocks(g.bins, BIN_TILE)


def _samples_fastest_blocks(g: Geometry) -> int:
    """Blocks of one RoI: an output element per lanes_per_bin threads."""
    return launch.blocks(g.output_dim * g.bins, BLOCK_SIZE // g.lanes_per_bin)


def _samples_fastest_arguments(g: Geometry, design: str) -> tuple:
    """The samples-fastest kernels' last argument, lanes per element; none for the others."""
    return (launch.int32(g.lanes_per_bin),) if design == "samples_fastest" else ()


def _forward(
    g: Geometry, input: torch.Tensor, rois: torch.Tensor, trans: torch.Tensor | None, design: str
) -> torch.Tensor:
    output = launch.new_output(g.output_shape, input.dtype, input.device)
    if g.empty:
        return output
    if design == "channels_fastest":
        kernel = launch.module(CHANNELS_FASTEST_SOURCE, input.device).function(
            _name_expression(
                "deform_psroi_pool_channels_fastest_forward", input.dtype, trans is not None
            )
        )
        staged = transpose_rows_and_columns(
            CHANNELS_FASTEST_SOURCE, input, _staging_shape(g), input.dtype
        )
        blocks, features = _channels_fastest_blocks(g), staged
    elif design == "samples_fastest":
        kernel = launch.module(SAMPLES_FASTEST_SOURCE, input.device).function(
            _name_expression(
                "deform_psroi_pool_samples_fastest_forward", input.dtype, trans is not None
            )
        )
        blocks, features = _samples_fastest_blocks(g), input
    else:
        kernel = launch.module(SOURCE, input.device).function(
            _name_expression("deform_psroi_pool_forward", input.dtype, trans is not None)
        )
        blocks, features = launch.blocks(g.output_dim * g.bins, BLOCK_SIZE), input
    null = launch.null(input.dtype, input.device)  # unread without HAS_TRANS
    rois = rois.to(accumulate_dtype(input.dtype)).contiguous()
    launch_per_roi_chunk(
        kernel,
        blocks,
        BLOCK_SIZE,
        g.num_rois,
        (
            features,
            PerRoi(rois),
            PerRoi(trans, null),
            PerRoi(output),
            *_geometry_arguments(g, input.dtype),
            *_samples_fastest_arguments(g, design),
        ),
    )
    return output


def _sum_into_part_cells(g: Geometry, grad: torch.Tensor) -> torch.Tensor:
    """[K, 2·num_classes, pooled, pooled] per bin -> [K, 2·num_classes, part, part]:
    bin (ph, pw) reads trans cell (ph·part // pooled, pw·part // pooled)."""
    if g.part_size == g.pooled_size:
        return grad
    cell = torch.arange(g.pooled_size, device=grad.device) * g.part_size // g.pooled_size
    rows = grad.new_zeros((*grad.shape[:2], g.part_size, g.pooled_size)).index_add_(2, cell, grad)
    return rows.new_zeros((*grad.shape[:2], g.part_size, g.part_size)).index_add_(3, cell, rows)


def _backward(
    g: Geometry,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    rois: torch.Tensor,
    trans: torch.Tensor | None,
    output_mask: list[bool],
    design: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_trans); unrequested ones are empty tensors."""
    dtype, device = input.dtype, input.device
    want_input = output_mask[0]
    want_trans = output_mask[1] and trans is not None
    if g.empty:
        # Nothing pooled: every requested gradient is zero.
        return tuple(
            torch.zeros(tensor.shape, dtype=dtype, device=device)
            if wanted
            else torch.empty(0, dtype=dtype, device=device)
            for tensor, wanted in ((input, want_input), (trans, want_trans))
        )

    def bound() -> tuple[float, int]:
        # A value added is grad_output * weight / count, weight <= 1; an
        # element receives at most one per sample of every bin (group_size 1:
        # all bins read one plane).
        samples = g.bins * g.sample_per_part**2
        return determinism.max_abs(grad_output), g.num_rois * samples

    if design == "channels_fastest":
        return _backward_channels_fastest(
            g, grad_output, input, rois, trans, want_input, want_trans, bound
        )
    # float32 accumulation (float64 for float64): see kernels.ops.deform_roi_pool._backward.
    grad_input = InputGradient(input.shape, dtype, device, bound) if want_input else None
    accumulate = accumulate_dtype(dtype)
    channels_per_class = g.output_dim // g.num_classes
    if design == "samples_fastest":
        # An element's lanes reduce over its samples, not channels: one channel a
        # slice, the first design's partial sums per output channel.
        source, kernel_name = SAMPLES_FASTEST_SOURCE, "deform_psroi_pool_samples_fastest_backward"
        slices, blocks = channels_per_class, _samples_fastest_blocks(g)
        slice_arguments = _samples_fastest_arguments(g, design)
    else:
        slicing = channel_slicing(
            channels_per_class, g.num_rois * g.num_classes * g.bins, want_trans, device
        )
        source, kernel_name = SOURCE, "deform_psroi_pool_backward"
        slices = slicing.slices
        blocks = launch.blocks(g.num_classes * slices * g.bins, BLOCK_SIZE)
        slice_arguments = (launch.int32(slicing.channels_per_thread), launch.int32(slices))
    trans_partial = (
        launch.new_output(
            (g.num_rois, g.num_classes, slices, 2, g.pooled_size, g.pooled_size),
            accumulate,
            device,
        )
        if want_trans
        else None
    )
    if want_input or want_trans:
        kernel = launch.module(source, device).function(
            _name_expression(kernel_name, dtype, trans is not None)
        )
        null, null_accumulate = launch.null(dtype, device), launch.null(accumulate, device)
        rois = rois.to(accumulate).contiguous()
        launch_per_roi_chunk(
            kernel,
            blocks,
            BLOCK_SIZE,
            g.num_rois,
            (
                input,
                PerRoi(rois),
                PerRoi(trans, null),
                PerRoi(grad_output),
                *InputGradient.arguments(grad_input, dtype, device),
                PerRoi(trans_partial, null_accumulate),
                *_geometry_arguments(g, dtype),
                *slice_arguments,
            ),
        )
    if trans_partial is None:
        grad_trans = torch.empty(0, dtype=dtype, device=device)
    else:
        per_bin = trans_partial.sum(2).view(
            g.num_rois, 2 * g.num_classes, g.pooled_size, g.pooled_size
        )
        grad_trans = _sum_into_part_cells(g, per_bin).to(dtype)
    grad_input = (
        torch.empty(0, dtype=dtype, device=device)
        if grad_input is None
        else grad_input.result(dtype)
    )
    return grad_input, grad_trans


def _backward_channels_fastest(
    g: Geometry,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    rois: torch.Tensor,
    trans: torch.Tensor | None,
    want_input: bool,
    want_trans: bool,
    bound: Callable[[], tuple[float, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_backward` of the channels-fastest design: grad_input accumulates in
    the staged layout and is transposed back (cast on the way); grad_trans comes
    per output channel, summed here over each class's channels and part cells."""
    dtype, device = input.dtype, input.device
    accumulate = accumulate_dtype(dtype)
    batch, rows, middle, columns = _staging_shape(g)
    grad_input = (
        InputGradient((batch, columns, middle, rows), dtype, device, bound) if want_input else None
    )
    trans_partial = (
        launch.new_output(
            (g.num_rois, 2, g.pooled_size, g.pooled_size, g.output_dim), accumulate, device
        )
        if want_trans
        else None
    )
    kernel = launch.module(CHANNELS_FASTEST_SOURCE, device).function(
        _name_expression("deform_psroi_pool_channels_fastest_backward", dtype, trans is not None)
    )
    null, null_accumulate = launch.null(dtype, device), launch.null(accumulate, device)
    # The values are read only for the trans gradient.
    staged = (
        transpose_rows_and_columns(CHANNELS_FASTEST_SOURCE, input, _staging_shape(g), dtype)
        if want_trans
        else null
    )
    rois = rois.to(accumulate).contiguous()
    launch_per_roi_chunk(
        kernel,
        _channels_fastest_blocks(g),
        BLOCK_SIZE,
        g.num_rois,
        (
            staged,
            PerRoi(rois),
            PerRoi(trans, null),
            PerRoi(grad_output),
            *InputGradient.arguments(grad_input, dtype, device),
            PerRoi(trans_partial, null_accumulate),
            *_geometry_arguments(g, dtype),
        ),
    )

    def empty():  # one each: the operator's outputs must not alias
        return torch.empty(0, dtype=dtype, device=device)

    if trans_partial is None:
        grad_trans = empty()
    else:
        # [K, 2, P, P, classes, channels of a class] -> per class [K, classes, 2, P, P].
        per_class = trans_partial.view(
            g.num_rois, 2, g.pooled_size, g.pooled_size, g.num_classes, -1
        ).sum(5)
        per_bin = per_class.permute(0, 4, 1, 2, 3).reshape(
            g.num_rois, 2 * g.num_classes, g.pooled_size, g.pooled_size
        )
        grad_trans = _sum_into_part_cells(g, per_bin).to(dtype)
    if grad_input is None:
        return empty(), grad_trans
    unstaged = transpose_rows_and_columns(
        CHANNELS_FASTEST_SOURCE, grad_input.accumulated(dtype), (batch, columns, middle, rows),
        dtype,
    )
    return unstaged.view(input.shape), grad_trans


# --------------------------------------------------------------------------- #
# torch.library operators: what autograd and torch.compile see.
# --------------------------------------------------------------------------- #

def _geometry_from_op(input, rois, trans, params) -> Geometry:
    """The sizes of an already checked call, from the operator's arguments (no checks:
    :func:`deform_psroi_pool` and :func:`prepare` check, values included, before
    calling the operator, so the operator itself never synchronises)."""
    spatial_scale, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std = (
        params
    )
    batch, channels, height, width = input.shape
    return Geometry(
        batch=batch,
        channels=channels,
        height=height,
        width=width,
        num_rois=rois.shape[0],
        output_dim=output_dim,
        group_size=group_size,
        pooled_size=pooled_size,
        part_size=part_size or pooled_size,
        sample_per_part=sample_per_part,
        num_classes=1 if trans is None else trans.shape[1] // 2,
        spatial_scale=spatial_scale,
        trans_std=trans_std,
    )


_PARAMS_SCHEMA = (
    "float spatial_scale, int output_dim, int group_size, int pooled_size, int part_size, "
    "int sample_per_part, float trans_std"
)


@torch.library.custom_op(
    "dcnbench::deform_psroi_pool",
    mutates_args=(),
    schema=f"(Tensor input, Tensor rois, Tensor? trans, {_PARAMS_SCHEMA}, str design) -> Tensor",
)
def _deform_psroi_pool_op(input, rois, trans, *params_and_design):
    *params, design = params_and_design
    return _forward(_geometry_from_op(input, rois, trans, params), input, rois, trans, design)


@_deform_psroi_pool_op.register_fake
def _(input, rois, trans, spatial_scale, output_dim, group_size, pooled_size, *params):
    return input.new_empty((rois.shape[0], output_dim, pooled_size, pooled_size))


@torch.library.custom_op(
    "dcnbench::deform_psroi_pool_backward",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor rois, Tensor? trans, "
    f"{_PARAMS_SCHEMA}, str design, bool[] output_mask) -> (Tensor, Tensor)",
)
def _deform_psroi_pool_backward_op(grad_output, input, rois, trans, *params_and_mask):
    *params, design, output_mask = params_and_mask
    g = _geometry_from_op(input, rois, trans, params)
    return _backward(g, grad_output.contiguous(), input, rois, trans, output_mask, design)


@_deform_psroi_pool_backward_op.register_fake
def _(grad_output, input, rois, trans, *params_and_mask):
    output_mask = params_and_mask[-1]
    return (
        input.new_empty(input.shape if output_mask[0] else (0,)),
        input.new_empty(trans.shape if output_mask[1] and trans is not None else (0,)),
    )


def _setup_context(ctx, inputs, output):
    input, rois, trans, *params = inputs
    ctx.save_for_backward(input, rois, trans)
    ctx.params = params


def _autograd_backward(ctx, grad_output):
    input, rois, trans = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], trans is not None and needs[2]]
    grad_input, grad_trans = torch.ops.dcnbench.deform_psroi_pool_backward(
        grad_output, input, rois, trans, *ctx.params, output_mask
    )
    return (
        grad_input if output_mask[0] else None,
        None,
        grad_trans if output_mask[1] else None,
        *(None for _ in ctx.params),
    )


_deform_psroi_pool_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- #
# Public function.
# --------------------------------------------------------------------------- #


def deform_psroi_pool(
    input: torch.Tensor,
    rois: torch.Tensor | list[torch.Tensor],
    trans: torch.Tensor | None = None,
    *,
    spatial_scale: float = 1.0,
    output_dim: int,
    group_size: int = 1,
    pooled_size: int,
    part_size: int = 0,
    sample_per_part: int = 4,
    trans_std: float = 0.0,
    no_trans: bool = False,
    design: str = "pw_fastest",
) -> torch.Tensor:
    """Deformable position-sensitive RoI pooling (R-FCN, Deformable ConvNets) with our CUDA kernels.

    Bin (ph, pw) of output channel ctop averages, by rule B2, a
    sample_per_part² grid of input channel (ctop·group_size + gh)·group_size + gw,
    moved by trans_std·(roi_w, roi_h)·trans of the bin's class and part cell.
    Differentiable in ``input`` and ``trans``. Defaults are mmdet v1's
    ``deform_roi_pooling`` (group_size 1, part_size = pooled_size,
    sample_per_part 4, trans_std 0).

    Args:
        input: [N, output_dim·group_size², H, W], float32 / float16 / bfloat16 / float64.
        rois: [K, 5] of (batch_index, x1, y1, x2, y2) in image coordinates
            (rounded to integers, C's round), or a list of [L_i, 4] boxes, one
            tensor per image; the input's dtype or float32, on its device;
            batch indices integral in [0, N), coordinates finite (checked:
            one host synchronisation on a GPU).
        trans: [K, 2·num_classes, part_size, part_size] (channel 2·cls moves
            x, 2·cls + 1 moves y; num_classes divides output_dim), or None
            with ``no_trans`` (ignored when no_trans is true).
        spatial_scale: image to feature-map scale (> 0; default 1).
        output_dim, group_size, pooled_size: output channels (0: an empty
            output), position-sensitive grid side, output bins per side.
        part_size: trans cells per side; 0 means pooled_size.
        sample_per_part: samples per bin side (1 to 1024).
        trans_std: scale of trans.
        no_trans: pool without moving the bins.
        design: the kernels, ``"pw_fastest"`` (default), ``"channels_fastest"``
            (lanes over output channels of an NHWC-like staging) or
            ``"samples_fastest"`` (lanes over a bin's samples); the same results.

    Returns:
        [K, output_dim, pooled_size, pooled_size].
    """
    g, operands = _operands(input, rois, trans, spatial_scale, output_dim, group_size,
                            pooled_size, part_size, sample_per_part, trans_std, no_trans, design)
    torch.ops.dcnbench.check_roi_values(operands[1], g.batch)
    return torch.ops.dcnbench.deform_psroi_pool(*operands)


def prepare(
    input: torch.Tensor,
    rois: torch.Tensor,
    trans: torch.Tensor | None,
    *,
    spatial_scale: float,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int = 0,
    sample_per_part: int,
    trans_std: float,
    no_trans: bool,
    design: str = "pw_fastest",
) -> Callable[[], torch.Tensor]:
    """Check the arguments of :func:`deform_psroi_pool` once, values included; the
    returned call runs the operator on them with no checks and no host
    synchronisation: the harness's timed call. Differentiable like the public
    function; the tensors' values must stay valid between calls.
    """
    g, operands = _operands(input, rois, trans, spatial_scale, output_dim, group_size,
                            pooled_size, part_size, sample_per_part, trans_std, no_trans, design)
    check_values(operands[1], g.batch)
    return functools.partial(torch.ops.dcnbench.deform_psroi_pool, *operands)


def _operands(input, rois, trans, spatial_scale, output_dim, group_size, pooled_size, part_size,
              sample_per_part, trans_std, no_trans, design) -> tuple[Geometry, tuple]:
    """Check shapes, dtypes, devices and parameters; the call's sizes and the
    operator's arguments, dense (``trans`` None with ``no_trans``)."""
    check_bool("no_trans", no_trans)
    if no_trans:
        trans = None
    elif trans is None:
        raise TypeError("trans must be a torch.Tensor unless no_trans=True, got None")
    rois = as_rois(rois)
    params = (
        spatial_scale,
        output_dim,
        group_size,
        pooled_size,
        part_size,
        sample_per_part,
        trans_std,
    )
    g = check_arguments(input, rois, trans, *params)
    # Kernels read dense tensors: a non-contiguous argument is copied once here.
    operands = (
        input.contiguous(),
        rois.contiguous(),
        None if trans is None else trans.contiguous(),
        g.spatial_scale,
        output_dim,
        group_size,
        pooled_size,
        part_size,
        sample_per_part,
        g.trans_std,
        check_design(design, DESIGNS),
    )
    return g, operands


# --------------------------------------------------------------------------- #
# Modules.
# --------------------------------------------------------------------------- #


class DeformPSRoIPool(nn.Module):
    """mmdet v1's ``DeformRoIPooling``: ``forward(input, rois, trans=None)`` = :func:`deform_psroi_pool`.

    input [N, output_dim·group_size², H, W]; rois [K, 5] or a list of
    [L_i, 4] boxes per image; trans [K, 2·num_classes, part_size, part_size]
    (None with no_trans); output [K, output_dim, pooled_size, pooled_size].
    Positional order and defaults are mmdet's (spatial_scale, out_size,
    out_channels, no_trans, group_size=1, part_size=None, sample_per_part=4,
    trans_std=0), under the contract's names.
    """

    def __init__(
        self,
        spatial_scale: float,
        pooled_size: int,
        output_dim: int,
        no_trans: bool = False,
        group_size: int = 1,
        part_size: int = 0,
        sample_per_part: int = 4,
        trans_std: float = 0.0,
    ) -> None:
        super().__init__()
        self.spatial_scale = spatial_scale
        self.pooled_size = pooled_size
        self.output_dim = output_dim
        self.no_trans = check_bool("no_trans", no_trans)
        self.group_size = group_size
        self.part_size = part_size
        self.sample_per_part = sample_per_part
        self.trans_std = trans_std

    def _pool(self, input, rois, trans, no_trans):
        return deform_psroi_pool(
            input,
            rois,
            trans,
            spatial_scale=self.spatial_scale,
            output_dim=self.output_dim,
            group_size=self.group_size,
            pooled_size=self.pooled_size,
            part_size=self.part_size,
            sample_per_part=self.sample_per_part,
            trans_std=self.trans_std,
            no_trans=no_trans,
        )

    def forward(
        self,
        input: torch.Tensor,
        rois: torch.Tensor | list[torch.Tensor],
        trans: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._pool(input, rois, trans, self.no_trans)

    def extra_repr(self) -> str:
        return (
            f"spatial_scale={self.spatial_scale}, pooled_size={self.pooled_size}, "
            f"output_dim={self.output_dim}, no_trans={self.no_trans}, "
            f"group_size={self.group_size}, part_size={self.part_size}, "
            f"sample_per_part={self.sample_per_part}, trans_std={self.trans_std}"
        )


class DeformPSRoIPoolPack(DeformPSRoIPool):
    """mmdet v1's ``DeformRoIPoolingPack``: the trans is learnt from the pooled features.

    ``forward(input, rois)``: x = the no_trans pooling [K, output_dim, P, P]
    (P = pooled_size); trans = ``offset_fc``(x flattened) [K, 2, P, P]
    (``num_offset_fcs`` linear layers, output_dim·P² -> deform_fc_channels ...
    -> 2·P², ReLUs between, the last zero-initialised: one class, part_size =
    pooled_size); returns :func:`deform_psroi_pool` with that trans. With
    ``no_trans`` there are no layers and it is the no_trans pooling; at
    initialisation it is that pooling too.
    """

    def __init__(
        self,
        spatial_scale: float,
        pooled_size: int,
        output_dim: int,
        no_trans: bool = False,
        group_size: int = 1,
        part_size: int = 0,
        sample_per_part: int = 4,
        trans_std: float = 0.0,
        num_offset_fcs: int = 3,
        deform_fc_channels: int = 1024,
    ) -> None:
        super().__init__(
            spatial_scale, pooled_size, output_dim, no_trans, group_size, part_size,
            sample_per_part, trans_std,
        )
        check_positive_int("pooled_size", pooled_size)
        check_positive_int("output_dim", output_dim)
        if part_size not in (0, pooled_size):
            raise ValueError(
                "part_size must be 0 or pooled_size: the layers predict one trans cell per bin, "
                f"got part_size={part_size}, pooled_size={pooled_size}"
            )
        self.num_offset_fcs = check_positive_int("num_offset_fcs", num_offset_fcs)
        self.deform_fc_channels = check_positive_int("deform_fc_channels", deform_fc_channels)
        if not no_trans:
            bins = pooled_size * pooled_size
            hidden = [deform_fc_channels] * (num_offset_fcs - 1)
            self.offset_fc = fully_connected([output_dim * bins, *hidden, 2 * bins])

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, rois: torch.Tensor | list[torch.Tensor]
    ) -> torch.Tensor:
        rois = as_rois(rois)
        plain = self._pool(input, rois, None, True)
        if self.no_trans:
            return plain
        count = plain.shape[0]
        # An explicit size: with K = 0 a -1 would be ambiguous.
        trans = self.offset_fc(plain.reshape(count, plain.shape[1:].numel()))
        return self._pool(
            input, rois, trans.view(count, 2, self.pooled_size, self.pooled_size), False
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_offset_fcs={self.num_offset_fcs}, "
            f"deform_fc_channels={self.deform_fc_channels}"
        )
