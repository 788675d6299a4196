"""Our DCNv3 kernels: ``dcnv3`` (InternImage's core op), and the code ``dcnv4`` shares.

Semantics: ``shared/ops-semantics.md``, "DCNv3 and DCNv4" (channels-last;
B0 sampling; taps column-major). float32 / float16 / bfloat16 with float32
accumulation, float64 in double throughout (for ``torch.autograd.gradcheck``),
any kernel size, any ``group_channels``. Design notes and what
to measure: ``docs/kernels/dcnv3.md``.

Four designs of the same kernels, picked by ``design=``:

- ``"direct"`` (``kernels/cuda/dcnv3_direct.cu``): upstream DCNv3's mapping,
  one thread per output element (pixel, group, channel); backward reduces
  the offset / mask gradients over the channel threads in shared memory.
- ``"vectorized"`` (``kernels/cuda/dcnv3_vectorized.cu``): a thread owns
  vectors of channels loaded 16 bytes at a time, sampling computed once per
  tap and reused across the vector, several pixels per block, softmax fused;
  backward reduces with warp shuffles.
- ``"staged"`` (``kernels/cuda/dcnv3_staged.cu``): the vectorized mapping with
  a block's offsets and masks loaded once, coalesced, into shared memory, the
  softmax computed once per item, the tap count a template parameter
  (``STAGED_TAPS``; other tap counts run the vectorized kernels); its backward
  writes grad_offset / grad_mask in the storage type directly.
- ``"shared_scatter"`` (``kernels/cuda/dcnv3_shared_scatter.cu``, backward
  only; the forward is ``"vectorized"``'s): a block owns a tile of output
  pixels of one (image, group) and accumulates their grad_input in a
  shared-memory tile of the input region their taps reach, added to
  grad_input once with coalesced atomics (samples outside the region fall
  back to global atomics).

Both kernels are templated on the layout of the modulation (``Modulation``):
``dcnv3``'s separate offset and mask (optionally softmax-normalised in the
kernel) or ``dcnv4``'s fused ``offset_mask``. One ``torch.library`` operator
pair (``dcnbench::dcnv3``, ``dcnbench::dcnv3_backward``) serves both: a
``mask`` of None means ``offset`` is ``dcnv4``'s fused ``offset_mask``.

Gradients: grad_input accumulates with float32 atomics in a float32 buffer
(cast once at the end); under ``torch.use_deterministic_algorithms(True)``
with fixed-point int64 atomics instead, bit-reproducible
(``kernels/determinism.py``); grad_offset / grad_mask are written once per element
in float32 and cast (the staged design writes them in the dtype). On a CPU tensor the kernels run through
``kernels.emulator``: for correctness checks, never for timing.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable

import torch

from kernels import checks, determinism, launch
from kernels.cuda_sources import COMPILE_OPTIONS, CudaSource, register
from kernels.reference import dcnv3 as contract
from kernels.reference.dcnv3 import offset_mask_channels

__all__ = ["DESIGNS", "SUPPORTED_DTYPES", "dcnv3", "prepare", "unchecked_dcnv3"]

# Threads per block of every kernel of every design (a multiple of the warp);
# passed to the .cu files as a macro, so __launch_bounds__ and our grids agree.
BLOCK_SIZE = 256
# Lanes of one warp that share an item in the vectorized design, at most.
WARP_SIZE = 32
# The vectorized design's loads: 16 bytes (float4 / 8 halves / 8 bfloat16).
VECTOR_BYTES = 16
# The staged design's tap counts (3x3, 3x3 with remove_center, 5x5), each its own
# instantiation; any other count runs the vectorized kernels.
STAGED_TAPS = (9, 8, 25)
# Items per block of the staged design at most (its shared arrays' rows).
STAGED_ITEMS = 32
# The shared-scatter tile: output pixels per block side, tried largest first,
# and the input pixels beyond the undeformed taps that the shared region
# covers (the harness's random offsets are uniform(-2, 2) + N(0, 1) pixels:
# a halo of 3 keeps the corners of all but a few per cent of the samples of
# a tile's edge pixels inside; docs/kernels/dcnv3.md counts them).
SHARED_SCATTER_TILES = (16, 8, 4, 2, 1)
SHARED_SCATTER_HALO = 3
# The region's budget: the shared memory a block gets without opting in.
SHARED_SCATTER_BYTES = 48 * 1024

_CTYPES = {
    torch.float32: "float",
    torch.float16: "__half",
    torch.bfloat16: "__nv_bfloat16",
    torch.float64: "double",
}
SUPPORTED_DTYPES = tuple(_CTYPES)
_KERNELS = ("forward", "backward")


@dataclasses.dataclass(frozen=True)
class Design:
    """What is particular to one design's kernels (``kernels/cuda/dcnv3_<name>.cu``)."""

    name: str
    # Threads own 16-byte vectors of channels (a template argument); else one channel each.
    vectorized: bool = True
    # Tap counts with their own instantiation (a template argument); others run the
    # vectorized kernels. Empty: the tap count is a runtime value.
    tap_counts: tuple[int, ...] = ()
    # Items a block holds at most (its shared arrays' rows, the .cu's DCNV3_STAGED_ITEMS);
    # 0: BLOCK_SIZE / lanes.
    items_per_block: int = 0
    # The backward writes grad_offset / grad_mask in the storage dtype, not float32.
    gradients_in_storage_dtype: bool = False
    # Backward only: the design whose forward it runs.
    forward_from: str = ""
    # The most dynamic shared memory a launch asks for (the build check's occupancy).
    dynamic_shared_bytes: int = 0


_DESIGN_TABLE = {
    design.name: design
    for design in (
        Design("direct", vectorized=False),
        Design("vectorized"),
        Design("staged", tap_counts=STAGED_TAPS, items_per_block=STAGED_ITEMS,
               gradients_in_storage_dtype=True),
        Design("shared_scatter", forward_from="vectorized",
               dynamic_shared_bytes=SHARED_SCATTER_BYTES),
    )
}  # fmt: skip
DESIGNS = tuple(_DESIGN_TABLE)


class Modulation(enum.IntEnum):
    """Where a tap's offsets and mask are read from (``dcnv3::Modulation`` in the .cu)."""

    MASK = 0
    SOFTMAX_MASK = 1
    FUSED_OFFSET_MASK = 2


def _vector_widths(dtype: torch.dtype) -> tuple[int, ...]:
    """The vectorized design's channels per vector: one 16-byte load, or 1 (the scalar
    path); float64 (for gradcheck, not speed) has the scalar path only."""
    if dtype == torch.float64:
        return (1,)
    return (VECTOR_BYTES // torch.empty((), dtype=dtype).element_size(), 1)


def _name_expression(
    design: Design, kernel: str, dtype: torch.dtype, modulation: Modulation, vector: int,
    taps: int = 0,
) -> str:
    arguments = [_CTYPES[dtype], str(int(modulation))]
    if design.vectorized:
        arguments.append(str(vector))
    if design.tap_counts:
        arguments.append(str(taps))
    return f"dcnv3_{design.name}_{kernel}<{', '.join(arguments)}>"


def _register(design: Design) -> CudaSource:
    kernels = ("backward",) if design.forward_from else _KERNELS
    vectors = _vector_widths if design.vectorized else (lambda dtype: (1,))
    items = (f"-DDCNV3_STAGED_ITEMS={design.items_per_block}",) if design.items_per_block else ()
    names = [f"dcnv3_{design.name}_{kernel}" for kernel in kernels]
    return register(
        CudaSource(
            filename=f"dcnv3_{design.name}.cu",
            name_expressions=tuple(
                _name_expression(design, kernel, dtype, modulation, vector, taps)
                for kernel in kernels
                for dtype in SUPPORTED_DTYPES
                for modulation in Modulation
                for vector in vectors(dtype)
                for taps in design.tap_counts or (0,)
            ),
            # A design with items_per_block launches fewer threads when an item has
            # few lanes (_threads_per_block); its launch bounds hold for BLOCK_SIZE.
            block_sizes=dict.fromkeys(names, BLOCK_SIZE),
            options=(*COMPILE_OPTIONS, f"-DDCNV3_BLOCK_SIZE={BLOCK_SIZE}", *items),
            dynamic_smem=dict.fromkeys(names, design.dynamic_shared_bytes),
        )
    )


SOURCES = {name: _register(design) for name, design in _DESIGN_TABLE.items()}


# --------------------------------------------------------------------------- #
# Argument checking.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Call:
    """Every size of one call: the contract's geometry plus the tensors' sizes."""

    geometry: contract.Geometry
    batch: int
    height: int
    width: int
    group: int
    group_channels: int
    out_h: int
    out_w: int

    @property
    def channels(self) -> int:
        return self.group * self.group_channels

    @property
    def taps(self) -> int:
        return self.geometry.taps

    @property
    def output_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.out_h, self.out_w, self.channels)

    def kernel_arguments(self) -> tuple:
        """The kernels' DCNV3_GEOMETRY_PARAMS, in order and at their declared widths."""
        g = self.geometry
        ints = (
            self.batch, self.height, self.width, self.group, self.group_channels,
            g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.pad_h, g.pad_w,
            g.dilation_h, g.dilation_w, self.out_h, self.out_w, int(g.remove_center),
        )  # fmt: skip
        return (*(launch.int32(v) for v in ints), launch.float32(g.offset_scale))




def check_arguments(
    input: object,
    modulation: dict[str, tuple[object, int]],
    geometry: dict,
    group: object,
    group_channels: object,
) -> Call:
    """Check every argument against the contract; return the call's sizes.

    ``modulation`` maps the name of each per-pixel tensor (offset and mask,
    or offset_mask) to (tensor, expected last dimension as a function of P).
    Each error names the argument, what was expected and what came.
    """
    # Numbers of any Python / NumPy / 0-d tensor type, as Python numbers from here on.
    geometry = {name: checks.as_float(name, value) if name == "offset_scale"
                else checks.as_bool(name, value) if name == "remove_center"
                else checks.as_int(name, value) for name, value in geometry.items()}
    group = checks.as_int("group", group)
    group_channels = checks.as_int("group_channels", group_channels)
    shape = contract.Geometry(**geometry)
    tensors = {"input": input, **{name: t for name, (t, _) in modulation.items()}}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 4:
            raise ValueError(f"{name} must be 4-D (channels-last), got shape {tuple(tensor.shape)}")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"input has dtype {input.dtype}; supported: {', '.join(map(str, SUPPORTED_DTYPES))}"
        )
    if input.device.type not in ("cuda", "cpu"):
        raise ValueError(f"input is on {input.device}; supported: CUDA, or CPU (emulated)")
    out_h, out_w = contract.check_arguments(
        input,
        {name: (tensor, last(shape.taps)) for name, (tensor, last) in modulation.items()},
        shape,
        group,
        group_channels,
    )
    batch, height, width, _ = input.shape
    # 32-bit indices inside the kernels (dcnv3_common.cuh).
    if height * width > launch.INT32_MAX:
        raise ValueError(f"input maps of {height}x{width} exceed 2^31 pixels")
    return Call(shape, batch, height, width, group, group_channels, out_h, out_w)


def _call_from_op(input: torch.Tensor, offset: torch.Tensor, params) -> Call:
    """The sizes of an already checked call, from the operator's arguments."""
    *geometry, group, group_channels = params
    shape = contract.Geometry(*geometry)
    out_h, out_w = offset.shape[1], offset.shape[2]
    batch, height, width, _ = input.shape
    return Call(shape, batch, height, width, group, group_channels, out_h, out_w)


# --------------------------------------------------------------------------- #
# Launching.
# --------------------------------------------------------------------------- #


def _lanes(design: Design, call: Call, vector: int) -> int:
    """Threads that share one (output pixel, group) item (see the .cu headers)."""
    if not design.vectorized:
        return min(call.group_channels, BLOCK_SIZE)
    vectors = call.group_channels // vector
    lanes = 1
    while lanes < vectors and lanes < WARP_SIZE:
        lanes *= 2
    return lanes


def _kernel_design(name: str, call: Call) -> tuple[Design, str]:
    """The design whose kernels run the call, and why when it is not design ``name``:
    a design with ``tap_counts`` has instantiations for those only."""
    design = _DESIGN_TABLE[name]
    if design.tap_counts and call.taps not in design.tap_counts:
        return _DESIGN_TABLE["vectorized"], (
            f"vectorized kernels: {call.taps} taps, the {name} design has "
            f"{', '.join(map(str, design.tap_counts))}"
        )
    return design, ""


def _threads_per_block(design: Design, lanes: int) -> int:
    if design.items_per_block:
        return min(design.items_per_block * lanes, BLOCK_SIZE)
    return BLOCK_SIZE


def _vector(
    design: Design, call: Call, dtype: torch.dtype, *tensors: torch.Tensor
) -> tuple[int, str]:
    """16-byte vectors when D·itemsize is a multiple of 16 and every channel
    vector of ``tensors`` is 16-byte aligned; channels one by one otherwise,
    with the reason (for the launch log: the scalar path is several times slower)."""
    if not design.vectorized:
        return 1, ""
    wide = _vector_widths(dtype)[0]
    if call.group_channels % wide:
        return 1, (f"scalar fallback: group_channels {call.group_channels} is not a multiple "
                   f"of {wide}, the {VECTOR_BYTES}-byte vector")
    misaligned = [t.data_ptr() % VECTOR_BYTES for t in tensors if t.data_ptr() % VECTOR_BYTES]
    if misaligned:
        return 1, (f"scalar fallback: tensor data {misaligned[0]} bytes past a "
                   f"{VECTOR_BYTES}-byte boundary")
    return wide, ""


def _launch(
    kernel: str,
    design: str,
    call: Call,
    modulation: Modulation,
    vector_tensors: tuple[torch.Tensor, ...],
    tensors: tuple[torch.Tensor, ...],
) -> None:
    input = tensors[0]
    design, other_design = _kernel_design(design, call)
    vector, why = _vector(design, call, input.dtype, *vector_tensors)
    function = launch.module(SOURCES[design.name], input.device).function(
        _name_expression(design, kernel, input.dtype, modulation, vector, call.taps)
    )
    items = call.batch * call.out_h * call.out_w * call.group
    lanes = max(_lanes(design, call, vector), 1)
    threads = _threads_per_block(design, lanes)
    function(
        launch.blocks(items, threads // lanes), threads, (*tensors, *call.kernel_arguments()),
        variant_reason="; ".join(filter(None, (other_design, why))),
    )


@dataclasses.dataclass(frozen=True)
class ScatterTile:
    """The shared-scatter backward's work split: ``tile_h`` × ``tile_w`` output
    pixels per block, and the ``region_h`` × ``region_w`` input pixels (clamped
    to the map) whose grad_input the block keeps in shared memory; 0 × 0 when
    not even a one-pixel tile's region fits (every sample scatters globally)."""

    tile_h: int
    tile_w: int
    region_h: int
    region_w: int

    def blocks(self, call: Call) -> int:
        tiles = -(-call.out_h // self.tile_h) * -(-call.out_w // self.tile_w)
        return call.batch * tiles * call.group

    def shared_bytes(self, call: Call, accumulator_bytes: int) -> int:
        return self.region_h * self.region_w * call.group_channels * accumulator_bytes


def scatter_tile(call: Call, accumulator_bytes: int) -> ScatterTile:
    """The largest tile of ``SHARED_SCATTER_TILES`` whose region fits
    ``SHARED_SCATTER_BYTES`` of ``accumulator_bytes`` per element (4: float32,
    8: float64 or the deterministic mode's int64). A tile side is the map's
    side cut evenly (56 rows in tiles of 16 are 4 tiles of 14)."""
    g = call.geometry

    def even(side: int, most: int) -> int:
        return -(-side // -(-side // most))

    def reach(tile: int, stride: int, dilation: int, kernel: int, size: int) -> int:
        window = (tile - 1) * stride + dilation * (kernel - 1) + 1
        return min(window + 2 * SHARED_SCATTER_HALO, size)

    for most in SHARED_SCATTER_TILES:
        tile_h, tile_w = even(call.out_h, most), even(call.out_w, most)
        tile = ScatterTile(
            tile_h, tile_w,
            reach(tile_h, g.stride_h, g.dilation_h, g.kernel_h, call.height),
            reach(tile_w, g.stride_w, g.dilation_w, g.kernel_w, call.width),
        )  # fmt: skip
        if tile.shared_bytes(call, accumulator_bytes) <= SHARED_SCATTER_BYTES:
            return tile
    return ScatterTile(tile_h, tile_w, 0, 0)


def _launch_shared_scatter(
    call: Call,
    modulation: Modulation,
    vector_tensors: tuple[torch.Tensor, ...],
    tensors: tuple[torch.Tensor, ...],
    fixed_point: bool,
) -> None:
    """The shared-scatter backward: one block per (image, tile, group)."""
    input = tensors[0]
    design = _DESIGN_TABLE["shared_scatter"]
    vector, why = _vector(design, call, input.dtype, *vector_tensors)
    function = launch.module(SOURCES[design.name], input.device).function(
        _name_expression(design, "backward", input.dtype, modulation, vector)
    )
    accumulator_bytes = 8 if fixed_point or input.dtype == torch.float64 else 4
    tile = scatter_tile(call, accumulator_bytes)
    tile_args = (tile.tile_h, tile.tile_w, tile.region_h, tile.region_w, SHARED_SCATTER_HALO)
    function(
        tile.blocks(call), BLOCK_SIZE,
        (*tensors, *(launch.int32(v) for v in tile_args), *call.kernel_arguments()),
        shared_mem=tile.shared_bytes(call, accumulator_bytes), variant_reason=why,
    )  # fmt: skip


def _modulation(mask: torch.Tensor | None, softmax: bool) -> Modulation:
    if mask is None:
        return Modulation.FUSED_OFFSET_MASK
    return Modulation.SOFTMAX_MASK if softmax else Modulation.MASK


def _forward(call: Call, input, offset, mask, softmax: bool, design: str) -> torch.Tensor:
    output = launch.new_output(call.output_shape, input.dtype, input.device)
    if output.numel() == 0:  # N = 0 or no channels: nothing to compute, no grid to launch
        return output
    modulation = _modulation(mask, softmax)
    # dcnv4: the kernel reads offsets and masks from the one offset_mask.
    mask_or_fused = offset if mask is None else mask
    _launch(
        "forward", _DESIGN_TABLE[design].forward_from or design, call, modulation, (input, output),
        (input, offset, mask_or_fused, output),
    )  # fmt: skip
    return output


def _max_modulation(call: Call, offset, mask, softmax: bool) -> float:
    """A bound on |m|: 1 for a softmax, else max |mask| (dcnv4: its mask columns)."""
    if softmax:
        return 1.0
    if mask is None:
        fused = offset[..., : call.group * call.taps * 3].unflatten(-1, (call.group, 3 * call.taps))
        mask = fused[..., 2 * call.taps :]
    return determinism.max_abs(mask)


def _backward(
    call: Call, grad_output, input, offset, mask, softmax: bool, design: str, want_input: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype, device = input.dtype, input.device
    # What the kernels accumulate in: float32, float64 for float64.
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    if input.numel() == 0 or grad_output.numel() == 0:  # N = 0 or no channels
        return (
            torch.zeros_like(input) if want_input else input.new_empty(0),
            torch.zeros_like(offset),
            input.new_empty(0) if mask is None else torch.zeros_like(mask),
        )
    modulation = _modulation(mask, softmax)
    fixed_sums = None
    fixed_args = determinism.FixedPointSum.unused(device)
    if want_input and determinism.enabled():
        # Each (output pixel, tap) adds at most one value, bilinear weight (≤ 1)
        # times modulation times grad_output, to an input element.
        grad_input = launch.null(accumulate, device)
        fixed_sums = determinism.FixedPointSum(
            input.shape,
            device,
            max_abs=determinism.max_abs(grad_output) * _max_modulation(call, offset, mask, softmax),
            max_addends=call.out_h * call.out_w * call.taps,
        )
        fixed_args = fixed_sums.kernel_args()
    elif want_input:
        grad_input = torch.zeros(input.shape, dtype=accumulate, device=device)
    else:
        grad_input = launch.null(accumulate, device)  # the kernel skips the scatter
    in_storage_type = _kernel_design(design, call)[0].gradients_in_storage_dtype
    gradient_dtype = dtype if in_storage_type else accumulate
    grad_offset = launch.new_output(offset.shape, gradient_dtype, device)
    if mask is None:  # dcnv4: one buffer in offset_mask's layout; padding columns are 0
        grad_offset[..., call.group * call.taps * 3 :] = 0
        grad_mask = grad_offset
    else:
        grad_mask = launch.new_output(mask.shape, gradient_dtype, device)
    tensors = (input, offset, offset if mask is None else mask, grad_output, grad_input,
               *fixed_args, grad_offset, grad_mask)  # fmt: skip
    if design == "shared_scatter":
        _launch_shared_scatter(call, modulation, (input, grad_output), tensors, fixed_sums is not None)
    else:
        _launch("backward", design, call, modulation, (input, grad_output), tensors)
    if fixed_sums is not None:
        grad_input = fixed_sums.result(accumulate)
    return (
        grad_input.to(dtype) if want_input else input.new_empty(0),
        grad_offset.to(dtype),
        input.new_empty(0) if mask is None else grad_mask.to(dtype),
    )


# --------------------------------------------------------------------------- #
# torch.library operators: what autograd and torch.compile see.
# --------------------------------------------------------------------------- #

_PARAMS_SCHEMA = (
    "int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w, "
    "int dilation_h, int dilation_w, float offset_scale, bool remove_center, "
    "int group, int group_channels"
)


@torch.library.custom_op(
    "dcnbench::dcnv3",
    mutates_args=(),
    schema=f"(Tensor input, Tensor offset, Tensor? mask, {_PARAMS_SCHEMA}, bool softmax, "
    "str design) -> Tensor",
)
def _dcnv3_op(input, offset, mask, *params_softmax_design):
    *params, softmax, design = params_softmax_design
    return _forward(_call_from_op(input, offset, params), input, offset, mask, softmax, design)


@_dcnv3_op.register_fake
def _(input, offset, mask, *params_softmax_design):
    batch, out_h, out_w = offset.shape[:3]
    return input.new_empty((batch, out_h, out_w, input.shape[3]))


@torch.library.custom_op(
    "dcnbench::dcnv3_backward",
    mutates_args=(),
    schema=f"(Tensor grad_output, Tensor input, Tensor offset, Tensor? mask, {_PARAMS_SCHEMA}, "
    "bool softmax, str design, bool input_grad) -> (Tensor, Tensor, Tensor)",
)
def _dcnv3_backward_op(grad_output, input, offset, mask, *rest):
    *params, softmax, design, input_grad = rest
    call = _call_from_op(input, offset, params)
    return _backward(
        call, grad_output.contiguous(), input, offset, mask, softmax, design, input_grad
    )


@_dcnv3_backward_op.register_fake
def _(grad_output, input, offset, mask, *rest):
    input_grad = rest[-1]
    return (
        input.new_empty(input.shape if input_grad else (0,)),
        offset.new_empty(offset.shape),
        offset.new_empty(mask.shape if mask is not None else (0,)),
    )


def _setup_context(ctx, inputs, output):
    input, offset, mask, *rest = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.rest = rest


def _autograd_backward(ctx, grad_output):
    input, offset, mask = ctx.saved_tensors
    grad_input, grad_offset, grad_mask = torch.ops.dcnbench.dcnv3_backward(
        grad_output, input, offset, mask, *ctx.rest, ctx.needs_input_grad[0]
    )
    needs = ctx.needs_input_grad
    return (
        grad_input if needs[0] else None,
        grad_offset if needs[1] else None,
        grad_mask if mask is not None and needs[2] else None,
        *(None for _ in ctx.rest),
    )


_dcnv3_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- #
# Public functions.
# --------------------------------------------------------------------------- #


def prepare_run(
    input,
    offset,
    mask,
    modulation: dict,
    *,
    group,
    group_channels,
    softmax: bool,
    design: str,
    **geometry,
) -> Callable[[], torch.Tensor]:
    """Check the arguments once; the returned call runs the operator on them with no
    checks (the harness's timed call). ``mask`` None: ``offset`` is dcnv4's
    ``offset_mask``. ``modulation`` as :func:`check_arguments`.
    """
    if design not in DESIGNS:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    softmax = checks.as_bool("softmax", softmax)
    call = check_arguments(input, modulation, geometry, group, group_channels)
    g = call.geometry
    # The kernels read dense channels-last rows: other strides (a permuted
    # NCHW tensor, a slice) are copied once here, and so is an offset_mask
    # whose padding is not the kernels' ceil(G·3P / 8)·8 columns.
    input, offset = input.contiguous(), offset.contiguous()
    mask = None if mask is None else mask.contiguous()
    if mask is None and offset.shape[-1] != offset_mask_channels(call.group, call.taps):
        used = call.group * 3 * call.taps
        padding = offset_mask_channels(call.group, call.taps) - used
        offset = torch.nn.functional.pad(offset[..., :used], (0, padding))
    return functools.partial(
        torch.ops.dcnbench.dcnv3, input, offset, mask,
        g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.pad_h, g.pad_w,
        g.dilation_h, g.dilation_w, g.offset_scale, g.remove_center,
        call.group, call.group_channels, softmax, design,
    )  # fmt: skip


def run(input, offset, mask, modulation: dict, **arguments) -> torch.Tensor:
    """Check the arguments, then run the operator; ``dcnv3`` and ``dcnv4`` both end here."""
    return prepare_run(input, offset, mask, modulation, **arguments)()


def unchecked_dcnv3(
    input: torch.Tensor,
    offset: torch.Tensor,
    mask: torch.Tensor,
    *,
    kernel_h: int,
    kernel_w: int,
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
    softmax: bool,
    design: str = "vectorized",
) -> torch.Tensor:
    """:func:`dcnv3` with no checks, for callers whose tensors are right by
    construction (a layer that computes offset and mask from checked weights)."""
    return torch.ops.dcnbench.dcnv3(
        input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
        dilation_h, dilation_w, float(offset_scale), remove_center, group, group_channels,
        softmax, design,
    )  # fmt: skip


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
    design: str = "vectorized",
) -> torch.Tensor:
    """InternImage's DCNv3 core op with our CUDA kernels; differentiable.

    out[n, ho, wo, g·D + d] = Σ_p m(g, p) · B0(input[n, :, :, g·D + d], y, x) with
    x = wo·stride_w − pad_w + half_w + (i·dilation_w − half_w + dx)·offset_scale
    (y likewise), taps column-major (i over kernel_w outer, j over kernel_h
    inner, the centre skipped with ``remove_center``), m the mask as given or,
    with ``softmax``, its softmax over the P taps of group g (computed in the
    kernel, in float32). CUDA tensors run on the GPU (PyTorch's current
    stream), CPU tensors through the emulator.

    Args:
        input: [N, H, W, group·group_channels] (channels-last), float32 /
            float16 / bfloat16 / float64. N = 0 and group_channels = 0 give an empty
            output and zero gradients.
        offset: [N, H_out, W_out, group·P·2]; (dx, dy) of tap p of group g at
            g·P·2 + 2p and + 1. P = kernel_h·kernel_w (− 1 with remove_center).
        mask: [N, H_out, W_out, group·P]; tap p of group g at g·P + p (logits
            when ``softmax``).
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
        dilation_w, offset_scale, remove_center: the sampling geometry
            (remove_center needs odd kernel sizes).
        group, group_channels: G and D; input has G·D channels.
        softmax: normalise the mask over the taps of each group in the kernel.
        design: ``"vectorized"``, ``"direct"``, ``"staged"`` or ``"shared_scatter"``
            (the module docstring).

    All tensors share one dtype and device. Any strides are accepted: a
    tensor that is not dense channels-last (say ``x.permute(0, 2, 3, 1)`` of an
    NCHW ``x``, or a slice) is copied to one first. The backward follows
    ``torch.use_deterministic_algorithms``: when it is on, grad_input is
    accumulated in fixed point and bit-reproducible (``kernels/determinism.py``).

    Returns:
        [N, H_out, W_out, group·group_channels], H_out =
        (H + 2·pad_h − dilation_h·(kernel_h − 1) − 1) // stride_h + 1, likewise W_out.
    """
    geometry = dict(
        kernel_h=kernel_h, kernel_w=kernel_w, stride_h=stride_h, stride_w=stride_w,
        pad_h=pad_h, pad_w=pad_w, dilation_h=dilation_h, dilation_w=dilation_w,
        offset_scale=offset_scale, remove_center=remove_center,
    )  # fmt: skip
    return prepare(
        input, offset, mask, group=group, group_channels=group_channels, softmax=softmax,
        design=design, **geometry,
    )()  # fmt: skip


def prepare(
    input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *, group, group_channels,
    softmax: bool = False, design: str = "vectorized", **geometry,
) -> Callable[[], torch.Tensor]:
    """Check the arguments of :func:`dcnv3` (the same keywords) once; the returned
    call runs the operator on them with no checks: the harness's timed call."""
    if mask is None:
        raise TypeError("mask must be a torch.Tensor (dcnv4 takes a fused offset_mask), got None")
    modulation = {
        "offset": (offset, lambda taps: group * taps * 2),
        "mask": (mask, lambda taps: group * taps),
    }
    return prepare_run(
        input, offset, mask, modulation, group=group, group_channels=group_channels,
        softmax=softmax, design=design, **geometry,
    )  # fmt: skip
