"""Our multi-scale deformable attention kernels: ``ms_deform_attn``.

Semantics: ``shared/ops-semantics.md``, "Multi-scale deformable attention"
(Deformable DETR's ``MSDeformAttnFunction``; B0 sampling; normalised
locations, x first). float32 / float16 / bfloat16 with float32 accumulation,
float64 in double throughout (for ``torch.autograd.gradcheck``), any number of
levels, points, heads and channels, the softmax over a head's
L·P weights optionally fused. Design notes and what to measure:
``docs/kernels/ms_deform_attn.md``.

One design (``kernels/cuda/ms_deform_attn.cu``), ``dcnv3_vectorized``'s: a
thread owns vectors of a head's channels loaded 16 bytes at a time, each
sampling point computed once per point and reused across the vector.

Gradients: grad_value accumulates with float32 atomics in a float32 buffer
(float64 for float64; cast once at the end); under
``torch.use_deterministic_algorithms(True)`` with fixed-point int64 atomics
instead, bit-reproducible (``kernels/determinism.py``).
grad_sampling_locations and grad_attention_weights are reduced over the
head's channels by warp shuffles and written once per element in the
accumulation type, then cast: deterministic either way.

On a CPU tensor the kernels run through ``kernels.emulator``: for correctness
checks, never for timing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from kernels import determinism, launch
from kernels.checks import as_bool
from kernels.cuda_sources import COMPILE_OPTIONS, CudaSource, register
from kernels.reference import ms_deform_attn as contract

__all__ = ["SUPPORTED_DTYPES", "ms_deform_attn", "prepare"]

# Threads per block of both kernels (a multiple of the warp); passed to the .cu
# as a macro, so __launch_bounds__ and our grids agree.
BLOCK_SIZE = 256
WARP_SIZE = 32
VECTOR_BYTES = 16  # one load: float4 / 8 halves / 8 bfloat16

_CTYPES = {
    torch.float32: "float",
    torch.float16: "__half",
    torch.bfloat16: "__nv_bfloat16",
    torch.float64: "double",
}
SUPPORTED_DTYPES = tuple(_CTYPES)
_KERNELS = ("forward", "backward")


def _vector_widths(dtype: torch.dtype) -> tuple[int, ...]:
    """Channels per vector: one 16-byte load, or 1 (the scalar path); float64 (for
    gradcheck, not speed) has the scalar path only."""
    if dtype == torch.float64:
        return (1,)
    return (VECTOR_BYTES // torch.empty((), dtype=dtype).element_size(), 1)


def _name_expression(kernel: str, dtype: torch.dtype, softmax: bool, vector: int) -> str:
    return f"ms_deform_attn_{kernel}<{_CTYPES[dtype]}, {str(softmax).lower()}, {vector}>"


SOURCE = register(CudaSource(
    filename="ms_deform_attn.cu",
    name_expressions=tuple(
        _name_expression(kernel, dtype, softmax, vector)
        for kernel in _KERNELS for dtype in SUPPORTED_DTYPES for softmax in (False, True)
        for vector in _vector_widths(dtype)
    ),
    block_sizes={f"ms_deform_attn_{kernel}": BLOCK_SIZE for kernel in _KERNELS},
    options=(*COMPILE_OPTIONS, f"-DMSDA_BLOCK_SIZE={BLOCK_SIZE}"),
))  # fmt: skip


def _sizes(value: torch.Tensor, sampling_locations: torch.Tensor) -> tuple[int, ...]:
    """The kernels' MSDA_SIZE_PARAMS: N, S, Q, M, D, L, P."""
    batch, positions, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    return batch, positions, queries, heads, channels, levels, points


def _vector(dtype: torch.dtype, channels: int, *tensors: torch.Tensor) -> tuple[int, str]:
    """16-byte vectors when D·itemsize is a multiple of 16 and every tensor read or
    written by vectors is 16-byte aligned; channels one by one otherwise, with the
    reason (for the launch log: the scalar path is several times slower)."""
    wide = _vector_widths(dtype)[0]
    if wide == 1:
        return 1, ""
    if channels % wide:
        return 1, (f"scalar fallback: D={channels} is not a multiple of {wide}, the "
                   f"{VECTOR_BYTES}-byte vector")
    misaligned = [t.data_ptr() % VECTOR_BYTES for t in tensors if t.data_ptr() % VECTOR_BYTES]
    if misaligned:
        return 1, f"scalar fallback: tensor data {misaligned[0]} bytes past a 16-byte boundary"
    return wide, ""


def _launch(kernel: str, softmax: bool, value, sampling_locations, vector_tensors, tensors) -> None:
    sizes = _sizes(value, sampling_locations)
    batch, _, queries, heads, channels, _, _ = sizes
    vector, why = _vector(value.dtype, channels, *vector_tensors)
    function = launch.module(SOURCE, value.device).function(
        _name_expression(kernel, value.dtype, softmax, vector))
    lanes = 1
    while lanes < channels // vector and lanes < WARP_SIZE:
        lanes *= 2
    items = batch * queries * heads
    function(launch.blocks(items, BLOCK_SIZE // lanes), BLOCK_SIZE,
             (*tensors, *(launch.int32(size) for size in sizes)), variant_reason=why)


def _forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
             softmax: bool) -> torch.Tensor:
    batch, _, heads, channels = value.shape
    output = launch.new_output((batch, sampling_locations.shape[1], heads * channels),
                               value.dtype, value.device)
    if output.numel():
        _launch("forward", softmax, value, sampling_locations, (value, output),
                (value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                 output))
    return output


def _backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
              attention_weights, softmax: bool, want_value: bool):
    dtype, device = value.dtype, value.device
    # What the kernels accumulate in: float32, float64 for float64.
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    grad_locations = launch.new_output(sampling_locations.shape, accumulate, device)
    grad_weights = launch.new_output(attention_weights.shape, accumulate, device)
    fixed_sums = None
    fixed_args = determinism.FixedPointSum.unused(device)
    grad_value = launch.null(accumulate, device)  # null: the kernel skips the float scatter
    if want_value and determinism.enabled():
        # Each (query, point) adds at most one value to an element of grad_value:
        # bilinear weight (<= 1) times attention weight times grad_output.
        _, queries, _, levels, points, _ = sampling_locations.shape
        fixed_sums = determinism.FixedPointSum(
            value.shape, device,
            max_abs=determinism.max_abs(grad_output) * (
                1.0 if softmax else determinism.max_abs(attention_weights)),
            max_addends=max(queries * levels * points, 1),
        )
        fixed_args = fixed_sums.kernel_args()
    elif want_value:
        grad_value = torch.zeros(value.shape, dtype=accumulate, device=device)
    if grad_weights.numel():
        _launch("backward", softmax, value, sampling_locations, (value, grad_output),
                (value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                 grad_output, grad_value, *fixed_args, grad_locations, grad_weights))
    if fixed_sums is not None:
        grad_value = fixed_sums.result(accumulate)
    return (grad_value.to(dtype) if want_value else value.new_empty(0),
            grad_locations.to(dtype), grad_weights.to(dtype))


# --------------------------------------------------------------------------- #
# torch.library operators: what autograd and torch.compile see.
# --------------------------------------------------------------------------- #

_TENSORS_SCHEMA = ("Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
                   "Tensor sampling_locations, Tensor attention_weights, bool softmax")


@torch.library.custom_op("dcnbench::ms_deform_attn", mutates_args=(),
                         schema=f"({_TENSORS_SCHEMA}) -> Tensor")
def _ms_deform_attn_op(value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, softmax):
    return _forward(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights, softmax)


@_ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, softmax):
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels))


@torch.library.custom_op(
    "dcnbench::ms_deform_attn_backward", mutates_args=(),
    schema=f"(Tensor grad_output, {_TENSORS_SCHEMA}, bool value_grad) -> (Tensor, Tensor, Tensor)",
)
def _ms_deform_attn_backward_op(grad_output, value, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights, softmax, value_grad):
    return _backward(grad_output.contiguous(), value, spatial_shapes, level_start_index,
                     sampling_locations, attention_weights, softmax, value_grad)


@_ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
      attention_weights, softmax, value_grad):
    return (value.new_empty(value.shape if value_grad else (0,)),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.softmax = inputs[5]


def _autograd_backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_value, grad_locations, grad_weights = torch.ops.dcnbench.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations,
        attention_weights, ctx.softmax, needs[0])
    return (grad_value if needs[0] else None, None, None,
            grad_locations if needs[3] else None, grad_weights if needs[4] else None, None)


_ms_deform_attn_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- #
# Public functions.
# --------------------------------------------------------------------------- #


def check_arguments(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights) -> None:
    """The contract's checks (``kernels.reference.ms_deform_attn.check_arguments``)
    plus what the kernels need: a supported dtype, contiguous tensors, 32-bit sizes."""
    levels = contract.check_arguments(value, spatial_shapes, level_start_index,
                                      sampling_locations, attention_weights)
    if value.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"value has dtype {value.dtype}; supported: "
                        f"{', '.join(map(str, SUPPORTED_DTYPES))}")
    if value.device.type not in ("cuda", "cpu"):
        raise ValueError(f"value is on {value.device}; supported: CUDA, or CPU (emulated)")
    tensors = {"value": value, "spatial_shapes": spatial_shapes,
               "level_start_index": level_start_index,
               "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")
    # 32-bit sizes and pixel indices inside the kernels.
    for name, size in zip(("N", "S", "Lq", "M", "D", "L", "P"), _sizes(value, sampling_locations), strict=True):
        if size > launch.INT32_MAX:
            raise ValueError(f"{name}={size} exceeds 2^31 - 1")
    for level, (height, width, _) in enumerate(levels):
        if height * width > launch.INT32_MAX:
            raise ValueError(f"level {level} of {height}x{width} exceeds 2^31 pixels")


def prepare(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
            sampling_locations: torch.Tensor, attention_weights: torch.Tensor, *,
            softmax: bool = False) -> Callable[[], torch.Tensor]:
    """Check the arguments of :func:`ms_deform_attn` once (reading the level table on
    the host); the returned call runs the operator on them with no checks and no
    synchronisation: the harness's timed call."""
    softmax = as_bool("softmax", softmax)
    check_arguments(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights)
    return functools.partial(torch.ops.dcnbench.ms_deform_attn, value, spatial_shapes,
                             level_start_index, sampling_locations, attention_weights, softmax)


def unchecked_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights, *, softmax: bool = False) -> torch.Tensor:
    """:func:`ms_deform_attn` with no checks, for callers whose tensors are right by
    construction (the ``MSDeformAttn`` module, which computes them)."""
    return torch.ops.dcnbench.ms_deform_attn(value, spatial_shapes, level_start_index,
                                             sampling_locations, attention_weights, bool(softmax))


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    softmax: bool = False,
) -> torch.Tensor:
    """Multi-scale deformable attention with our CUDA kernels; differentiable w.r.t.
    value, sampling_locations and attention_weights.

    out[n, q, m·D + d] = Σ_l Σ_p a(n, q, m, l, p) · B0(value_l[n, :, :, m, d], y, x),
    x = loc_x·W_l − 0.5, y = loc_y·H_l − 0.5 (``grid_sample`` with
    align_corners=False), a the weights as given or, with ``softmax``, their
    softmax over the L·P points of (n, q, m), computed in the kernel in
    float32 (float64 for float64). CUDA tensors run on the GPU (PyTorch's
    current stream), CPU tensors through the emulator. Under
    ``torch.use_deterministic_algorithms(True)`` grad_value is accumulated in
    fixed point and bit-reproducible (``kernels/determinism.py``); the other
    gradients are deterministic either way.

    Args:
        value: [N, S, M, D], S = Σ_l H_l·W_l, float32 / float16 / bfloat16 / float64.
        spatial_shapes: [L, 2] int64, (H_l, W_l) (a level may be empty: 0 rows).
        level_start_index: [L] int64, where level l starts in S.
        sampling_locations: [N, Lq, M, L, P, 2], normalised per level, x first.
        attention_weights: [N, Lq, M, L, P] (logits when ``softmax``).
        softmax: normalise the weights over the L·P points of each (n, q, m).

    All tensors are contiguous and on one device; the floating ones share value's dtype.

    Returns:
        [N, Lq, M·D].
    """
    return prepare(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, softmax=softmax)()
