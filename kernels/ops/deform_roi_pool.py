"""Our RoI pooling kernels: ``roi_align``, ``deform_roi_pool``, ``modulated_deform_roi_pool``.

Semantics: ``shared/ops-semantics.md`` ("RoI pooling, NCHW"): mmcv's
DeformRoIPool / ModulatedDeformRoIPool, and ``roi_align`` =
``torchvision.ops.roi_align(aligned=True)`` = ``deform_roi_pool`` without
offset; sampling rule B1. float32 / float16 / bfloat16, float32 accumulation.
Design notes: ``docs/kernels/roi_pool.md``.

One forward and one backward kernel (``kernels/cuda/deform_roi_pool.cu``),
templated on HAS_OFFSET / HAS_MASK, serve the three operators. The backward
scatters grad_input with float32 atomics into a float32 buffer (cast once at
the end) and writes per-channel-slice partial sums of grad_offset / grad_mask,
summed here. Only requested gradients are computed.

``rois`` and ``offset`` values are checked on the host (integral batch indices
in range, finite coordinates and offsets): on a GPU that is one device-to-host
synchronisation per forward call, the price of a clear error instead of a
silently wrong result. :func:`prepare` checks them once and returns a call that
never synchronises (the harness times that).

On a CPU tensor the kernels run through ``kernels.emulator``: for correctness
checks, never for timing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch

from kernels import launch
from kernels.checks import check_shape, check_tensor
from kernels.cuda_sources import COMPILE_OPTIONS, CudaSource, register

__all__ = ["deform_roi_pool", "modulated_deform_roi_pool", "prepare", "roi_align"]

# Threads per block of both kernels; the .cu gets it as a macro so its
# __launch_bounds__ and our grids cannot disagree.
BLOCK_SIZE = 256

_CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
SUPPORTED_DTYPES = tuple(_CTYPES)
_KERNELS = ("deform_roi_pool_forward", "deform_roi_pool_backward")


def _name_expression(kernel: str, dtype: torch.dtype, has_offset: bool, has_mask: bool) -> str:
    flags = ", ".join("true" if flag else "false" for flag in (has_offset, has_mask))
    return f"{kernel}<{_CTYPES[dtype]}, {flags}>"


SOURCE = register(
    CudaSource(
        filename="deform_roi_pool.cu",
        name_expressions=tuple(
            _name_expression(kernel, dtype, has_offset, has_mask)
            for kernel in _KERNELS
            for dtype in SUPPORTED_DTYPES
            for has_offset in (False, True)
            for has_mask in (False, True)
        ),
        block_sizes=dict.fromkeys(_KERNELS, BLOCK_SIZE),
        options=(*COMPILE_OPTIONS, f"-DROI_POOL_BLOCK_SIZE={BLOCK_SIZE}"),
    )
)


# --------------------------------------------------------------------------- #
# Argument checking, shared with kernels.ops.deform_psroi_pool.
# --------------------------------------------------------------------------- #


def check_input_and_rois(input: object, rois: object) -> int:
    """input [N, C, H, W] of a supported dtype on CUDA or CPU, rois [K, 5] of
    the same dtype and device; returns K."""
    check_tensor("input", input, 4)
    check_tensor("rois", rois, 2)
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"input has dtype {input.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}"
        )
    if input.device.type not in ("cuda", "cpu"):
        raise ValueError(f"input is on {input.device}; supported: CUDA, or CPU (emulated)")
    if min(input.shape) < 1:
        raise ValueError(f"input must be non-empty, got shape {tuple(input.shape)}")
    if rois.shape[1] != 5:
        raise ValueError(
            f"rois must have shape (K, 5) (batch_index, x1, y1, x2, y2), got {tuple(rois.shape)}"
        )
    check_same_dtype_and_device("rois", rois, input)
    if input.shape[2] * input.shape[3] > launch.INT32_MAX:
        raise ValueError(f"input planes of {input.shape[2]}x{input.shape[3]} exceed 2^31 elements")
    return rois.shape[0]


def check_same_dtype_and_device(name: str, tensor: torch.Tensor, input: torch.Tensor) -> None:
    if tensor.dtype != input.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype}, expected input's dtype {input.dtype}")
    if tensor.device != input.device:
        raise ValueError(f"{name} is on {tensor.device}, expected input's device {input.device}")


def check_values(rois: torch.Tensor, batch: int, **moves: torch.Tensor | None) -> None:
    """Batch indices integral and in [0, batch), coordinates finite, and every
    tensor in ``moves`` (offset, trans: they move sample positions) finite.

    Reads values: on a GPU one synchronisation (the error path takes more,
    to name the first bad element).
    """
    index = rois[:, 0]
    bad_index = (index != index.floor()) | (index < 0) | (index >= batch)
    bad_coordinates = ~torch.isfinite(rois[:, 1:]).all(dim=1)
    given = {name: tensor for name, tensor in moves.items() if tensor is not None}
    flags = torch.stack(
        [
            bad_index.any(),
            bad_coordinates.any(),
            *(~torch.isfinite(tensor).all() for tensor in given.values()),
        ]
    ).tolist()
    if flags[0]:
        k = int(bad_index.nonzero()[0, 0])
        raise ValueError(
            f"rois[:, 0] must hold integer batch indices in [0, {batch}) (input's N), "
            f"got {rois[k, 0].item()!r} in RoI {k}"
        )
    if flags[1]:
        k = int(bad_coordinates.nonzero()[0, 0])
        raise ValueError(
            f"rois[:, 1:] must be finite coordinates, got {rois[k, 1:].tolist()} in RoI {k}"
        )
    for name, bad in zip(given, flags[2:], strict=True):
        if bad:
            raise ValueError(f"{name} must be finite (it moves sample positions), got NaN or Inf")


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_finite_float(name: str, value: object, positive: bool = False) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or (positive and value <= 0)
    ):
        kind = "a positive finite number" if positive else "a finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Every size and parameter of one call, checked against the contract."""

    batch: int
    channels: int
    height: int
    width: int
    num_rois: int
    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int
    gamma: float

    @property
    def bins(self) -> int:
        return self.pooled_h * self.pooled_w

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.num_rois, self.channels, self.pooled_h, self.pooled_w)


def check_arguments(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: torch.Tensor | None,
    mask: torch.Tensor | None,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
) -> Geometry:
    """Check shapes, dtypes, devices and parameters (not values); return the call's sizes."""
    num_rois = check_input_and_rois(input, rois)
    check_positive_int("pooled_h", pooled_h)
    check_positive_int("pooled_w", pooled_w)
    check_positive_int("sampling_ratio", sampling_ratio, minimum=0)
    spatial_scale = check_finite_float("spatial_scale", spatial_scale, positive=True)
    gamma = check_finite_float("gamma", gamma)
    for name, tensor, channels in (("offset", offset, 2), ("mask", mask, 1)):
        if tensor is None:
            continue
        check_tensor(name, tensor, 4)
        check_same_dtype_and_device(name, tensor, input)
        check_shape(
            name,
            tensor,
            (num_rois, channels, pooled_h, pooled_w),
            f"K, {channels}, pooled_h, pooled_w",
        )
    batch, channels, height, width = input.shape
    if channels * pooled_h * pooled_w > launch.INT32_MAX:
        raise ValueError(f"{channels} channels of {pooled_h}x{pooled_w} bins exceed 2^31 per RoI")
    return Geometry(
        batch=batch,
        channels=channels,
        height=height,
        width=width,
        num_rois=num_rois,
        pooled_h=pooled_h,
        pooled_w=pooled_w,
        spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio,
        gamma=gamma,
    )


# --------------------------------------------------------------------------- #
# Launches on already checked, contiguous tensors.
# --------------------------------------------------------------------------- #


def channel_slicing(channels: int, items: int, reduce: bool,
                    device: torch.device) -> launch.Slicing:
    """One channel per thread when nothing is reduced over channels (the
    backward of the input gradient alone); else ``launch.channel_slicing``.
    Shared with ``kernels.ops.deform_psroi_pool``."""
    if not reduce:
        return launch.Slicing(1, channels)
    return launch.channel_slicing(channels, items, device)


def _geometry_arguments(g: Geometry) -> tuple:
    return (
        launch.int32(g.batch),
        launch.int32(g.channels),
        launch.int32(g.height),
        launch.int32(g.width),
        launch.int32(g.pooled_h),
        launch.int32(g.pooled_w),
        launch.float32(g.spatial_scale),
        launch.int32(g.sampling_ratio),
        launch.float32(g.gamma),
    )


def roi_chunks(num_rois: int) -> list[tuple[int, int]]:
    """(start, stop) of the RoIs of each launch: the RoI is blockIdx.y, at most 65535 a launch."""
    step = launch.MAX_GRID_DIM[1]
    return [(start, min(start + step, num_rois)) for start in range(0, num_rois, step)]


def roi_rows(
    tensor: torch.Tensor | None, start: int, stop: int, null: torch.Tensor
) -> torch.Tensor:
    """RoIs start:stop of a [K, ...] tensor (a contiguous view), or ``null`` for None."""
    return null if tensor is None else tensor[start:stop]


def _forward(
    g: Geometry,
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    output = launch.new_output(g.output_shape, input.dtype, input.device)
    kernel = launch.module(SOURCE, input.device).function(
        _name_expression(
            "deform_roi_pool_forward", input.dtype, offset is not None, mask is not None
        )
    )
    null = launch.null(input.dtype, input.device)  # unread without HAS_OFFSET / HAS_MASK
    for start, stop in roi_chunks(g.num_rois):
        kernel(
            (launch.blocks(g.channels * g.bins, BLOCK_SIZE), stop - start),
            BLOCK_SIZE,
            (
                input,
                rois[start:stop],
                roi_rows(offset, start, stop, null),
                roi_rows(mask, start, stop, null),
                output[start:stop],
                *_geometry_arguments(g),
            ),
        )
    return output


def _backward(
    g: Geometry,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: torch.Tensor | None,
    mask: torch.Tensor | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_offset, grad_mask); unrequested ones are empty tensors."""
    dtype, device = input.dtype, input.device
    want_input = output_mask[0]
    want_offset = output_mask[1] and offset is not None
    want_mask = output_mask[2] and mask is not None

    def empty():
        return torch.empty(0, dtype=dtype, device=device)

    # float32 accumulation: half-precision atomics would round every one of
    # the many additions a pixel receives (and bfloat16 ones are CAS loops).
    grad_input = (
        torch.zeros(input.shape, dtype=torch.float32, device=device) if want_input else None
    )
    slicing = channel_slicing(g.channels, g.num_rois * g.bins, want_offset or want_mask, device)
    offset_partial = (
        launch.new_output(
            (g.num_rois, slicing.slices, 2, g.pooled_h, g.pooled_w), torch.float32, device
        )
        if want_offset
        else None
    )
    mask_partial = (
        launch.new_output(
            (g.num_rois, slicing.slices, 1, g.pooled_h, g.pooled_w), torch.float32, device
        )
        if want_mask
        else None
    )
    if want_input or want_offset or want_mask:
        kernel = launch.module(SOURCE, device).function(
            _name_expression(
                "deform_roi_pool_backward", dtype, offset is not None, mask is not None
            )
        )
        null, null_float = launch.null(dtype, device), launch.null(torch.float32, device)
        for start, stop in roi_chunks(g.num_rois):
            kernel(
                (launch.blocks(slicing.slices * g.bins, BLOCK_SIZE), stop - start),
                BLOCK_SIZE,
                (
                    input,
                    rois[start:stop],
                    roi_rows(offset, start, stop, null),
                    roi_rows(mask, start, stop, null),
                    grad_output[start:stop],
                    null_float if grad_input is None else grad_input,
                    roi_rows(offset_partial, start, stop, null_float),
                    roi_rows(mask_partial, start, stop, null_float),
                    *_geometry_arguments(g),
                    launch.int32(slicing.channels_per_thread),
                    launch.int32(slicing.slices),
                ),
            )
    return (
        empty() if grad_input is None else grad_input.to(dtype),
        empty() if offset_partial is None else offset_partial.sum(1).to(dtype),
        empty() if mask_partial is None else mask_partial.sum(1).to(dtype),
    )


# --------------------------------------------------------------------------- #
# torch.library operators: what autograd and torch.compile see.
# --------------------------------------------------------------------------- #

def _geometry_from_op(input, rois, params) -> Geometry:
    """The sizes of an already checked call, from the operator's arguments (no checks:
    the public functions and :func:`prepare` check, values included, before calling
    the operator, so the operator itself never synchronises)."""
    batch, channels, height, width = input.shape
    return Geometry(batch, channels, height, width, rois.shape[0], *params)


_PARAMS_SCHEMA = "int pooled_h, int pooled_w, float spatial_scale, int sampling_ratio, float gamma"


@torch.library.custom_op(
    "dcnbench::deform_roi_pool",
    mutates_args=(),
    schema=f"(Tensor input, Tensor rois, Tensor? offset, Tensor? mask, {_PARAMS_SCHEMA}) -> Tensor",
)
def _deform_roi_pool_op(input, rois, offset, mask, *params):
    return _forward(_geometry_from_op(input, rois, params), input, rois, offset, mask)


@_deform_roi_pool_op.register_fake
def _(input, rois, offset, mask, pooled_h, pooled_w, *params):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_h, pooled_w))


@torch.library.custom_op(
    "dcnbench::deform_roi_pool_backward",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor rois, Tensor? offset, Tensor? mask, "
    f"{_PARAMS_SCHEMA}, bool[] output_mask) -> (Tensor, Tensor, Tensor)",
)
def _deform_roi_pool_backward_op(grad_output, input, rois, offset, mask, *params_and_mask):
    *params, output_mask = params_and_mask
    g = _geometry_from_op(input, rois, params)
    return _backward(g, grad_output.contiguous(), input, rois, offset, mask, output_mask)


@_deform_roi_pool_backward_op.register_fake
def _(grad_output, input, rois, offset, mask, *params_and_mask):
    output_mask = params_and_mask[-1]
    shapes = (
        input.shape,
        None if offset is None else offset.shape,
        None if mask is None else mask.shape,
    )
    return tuple(
        input.new_empty(shape if wanted and shape is not None else (0,))
        for shape, wanted in zip(shapes, output_mask, strict=True)
    )


def _setup_context(ctx, inputs, output):
    input, rois, offset, mask, *params = inputs
    ctx.save_for_backward(input, rois, offset, mask)
    ctx.params = params


def _autograd_backward(ctx, grad_output):
    input, rois, offset, mask = ctx.saved_tensors
    needs = ctx.needs_input_grad
    output_mask = [needs[0], offset is not None and needs[2], mask is not None and needs[3]]
    grads = torch.ops.dcnbench.deform_roi_pool_backward(
        grad_output, input, rois, offset, mask, *ctx.params, output_mask
    )
    grad_input, grad_offset, grad_mask = (
        grad if wanted else None for grad, wanted in zip(grads, output_mask, strict=True)
    )
    return (grad_input, None, grad_offset, grad_mask, *(None for _ in ctx.params))


_deform_roi_pool_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- #
# Public functions.
# --------------------------------------------------------------------------- #


@torch.library.custom_op("dcnbench::check_roi_values", mutates_args=(),
                         schema="(Tensor rois, int batch, Tensor? moves, str name) -> ()")
def _check_values_op(rois, batch, moves, name):
    """:func:`check_values` as an operator: torch.compile keeps it whole (it reads values,
    which a traced graph cannot) instead of breaking the graph there."""
    check_values(rois, batch, **{name: moves})


@_check_values_op.register_fake
def _(rois, batch, moves, name):
    return None


def _operands(input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio,
              gamma) -> tuple[Geometry, tuple]:
    """Check shapes, dtypes, devices and parameters; the call's sizes and the
    operator's arguments, dense."""
    g = check_arguments(
        input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma
    )
    # Kernels read dense tensors: a non-contiguous argument is copied once here.
    operands = (
        input.contiguous(),
        rois.contiguous(),
        None if offset is None else offset.contiguous(),
        None if mask is None else mask.contiguous(),
        g.pooled_h,
        g.pooled_w,
        g.spatial_scale,
        g.sampling_ratio,
        g.gamma,
    )
    return g, operands


def prepare(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float = 0.1,
) -> Callable[[], torch.Tensor]:
    """Check the arguments of :func:`modulated_deform_roi_pool` (``mask`` None:
    :func:`deform_roi_pool`; ``offset`` None too: :func:`roi_align`) once, values
    included; the returned call runs the operator on them with no checks and no
    host synchronisation: the harness's timed call. Differentiable like the public
    functions; the tensors' values must stay valid between calls.
    """
    g, operands = _operands(
        input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma
    )
    check_values(rois, g.batch, offset=offset)
    return functools.partial(torch.ops.dcnbench.deform_roi_pool, *operands)


def _pool(input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma):
    g, operands = _operands(
        input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma
    )
    torch.ops.dcnbench.check_roi_values(rois, g.batch, offset, "offset")
    return torch.ops.dcnbench.deform_roi_pool(*operands)


def roi_align(
    input: torch.Tensor,
    rois: torch.Tensor,
    *,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
) -> torch.Tensor:
    """RoIAlign (average) with our CUDA kernels: ``torchvision.ops.roi_align(aligned=True)``.

    :func:`deform_roi_pool` without offset; differentiable in ``input``.

    Args:
        input: [N, C, H, W], float32 / float16 / bfloat16.
        rois: [K, 5] of (batch_index, x1, y1, x2, y2) in image coordinates;
            same dtype and device as input; batch indices integral in [0, N),
            coordinates finite (checked: one host synchronisation on a GPU).
        pooled_h, pooled_w: output bins per RoI (>= 1).
        spatial_scale: image to feature-map scale (> 0).
        sampling_ratio: samples per bin side; 0: ceil(roi size / pooled size).

    Returns:
        [K, C, pooled_h, pooled_w].
    """
    return _pool(input, rois, None, None, pooled_h, pooled_w, spatial_scale, sampling_ratio, 0.0)


def deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: torch.Tensor | None,
    *,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float = 0.1,
) -> torch.Tensor:
    """Deformable RoI pooling (DCNv1; mmcv's ``deform_roi_pool``) with our CUDA kernels.

    Bin (ph, pw) of RoI k moves by gamma·(roi_w·offset[k, 0, ph, pw],
    roi_h·offset[k, 1, ph, pw]) and averages its sampling grid by rule B1.
    Differentiable in ``input`` and ``offset``.

    Args:
        input: [N, C, H, W], float32 / float16 / bfloat16.
        rois: [K, 5], as :func:`roi_align`.
        offset: [K, 2, pooled_h, pooled_w] (channel 0 moves x, 1 moves y), or
            None: exactly :func:`roi_align`.
        pooled_h, pooled_w, spatial_scale, sampling_ratio: as :func:`roi_align`.
        gamma: offset scale (default 0.1).

    All tensors share one dtype and device; non-contiguous ones are copied.

    Returns:
        [K, C, pooled_h, pooled_w].
    """
    return _pool(
        input, rois, offset, None, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma
    )


def modulated_deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: torch.Tensor | None,
    mask: torch.Tensor,
    *,
    pooled_h: int,
    pooled_w: int,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float = 0.1,
) -> torch.Tensor:
    """Modulated deformable RoI pooling (DCNv2): :func:`deform_roi_pool` times ``mask``.

    Args:
        input: [N, C, H, W].
        rois: [K, 5].
        offset: [K, 2, pooled_h, pooled_w], or None (no offset).
        mask: [K, 1, pooled_h, pooled_w], used as given (already through a sigmoid).
        pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma: as :func:`deform_roi_pool`.

    Differentiable in ``input``, ``offset`` and ``mask``.

    Returns:
        [K, C, pooled_h, pooled_w].
    """
    if mask is None:
        raise TypeError("mask must be a torch.Tensor (use deform_roi_pool without one), got None")
    return _pool(
        input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma
    )
