"""Our RoI pooling kernels: ``roi_align``, ``deform_roi_pool``, ``modulated_deform_roi_pool``.

Semantics: ``shared/ops-semantics.md`` ("RoI pooling, NCHW"): mmcv's
DeformRoIPool / ModulatedDeformRoIPool, and ``roi_align`` =
``torchvision.ops.roi_align`` (with ``aligned``, ``deform_roi_pool`` without
offset); sampling rule B1. float32 / float16 / bfloat16 with float32
accumulation, and float64 computed in float64 (for
``torch.autograd.gradcheck``). Design notes: ``docs/kernels/roi_pool.md``.

One forward and one backward kernel, templated on HAS_OFFSET / HAS_MASK,
serve the three operators, in two designs picked by ``design=``:

- ``"pw_fastest"`` (``kernels/cuda/deform_roi_pool.cu``, the default): one
  thread per output element, the pooled width fastest (torchvision's and
  mmcv's mapping);
- ``"channels_fastest"`` (``kernels/cuda/deform_roi_pool_channels_fastest.cu``):
  the lanes of a warp are 32 channels of one bin, reading an NHWC staging of
  the input and scattering into an NHWC gradient, each transposed by a pass of
  its own; ``sampling_ratio`` 1 and 2 are compile-time constants.
 The backward
scatters grad_input with atomics into a buffer of the accumulation dtype (float32;
float64 for float64; cast once at the end) -- under ``torch.use_deterministic_algorithms(True)`` with
fixed-point int64 atomics instead, bit-reproducible (:class:`InputGradient`,
``kernels/determinism.py``) -- and writes per-channel-slice partial sums of
grad_offset / grad_mask, summed here (no atomics: reproducible either way).
Only requested gradients are computed.

``rois`` (a [K, 5] tensor or a list of [L, 4] boxes per image, see
``kernels.rois``) values are checked on the host (integral batch indices in
range, finite coordinates, adaptive sampling grids within
``kernels.rois.MAX_SAMPLES_PER_BIN``): on a GPU that is one
device-to-host synchronisation per forward call (:func:`check_values`), the
price of a clear error instead of a silently wrong result. ``offset``
values are not checked: a NaN or infinite one puts its bin's samples outside
the map (docs/ops-semantics.md, "Non-finite positions"), as the kernels'
in-range tests, written as "inside", do by themselves.

K = 0 RoIs or C = 0 channels give an empty output of the right shape and
zero gradients, without a launch.

:func:`prepare` checks them once and returns a call that never synchronises
(the harness times that).

On a CPU tensor the kernels run through ``kernels.emulator``: for correctness
checks, never for timing.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from kernels import checks, determinism, launch
from kernels.checks import check_shape, check_tensor
from kernels.cuda_sources import COMPILE_OPTIONS, CudaSource, register
from kernels.rois import (
    MAX_SAMPLES_PER_BIN,
    as_rois,
    check_explicit_grid,
    grid_too_large,
    grid_too_large_error,
)

__all__ = [
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPool",
    "ModulatedDeformRoIPoolPack",
    "RoIAlign",
    "deform_roi_pool",
    "modulated_deform_roi_pool",
    "prepare",
    "roi_align",
]

# Threads per block of both kernels; the .cu gets it as a macro so its
# __launch_bounds__ and our grids cannot disagree.
BLOCK_SIZE = 256
DESIGNS = ("pw_fastest", "channels_fastest")
# The channels-fastest design: a warp's lanes are this many channels of one
# bin; a block owns this many channels of at most BIN_TILE bins of one RoI
# (its shared-memory tile: 32 x 65 accumulators, 8 KiB in float32); the
# sampling ratios it compiles as constants (others, and the adaptive grid,
# take the runtime loop); the staging transpose's block.
CHANNELS_PER_WARP = 32
BIN_TILE = 64
SPECIALISED_SAMPLING_RATIOS = (1, 2)
TRANSPOSE_BLOCK_SIZE = 256
TRANSPOSE_TILE = 32

_CTYPES = {
    torch.float32: "float",
    torch.float16: "__half",
    torch.bfloat16: "__nv_bfloat16",
    torch.float64: "double",
}
SUPPORTED_DTYPES = tuple(_CTYPES)
# The rois may come in the input's dtype or in float32 (what autocast hands
# to half features); the kernels read them in the accumulation dtype.
ROIS_DTYPE = torch.float32


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the kernels compute and accumulate in for input of ``dtype``
    (``acc_t`` in scalar_conversions.cuh): float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def accumulate_scalar(value: float, dtype: torch.dtype) -> np.floating:
    """A real kernel parameter of the accumulation type of ``dtype``."""
    return np.float64(value) if dtype == torch.float64 else launch.float32(value)


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
        options=(
            *COMPILE_OPTIONS,
            f"-DROI_POOL_BLOCK_SIZE={BLOCK_SIZE}",
            f"-DROI_POOL_MAX_SAMPLES={MAX_SAMPLES_PER_BIN}",
        ),
    )
)


_CHANNELS_FASTEST_KERNELS = (
    "deform_roi_pool_channels_fastest_forward",
    "deform_roi_pool_channels_fastest_backward",
)


def sampling_variant(sampling_ratio: int) -> int:
    """The channels-fastest kernels' SAMPLING: the ratio if specialised, else 0 (runtime)."""
    return sampling_ratio if sampling_ratio in SPECIALISED_SAMPLING_RATIOS else 0


def _channels_fastest_name(
    kernel: str, dtype: torch.dtype, has_offset: bool, has_mask: bool, sampling: int
) -> str:
    flags = ", ".join("true" if flag else "false" for flag in (has_offset, has_mask))
    return f"{kernel}<{_CTYPES[dtype]}, {flags}, {sampling}>"


def transpose_name(from_dtype: torch.dtype, to_dtype: torch.dtype) -> str:
    return f"transpose_rows_and_columns<{_CTYPES[from_dtype]}, {_CTYPES[to_dtype]}>"


# The staging transposes: each dtype to itself (input -> NHWC; a fixed-point
# gradient's result back), and the float32 accumulator to each half type.
TRANSPOSE_PAIRS = (
    *((dtype, dtype) for dtype in SUPPORTED_DTYPES),
    (torch.float32, torch.float16),
    (torch.float32, torch.bfloat16),
)
TRANSPOSE_OPTIONS = (f"-DTRANSPOSE_BLOCK_SIZE={TRANSPOSE_BLOCK_SIZE}",)

CHANNELS_FASTEST_SOURCE = register(
    CudaSource(
        filename="deform_roi_pool_channels_fastest.cu",
        name_expressions=(
            *(
                _channels_fastest_name(kernel, dtype, has_offset, has_mask, sampling)
                for kernel in _CHANNELS_FASTEST_KERNELS
                for dtype in SUPPORTED_DTYPES
                for has_offset in (False, True)
                for has_mask in (False, True)
                for sampling in (0, *SPECIALISED_SAMPLING_RATIOS)
            ),
            *(transpose_name(a, b) for a, b in TRANSPOSE_PAIRS),
        ),
        block_sizes={
            **dict.fromkeys(_CHANNELS_FASTEST_KERNELS, BLOCK_SIZE),
            "transpose_rows_and_columns": TRANSPOSE_BLOCK_SIZE,
        },
        options=(*SOURCE.options, f"-DROI_POOL_BIN_TILE={BIN_TILE}", *TRANSPOSE_OPTIONS),
    )
)


def check_design(design: object, designs: tuple[str, ...] = DESIGNS) -> str:
    """``design`` if it is one of ``designs`` (an op's: deform_psroi_pool has one more)."""
    if design not in designs:
        raise ValueError(f"design must be one of {', '.join(map(repr, designs))}, got {design!r}")
    return design


def transpose_rows_and_columns(
    source: CudaSource, tensor: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype
) -> torch.Tensor:
    """``tensor`` viewed as [batch, rows, middle, columns] -> [batch, columns, middle, rows]
    of ``dtype``, by the staging transpose of ``source`` (whose instantiations
    must include the pair; ``TRANSPOSE_PAIRS``). Shared with kernels.ops.deform_psroi_pool."""
    batch, rows, middle, columns = shape
    output = launch.new_output((batch, columns, middle, rows), dtype, tensor.device)
    if output.numel() == 0:
        return output
    kernel = launch.module(source, tensor.device).function(transpose_name(tensor.dtype, dtype))
    tiles = batch * middle * launch.blocks(rows, TRANSPOSE_TILE) * launch.blocks(columns, TRANSPOSE_TILE)
    kernel(
        tiles,
        TRANSPOSE_BLOCK_SIZE,
        (tensor, output, *(launch.int32(size) for size in shape)),
    )
    return output


# --------------------------------------------------------------------------- #
# Argument checking, shared with kernels.ops.deform_psroi_pool.
# --------------------------------------------------------------------------- #


def check_input_and_rois(input: object, rois: object) -> int:
    """input [N, C, H, W] of a supported dtype on CUDA or CPU (N and C may be
    0, H and W not), rois [K, 5] of the input's dtype or float32 on its
    device; returns K."""
    check_tensor("input", input, 4)
    check_tensor("rois", rois, 2)
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"input has dtype {input.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}"
        )
    if input.device.type not in ("cuda", "cpu"):
        raise ValueError(f"input is on {input.device}; supported: CUDA, or CPU (emulated)")
    if min(input.shape[2:]) < 1:
        raise ValueError(f"input must have H, W >= 1, got shape {tuple(input.shape)}")
    if rois.shape[1] != 5:
        raise ValueError(
            f"rois must have shape (K, 5) (batch_index, x1, y1, x2, y2), got {tuple(rois.shape)}"
        )
    if rois.dtype not in (input.dtype, ROIS_DTYPE):
        also = "" if input.dtype == ROIS_DTYPE else f" or {ROIS_DTYPE}"
        raise TypeError(
            f"rois has dtype {rois.dtype}, expected input's dtype {input.dtype}{also}"
        )
    if rois.device != input.device:
        raise ValueError(f"rois is on {rois.device}, expected input's device {input.device}")
    if input.shape[2] * input.shape[3] > launch.INT32_MAX:
        raise ValueError(f"input planes of {input.shape[2]}x{input.shape[3]} exceed 2^31 elements")
    return rois.shape[0]


def check_same_dtype_and_device(name: str, tensor: torch.Tensor, input: torch.Tensor) -> None:
    if tensor.dtype != input.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype}, expected input's dtype {input.dtype}")
    if tensor.device != input.device:
        raise ValueError(f"{name} is on {tensor.device}, expected input's device {input.device}")


def check_values(
    rois: torch.Tensor,
    batch: int,
    adaptive: Geometry | AdaptiveGrid | None = None,
) -> None:
    """Batch indices integral and in [0, batch), coordinates finite, and,
    given the ``adaptive`` geometry of a call with sampling_ratio <= 0, every
    RoI's sampling grid within ``MAX_SAMPLES_PER_BIN``. (Offsets and trans
    need no check: a non-finite one samples outside the map.)

    Reads values: on a GPU one synchronisation (the error path takes more,
    to name the first bad element). Callers that check a case once (the
    harness) may call it outside the timed call.
    """
    index = rois[:, 0]
    bad_index = (index != index.floor()) | (index < 0) | (index >= batch)
    bad_coordinates = ~torch.isfinite(rois[:, 1:]).all(dim=1)
    grid_h, grid_w = (None, None) if adaptive is None else adaptive_grid(rois, adaptive)
    bad_grid = (
        torch.zeros_like(bad_index) if adaptive is None else grid_too_large(grid_h, grid_w)
    )
    flags = torch.stack([bad_index.any(), bad_coordinates.any(), bad_grid.any()]).tolist()
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
    if flags[2]:
        k = int(bad_grid.nonzero()[0, 0])
        raise grid_too_large_error(k, int(grid_h[k]), int(grid_w[k]))


class AdaptiveGrid(NamedTuple):
    """What an adaptive sampling grid depends on (a :class:`Geometry` has these too)."""

    pooled_h: int
    pooled_w: int
    spatial_scale: float
    aligned: bool


def adaptive_grid(rois: torch.Tensor, g: Geometry | AdaptiveGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """(grid_h, grid_w), float64 [K]: the adaptive sampling grid of each RoI,
    ceil(roi size / pooled size) clamped below at 0, as the kernel computes it
    (in float32 there: this may differ by one sample a side at a ceil's edge)."""
    rois = rois.double()
    shift = 0.5 if g.aligned else 0.0
    size_w = (rois[:, 3] * g.spatial_scale - shift) - (rois[:, 1] * g.spatial_scale - shift)
    size_h = (rois[:, 4] * g.spatial_scale - shift) - (rois[:, 2] * g.spatial_scale - shift)
    if not g.aligned:
        size_w, size_h = size_w.clamp(min=1), size_h.clamp(min=1)
    return (
        torch.ceil(size_h / g.pooled_h).clamp(min=0),
        torch.ceil(size_w / g.pooled_w).clamp(min=0),
    )


def check_positive_int(name: str, value: object, minimum: int | None = 1) -> int:
    """``value`` an int (of any type ``checks.as_int`` takes) >= ``minimum`` (None: any int)."""
    return checks.as_int(name, value, minimum)


def check_bool(name: str, value: object) -> bool:
    return checks.as_bool(name, value)


def check_finite_float(name: str, value: object, positive: bool = False) -> float:
    return checks.as_float(name, value, positive)


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
    sampling_ratio: int  # <= 0: adaptive
    gamma: float
    aligned: bool

    @property
    def bins(self) -> int:
        return self.pooled_h * self.pooled_w

    @property
    def empty(self) -> bool:
        """No RoI or no channel: nothing to launch, the output has no element."""
        return self.num_rois == 0 or self.channels == 0

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
    aligned: bool,
) -> Geometry:
    """Check shapes, dtypes, devices and parameters (not values); return the call's sizes."""
    num_rois = check_input_and_rois(input, rois)
    check_positive_int("pooled_h", pooled_h)
    check_positive_int("pooled_w", pooled_w)
    check_positive_int("sampling_ratio", sampling_ratio, minimum=None)
    check_explicit_grid("sampling_ratio", sampling_ratio)
    spatial_scale = check_finite_float("spatial_scale", spatial_scale, positive=True)
    gamma = check_finite_float("gamma", gamma)
    check_bool("aligned", aligned)
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
        aligned=aligned,
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


class InputGradient:
    """Where a backward scatters grad_input: a zeroed accumulator of the
    accumulation dtype (float32, float64 for float64 input), or
    under ``torch.use_deterministic_algorithms(True)`` order-independent
    fixed-point sums (``kernels/determinism.py``; the same atomics, 64-bit
    integer ones, plus the bound's reductions and one status read).
    Shared with ``kernels.ops.deform_psroi_pool``.

    ``bound`` gives (max |value added|, most values one element receives);
    called only in deterministic mode (it reads values: a synchronisation).
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        bound: Callable[[], tuple[float, int]],
    ) -> None:
        self.device = device
        self.accumulate = accumulate_dtype(dtype)
        self.fixed = None
        self.accumulator = None
        if determinism.enabled():
            max_abs, max_addends = bound()
            self.fixed = determinism.FixedPointSum(shape, device, max_abs, max(max_addends, 1))
        else:
            self.accumulator = torch.zeros(shape, dtype=self.accumulate, device=device)

    def kernel_args(self) -> tuple:
        """``grad_input, grad_input_fixed, fixed_scale, fixed_status`` of a backward kernel."""
        if self.fixed is None:
            return (self.accumulator, *determinism.FixedPointSum.unused(self.device))
        return (launch.null(self.accumulate, self.device), *self.fixed.kernel_args())

    @staticmethod
    def arguments(
        grad_input: InputGradient | None, dtype: torch.dtype, device: torch.device
    ) -> tuple:
        """:meth:`kernel_args` of ``grad_input``, or when it is None (grad_input of
        ``dtype`` not wanted) the same arguments for no scatter."""
        if grad_input is not None:
            return grad_input.kernel_args()
        return (
            launch.null(accumulate_dtype(dtype), device),
            *determinism.FixedPointSum.unused(device),
        )

    def accumulated(self, dtype: torch.dtype) -> torch.Tensor:
        """After the kernels ran, the float accumulator itself, or the fixed-point
        sums in ``dtype``: what a transpose back reads (it casts on the way)."""
        if self.fixed is None:
            return self.accumulator
        return self.fixed.result(dtype)

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        """grad_input in ``dtype``, after the kernels ran."""
        return self.accumulated(dtype).to(dtype)


def _geometry_arguments(g: Geometry, dtype: torch.dtype) -> tuple:
    return (
        launch.int32(g.batch),
        launch.int32(g.channels),
        launch.int32(g.height),
        launch.int32(g.width),
        launch.int32(g.pooled_h),
        launch.int32(g.pooled_w),
        accumulate_scalar(g.spatial_scale, dtype),
        launch.int32(g.sampling_ratio),
        accumulate_scalar(g.gamma, dtype),
        launch.int32(int(g.aligned)),
    )


def roi_chunks(num_rois: int) -> list[tuple[int, int]]:
    """(start, stop) of the RoIs of each launch: the RoI is blockIdx.y, at most 65535 a launch."""
    step = launch.MAX_GRID_DIM[1]
    return [(start, min(start + step, num_rois)) for start in range(0, num_rois, step)]


class PerRoi(NamedTuple):
    """A kernel argument of one row per RoI ([K, ...]): each launch of
    :func:`launch_per_roi_chunk` passes its chunk's rows (a contiguous view), or
    ``null`` where the tensor is None."""

    tensor: torch.Tensor | None
    null: torch.Tensor | None = None


def launch_per_roi_chunk(
    kernel, blocks_per_roi: int, block_size: int, num_rois: int, arguments: tuple
) -> None:
    """Launches ``kernel`` once per chunk of :func:`roi_chunks` (the RoI is blockIdx.y),
    with the chunk's rows of the :class:`PerRoi` arguments and the others as they are."""
    for start, stop in roi_chunks(num_rois):
        kernel(
            (blocks_per_roi, stop - start),
            block_size,
            tuple(
                _chunk_rows(argument, start, stop) if isinstance(argument, PerRoi) else argument
                for argument in arguments
            ),
        )


def _chunk_rows(argument: PerRoi, start: int, stop: int) -> torch.Tensor:
    return argument.null if argument.tensor is None else argument.tensor[start:stop]


def channel_chunks(channels: int) -> int:
    """The channels-fastest design's warps per bin: 32 channels each."""
    return launch.blocks(channels, CHANNELS_PER_WARP)


def _channels_fastest_blocks(g: Geometry) -> int:
    """Blocks of one RoI: a chunk of 32 channels by a tile of BIN_TILE bins each."""
    return channel_chunks(g.channels) * launch.blocks(g.bins, BIN_TILE)


def to_channels_last(input: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> its NHWC staging [N, H, W, C] (a transpose pass of ours)."""
    n, c, h, w = input.shape
    staged = transpose_rows_and_columns(CHANNELS_FASTEST_SOURCE, input, (n, c, 1, h * w), input.dtype)
    return staged.view(n, h, w, c)


def _forward(
    g: Geometry,
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: torch.Tensor | None,
    mask: torch.Tensor | None,
    design: str,
) -> torch.Tensor:
    output = launch.new_output(g.output_shape, input.dtype, input.device)
    if g.empty:
        return output
    if design == "channels_fastest":
        _forward_channels_fastest(g, input, rois, offset, mask, output)
        return output
    kernel = launch.module(SOURCE, input.device).function(
        _name_expression(
            "deform_roi_pool_forward", input.dtype, offset is not None, mask is not None
        )
    )
    null = launch.null(input.dtype, input.device)  # unread without HAS_OFFSET / HAS_MASK
    rois = rois.to(accumulate_dtype(input.dtype)).contiguous()
    launch_per_roi_chunk(
        kernel,
        launch.blocks(g.channels * g.bins, BLOCK_SIZE),
        BLOCK_SIZE,
        g.num_rois,
        (
            input,
            PerRoi(rois),
            PerRoi(offset, null),
            PerRoi(mask, null),
            PerRoi(output),
            *_geometry_arguments(g, input.dtype),
        ),
    )
    return output


def _forward_channels_fastest(
    g: Geometry,
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: torch.Tensor | None,
    mask: torch.Tensor | None,
    output: torch.Tensor,
) -> None:
    kernel = launch.module(CHANNELS_FASTEST_SOURCE, input.device).function(
        _channels_fastest_name(
            "deform_roi_pool_channels_fastest_forward", input.dtype, offset is not None,
            mask is not None, sampling_variant(g.sampling_ratio),
        )
    )
    null = launch.null(input.dtype, input.device)  # unread without HAS_OFFSET / HAS_MASK
    staged = to_channels_last(input)
    rois = rois.to(accumulate_dtype(input.dtype)).contiguous()
    launch_per_roi_chunk(
        kernel,
        _channels_fastest_blocks(g),
        BLOCK_SIZE,
        g.num_rois,
        (
            staged,
            PerRoi(rois),
            PerRoi(offset, null),
            PerRoi(mask, null),
            PerRoi(output),
            *_geometry_arguments(g, input.dtype),
        ),
    )


def _partial_sums(
    g: Geometry,
    slices: int,
    components: int,
    wanted: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """[K, slices, components, pooled_h, pooled_w]: a backward's partial sums of the
    offset (2 components) or mask (1) gradient, one per slice of the channels;
    None when that gradient is not wanted."""
    if not wanted:
        return None
    return launch.new_output((g.num_rois, slices, components, g.pooled_h, g.pooled_w), dtype, device)


def _backward(
    g: Geometry,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: torch.Tensor | None,
    mask: torch.Tensor | None,
    output_mask: list[bool],
    design: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_offset, grad_mask); unrequested ones are empty tensors."""
    dtype, device = input.dtype, input.device
    want_input = output_mask[0]
    want_offset = output_mask[1] and offset is not None
    want_mask = output_mask[2] and mask is not None

    def empty():
        return torch.empty(0, dtype=dtype, device=device)

    if g.empty:
        # Nothing pooled: every requested gradient is zero.
        return tuple(
            torch.zeros(tensor.shape, dtype=dtype, device=device) if wanted else empty()
            for tensor, wanted in ((input, want_input), (offset, want_offset), (mask, want_mask))
        )
    accumulate = accumulate_dtype(dtype)
    rois = rois.to(accumulate).contiguous()

    def bound() -> tuple[float, int]:
        # A value added is grad_output * mask * weight / count, weight <= 1;
        # an element receives at most one per sample of every bin.
        if g.sampling_ratio > 0:
            samples = g.sampling_ratio**2
        else:
            grid_h, grid_w = adaptive_grid(rois, g)
            samples = int((grid_h * grid_w).max().clamp(max=MAX_SAMPLES_PER_BIN))
        max_abs = determinism.max_abs(grad_output) * determinism.max_abs(mask)
        return max_abs, g.num_rois * g.bins * samples

    if design == "channels_fastest":
        return _backward_channels_fastest(
            g, grad_output, input, rois, offset, mask, want_input, want_offset, want_mask, bound
        )
    # float32 accumulation (float64 for float64): half-precision atomics would
    # round every one of the many additions a pixel receives (and bfloat16
    # ones are CAS loops).
    grad_input = InputGradient(input.shape, dtype, device, bound) if want_input else None
    slicing = channel_slicing(g.channels, g.num_rois * g.bins, want_offset or want_mask, device)
    offset_partial = _partial_sums(g, slicing.slices, 2, want_offset, accumulate, device)
    mask_partial = _partial_sums(g, slicing.slices, 1, want_mask, accumulate, device)
    if want_input or want_offset or want_mask:
        kernel = launch.module(SOURCE, device).function(
            _name_expression(
                "deform_roi_pool_backward", dtype, offset is not None, mask is not None
            )
        )
        null, null_accumulate = launch.null(dtype, device), launch.null(accumulate, device)
        launch_per_roi_chunk(
            kernel,
            launch.blocks(slicing.slices * g.bins, BLOCK_SIZE),
            BLOCK_SIZE,
            g.num_rois,
            (
                input,
                PerRoi(rois),
                PerRoi(offset, null),
                PerRoi(mask, null),
                PerRoi(grad_output),
                *InputGradient.arguments(grad_input, dtype, device),
                PerRoi(offset_partial, null_accumulate),
                PerRoi(mask_partial, null_accumulate),
                *_geometry_arguments(g, dtype),
                launch.int32(slicing.channels_per_thread),
                launch.int32(slicing.slices),
            ),
        )
    return (
        empty() if grad_input is None else grad_input.result(dtype),
        empty() if offset_partial is None else offset_partial.sum(1).to(dtype),
        empty() if mask_partial is None else mask_partial.sum(1).to(dtype),
    )


def _backward_channels_fastest(
    g: Geometry,
    grad_output: torch.Tensor,
    input: torch.Tensor,
    rois: torch.Tensor,
    offset: torch.Tensor | None,
    mask: torch.Tensor | None,
    want_input: bool,
    want_offset: bool,
    want_mask: bool,
    bound: Callable[[], tuple[float, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_backward` of the channels-fastest design: grad_input accumulates
    in NHWC and is transposed back (cast to the dtype on the way); the offset
    and mask gradients come as one partial sum per chunk of 32 channels."""
    dtype, device = input.dtype, input.device
    accumulate = accumulate_dtype(dtype)
    n, c, h, w = input.shape
    grad_input = InputGradient((n, h, w, c), dtype, device, bound) if want_input else None
    chunks = channel_chunks(g.channels)
    offset_partial = _partial_sums(g, chunks, 2, want_offset, accumulate, device)
    mask_partial = _partial_sums(g, chunks, 1, want_mask, accumulate, device)
    kernel = launch.module(CHANNELS_FASTEST_SOURCE, device).function(
        _channels_fastest_name(
            "deform_roi_pool_channels_fastest_backward", dtype, offset is not None,
            mask is not None, sampling_variant(g.sampling_ratio),
        )
    )
    null, null_accumulate = launch.null(dtype, device), launch.null(accumulate, device)
    # The values are read only for the offset and mask gradients.
    staged = to_channels_last(input) if want_offset or want_mask else null
    launch_per_roi_chunk(
        kernel,
        _channels_fastest_blocks(g),
        BLOCK_SIZE,
        g.num_rois,
        (
            staged,
            PerRoi(rois),
            PerRoi(offset, null),
            PerRoi(mask, null),
            PerRoi(grad_output),
            *InputGradient.arguments(grad_input, dtype, device),
            PerRoi(offset_partial, null_accumulate),
            PerRoi(mask_partial, null_accumulate),
            *_geometry_arguments(g, dtype),
        ),
    )
    def empty():  # one each: the operator's outputs must not alias
        return torch.empty(0, dtype=dtype, device=device)

    return (
        empty() if grad_input is None else transpose_rows_and_columns(
            CHANNELS_FASTEST_SOURCE, grad_input.accumulated(dtype), (n, h * w, 1, c), dtype
        ).view(n, c, h, w),
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


_PARAMS_SCHEMA = (
    "int pooled_h, int pooled_w, float spatial_scale, int sampling_ratio, float gamma, bool aligned"
)


@torch.library.custom_op(
    "dcnbench::deform_roi_pool",
    mutates_args=(),
    schema=f"(Tensor input, Tensor rois, Tensor? offset, Tensor? mask, {_PARAMS_SCHEMA}, "
    "str design) -> Tensor",
)
def _deform_roi_pool_op(input, rois, offset, mask, *params_and_design):
    *params, design = params_and_design
    return _forward(_geometry_from_op(input, rois, params), input, rois, offset, mask, design)


@_deform_roi_pool_op.register_fake
def _(input, rois, offset, mask, pooled_h, pooled_w, *params_and_design):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_h, pooled_w))


@torch.library.custom_op(
    "dcnbench::deform_roi_pool_backward",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor rois, Tensor? offset, Tensor? mask, "
    f"{_PARAMS_SCHEMA}, str design, bool[] output_mask) -> (Tensor, Tensor, Tensor)",
)
def _deform_roi_pool_backward_op(grad_output, input, rois, offset, mask, *params_and_mask):
    *params, design, output_mask = params_and_mask
    g = _geometry_from_op(input, rois, params)
    return _backward(g, grad_output.contiguous(), input, rois, offset, mask, output_mask, design)


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


def pooled_size(output_size: object, pooled_h: object, pooled_w: object) -> tuple[int, int]:
    """(pooled_h, pooled_w) from torchvision's / mmcv's ``output_size`` (an int
    or an (h, w) pair) or from the contract's ``pooled_h`` and ``pooled_w``:
    exactly one of the two forms. Shared with the modules."""
    if output_size is None:
        if pooled_h is None or pooled_w is None:
            raise TypeError(
                "give output_size (an int or (h, w)) or both pooled_h and pooled_w, got "
                f"output_size=None, pooled_h={pooled_h!r}, pooled_w={pooled_w!r}"
            )
        return check_positive_int("pooled_h", pooled_h), check_positive_int("pooled_w", pooled_w)
    if pooled_h is not None or pooled_w is not None:
        raise TypeError(
            f"give output_size or pooled_h / pooled_w, not both: got output_size={output_size!r}, "
            f"pooled_h={pooled_h!r}, pooled_w={pooled_w!r}"
        )
    pair = output_size if isinstance(output_size, (tuple, list)) else (output_size, output_size)
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"output_size must be an int or an (h, w) pair, got {output_size!r}")
    return check_positive_int("output_size[0]", pair[0]), check_positive_int(
        "output_size[1]", pair[1]
    )


@torch.library.custom_op(
    "dcnbench::check_roi_values",
    mutates_args=(),
    schema="(Tensor rois, int batch, int pooled_h=0, int pooled_w=0, "
    "float spatial_scale=1.0, bool aligned=True) -> ()",
)
def _check_values_op(rois, batch, pooled_h=0, pooled_w=0, spatial_scale=1.0, aligned=True):
    """:func:`check_values` as an operator: torch.compile keeps it whole (it reads values,
    which a traced graph cannot) instead of breaking the graph there. ``pooled_h`` > 0:
    the call's sampling grid is adaptive, of these bins, scale and alignment."""
    grid = None if pooled_h == 0 else AdaptiveGrid(pooled_h, pooled_w, spatial_scale, aligned)
    check_values(rois, batch, grid)


@_check_values_op.register_fake
def _(rois, batch, *grid):
    return None


def _adaptive_grid_arguments(g: Geometry) -> tuple:
    """``check_roi_values``' grid arguments of a checked call: none unless adaptive."""
    if g.sampling_ratio > 0:
        return ()
    return g.pooled_h, g.pooled_w, g.spatial_scale, g.aligned


def _operands(input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio,
              gamma, aligned, design) -> tuple[Geometry, tuple]:
    """Check shapes, dtypes, devices and parameters; the call's sizes and the
    operator's arguments, dense (``rois`` as [K, 5])."""
    rois = as_rois(rois)
    g = check_arguments(
        input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma,
        aligned,
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
        g.aligned,
        check_design(design),
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
    aligned: bool = True,
    design: str = "pw_fastest",
) -> Callable[[], torch.Tensor]:
    """Check the arguments of :func:`modulated_deform_roi_pool` (``mask`` None:
    :func:`deform_roi_pool`; ``offset`` None too: :func:`roi_align`) once, values
    included; the returned call runs the operator on them with no checks and no
    host synchronisation: the harness's timed call. Differentiable like the public
    functions; the tensors' values must stay valid between calls.
    """
    g, operands = _operands(
        input, rois, offset, mask, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma,
        aligned, design,
    )
    check_values(operands[1], g.batch, g if g.sampling_ratio <= 0 else None)
    return functools.partial(torch.ops.dcnbench.deform_roi_pool, *operands)


def _pool(input, rois, offset, mask, size, spatial_scale, sampling_ratio, gamma, aligned,
          design):
    g, operands = _operands(
        input, rois, offset, mask, *size, spatial_scale, sampling_ratio, gamma, aligned, design
    )
    torch.ops.dcnbench.check_roi_values(operands[1], g.batch, *_adaptive_grid_arguments(g))
    return torch.ops.dcnbench.deform_roi_pool(*operands)


def roi_align(
    input: torch.Tensor,
    rois: torch.Tensor | list[torch.Tensor],
    output_size: int | tuple[int, int] | None = None,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
    *,
    pooled_h: int | None = None,
    pooled_w: int | None = None,
    design: str = "pw_fastest",
) -> torch.Tensor:
    """RoIAlign (average) with our CUDA kernels: ``torchvision.ops.roi_align``.

    With ``aligned`` (the contract's default, and mmcv's) it is
    :func:`deform_roi_pool` without offset; ``aligned=False`` is
    torchvision's legacy rule (its default): no half-pixel shift, RoI sides
    clamped below at 1. Differentiable in ``input``.

    Args:
        input: [N, C, H, W], float32 / float16 / bfloat16 / float64.
        rois: [K, 5] of (batch_index, x1, y1, x2, y2) in image coordinates,
            or a list of [L_i, 4] boxes (x1, y1, x2, y2), one tensor per image
            (torchvision's form); the input's dtype or float32 (autocast's
            boxes for half features), on its device; batch indices integral
            in [0, N), coordinates finite (checked: one host synchronisation
            on a GPU).
        output_size: output bins per RoI, an int or (pooled_h, pooled_w);
            or give ``pooled_h`` and ``pooled_w`` (>= 1) instead.
        spatial_scale: image to feature-map scale (> 0; default 1).
        sampling_ratio: samples per bin side (<= 1024); <= 0 (default -1):
            adaptive, ceil(roi size / pooled size), at most
            ``kernels.rois.MAX_SAMPLES_PER_BIN`` a bin (else a ValueError).
        aligned: shift the RoI by -0.5 pixel (default True).
        design: the kernels, ``"pw_fastest"`` (default) or ``"channels_fastest"``
            (see the module docstring; the same results).

    Returns:
        [K, C, pooled_h, pooled_w]; K = 0 or C = 0: empty.
    """
    size = pooled_size(output_size, pooled_h, pooled_w)
    return _pool(input, rois, None, None, size, spatial_scale, sampling_ratio, 0.0, aligned,
                 design)


def deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor | list[torch.Tensor],
    offset: torch.Tensor | None = None,
    output_size: int | tuple[int, int] | None = None,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    *,
    pooled_h: int | None = None,
    pooled_w: int | None = None,
    design: str = "pw_fastest",
) -> torch.Tensor:
    """Deformable RoI pooling (DCNv1; mmcv's ``deform_roi_pool``) with our CUDA kernels.

    Bin (ph, pw) of RoI k moves by gamma·(roi_w·offset[k, 0, ph, pw],
    roi_h·offset[k, 1, ph, pw]) and averages its sampling grid by rule B1.
    Differentiable in ``input`` and ``offset``. Defaults are mmcv's.

    Args:
        input: [N, C, H, W], float32 / float16 / bfloat16 / float64.
        rois: [K, 5], or a list of [L_i, 4] per image, as :func:`roi_align`.
        offset: [K, 2, pooled_h, pooled_w] (channel 0 moves x, 1 moves y), or
            None: exactly :func:`roi_align` (aligned).
        output_size, pooled_h, pooled_w, spatial_scale: as :func:`roi_align`.
        sampling_ratio: as :func:`roi_align`; default 0 (adaptive, as mmcv).
        gamma: offset scale (default 0.1).
        design: the kernels, as :func:`roi_align`.

    All tensors but rois share one dtype and device; non-contiguous ones are copied.

    Returns:
        [K, C, pooled_h, pooled_w]; K = 0 or C = 0: empty.
    """
    size = pooled_size(output_size, pooled_h, pooled_w)
    return _pool(input, rois, offset, None, size, spatial_scale, sampling_ratio, gamma, True,
                 design)


def modulated_deform_roi_pool(
    input: torch.Tensor,
    rois: torch.Tensor | list[torch.Tensor],
    offset: torch.Tensor | None,
    mask: torch.Tensor,
    output_size: int | tuple[int, int] | None = None,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    *,
    pooled_h: int | None = None,
    pooled_w: int | None = None,
    design: str = "pw_fastest",
) -> torch.Tensor:
    """Modulated deformable RoI pooling (DCNv2): :func:`deform_roi_pool` times ``mask``.

    Args:
        input: [N, C, H, W].
        rois: [K, 5], or a list of [L_i, 4] per image, as :func:`roi_align`.
        offset: [K, 2, pooled_h, pooled_w], or None (no offset).
        mask: [K, 1, pooled_h, pooled_w], used as given (already through a sigmoid).
        output_size, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma, design:
            as :func:`deform_roi_pool`.

    Differentiable in ``input``, ``offset`` and ``mask``.

    Returns:
        [K, C, pooled_h, pooled_w]; K = 0 or C = 0: empty.
    """
    if mask is None:
        raise TypeError("mask must be a torch.Tensor (use deform_roi_pool without one), got None")
    size = pooled_size(output_size, pooled_h, pooled_w)
    return _pool(input, rois, offset, mask, size, spatial_scale, sampling_ratio, gamma, True,
                 design)


# --------------------------------------------------------------------------- #
# Modules.
# --------------------------------------------------------------------------- #


class RoIAlign(nn.Module):
    """``torchvision.ops.RoIAlign``: ``forward(input, rois)`` = :func:`roi_align`.

    input [N, C, H, W]; rois [K, 5] or a list of [L_i, 4] boxes per image;
    output [K, C, pooled_h, pooled_w]. ``aligned`` defaults to True (mmcv's
    and the contract's default; torchvision's is False).
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = -1,
        aligned: bool = True,
    ) -> None:
        super().__init__()
        self.output_size = pooled_size(output_size, None, None)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: torch.Tensor, rois: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


class DeformRoIPool(nn.Module):
    """mmcv's ``DeformRoIPool``: ``forward(input, rois, offset=None)`` = :func:`deform_roi_pool`.

    input [N, C, H, W]; rois [K, 5] or a list of [L_i, 4] boxes per image;
    offset [K, 2, pooled_h, pooled_w] or None; output [K, C, pooled_h, pooled_w].
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.output_size = pooled_size(output_size, None, None)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.gamma = gamma

    def forward(
        self,
        input: torch.Tensor,
        rois: torch.Tensor | list[torch.Tensor],
        offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return deform_roi_pool(
            input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
            self.gamma,
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


class ModulatedDeformRoIPool(DeformRoIPool):
    """``forward(input, rois, offset, mask)`` = :func:`modulated_deform_roi_pool`:
    :class:`DeformRoIPool` times mask [K, 1, pooled_h, pooled_w] (offset may be None)."""

    def forward(  # type: ignore[override]
        self,
        input: torch.Tensor,
        rois: torch.Tensor | list[torch.Tensor],
        offset: torch.Tensor | None,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        return modulated_deform_roi_pool(
            input, rois, offset, mask, self.output_size, self.spatial_scale,
            self.sampling_ratio, self.gamma,
        )


def fully_connected(sizes: list[int], last: nn.Module | None = None) -> nn.Sequential:
    """Linear layers of ``sizes`` with ReLUs between them (and ``last`` after the
    last one), the last layer zero-initialised as mmcv does: a new Pack starts
    as the pooling without offset. Shared with kernels.ops.deform_psroi_pool."""
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if index:
            layers.append(nn.ReLU(inplace=True))
        layers.append(nn.Linear(fan_in, fan_out))
    nn.init.zeros_(layers[-1].weight)
    nn.init.zeros_(layers[-1].bias)
    if last is not None:
        layers.append(last)
    return nn.Sequential(*layers)


class DeformRoIPoolPack(DeformRoIPool):
    """mmcv's ``DeformRoIPoolPack``: the offsets are learnt from the pooled features.

    ``forward(input, rois)``: x = the RoI's pooling without offset [K, C, ph, pw];
    offset = ``offset_fc``(x flattened) [K, 2, ph, pw] (three linear layers,
    C·ph·pw -> deform_fc_channels -> deform_fc_channels -> 2·ph·pw, ReLUs
    between, the last zero-initialised); returns :func:`deform_roi_pool` with
    that offset, [K, C, ph, pw]. At initialisation it is :func:`roi_align`.
    input [N, output_channels, H, W]; rois [K, 5] or a list of [L_i, 4].
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = check_positive_int("output_channels", output_channels)
        self.deform_fc_channels = check_positive_int("deform_fc_channels", deform_fc_channels)
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = fully_connected(
            [bins * output_channels, deform_fc_channels, deform_fc_channels, 2 * bins]
        )

    def _pooled_features(self, input: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """[K, C·ph·pw]: the pooling without offset, what the layers see."""
        if input.dim() != 4 or input.shape[1] != self.output_channels:
            raise ValueError(
                f"input must be [N, output_channels = {self.output_channels}, H, W], got shape "
                f"{tuple(input.shape)}"
            )
        plain = deform_roi_pool(
            input, rois, None, self.output_size, self.spatial_scale, self.sampling_ratio,
            self.gamma,
        )
        # An explicit size: with K = 0 a -1 would be ambiguous.
        return plain.reshape(plain.shape[0], plain.shape[1:].numel())

    def _offset(self, features: torch.Tensor) -> torch.Tensor:
        return self.offset_fc(features).view(features.shape[0], 2, *self.output_size)

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, rois: torch.Tensor | list[torch.Tensor]
    ) -> torch.Tensor:
        rois = as_rois(rois)
        offset = self._offset(self._pooled_features(input, rois))
        return deform_roi_pool(
            input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
            self.gamma,
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, output_channels={self.output_channels}, "
            f"deform_fc_channels={self.deform_fc_channels}"
        )


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """mmcv's ``ModulatedDeformRoIPoolPack``: offsets and mask learnt from the pooled features.

    As :class:`DeformRoIPoolPack`, plus mask = ``mask_fc``(x flattened)
    [K, 1, ph, pw] (C·ph·pw -> deform_fc_channels -> ph·pw, a ReLU between, the
    last layer zero-initialised, then a sigmoid); returns
    :func:`modulated_deform_roi_pool` with both, [K, C, ph, pw]. At
    initialisation the mask is 0.5 everywhere: 0.5 · :func:`roi_align`, as mmcv.
    """

    def __init__(
        self,
        output_size: int | tuple[int, int],
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(
            output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma
        )
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = fully_connected(
            [bins * output_channels, deform_fc_channels, bins], last=nn.Sigmoid()
        )

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, rois: torch.Tensor | list[torch.Tensor]
    ) -> torch.Tensor:
        rois = as_rois(rois)
        features = self._pooled_features(input, rois)
        mask = self.mask_fc(features).view(features.shape[0], 1, *self.output_size)
        return modulated_deform_roi_pool(
            input, rois, self._offset(features), mask, self.output_size, self.spatial_scale,
            self.sampling_ratio, self.gamma,
        )
