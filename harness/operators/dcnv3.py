"""``dcnv3`` (InternImage's core op) and ``dcnv3_layer`` (the whole DCNv3 block).

Contract: ``docs/ops-semantics.md``, "DCNv3 and DCNv4, channels-last" and
"Case parameters"; the operators and their numbers are explained in
``docs/operators/dcnv3.md``. ``harness.operators.dcnv4`` builds ``dcnv4`` on
the parameters, input generators, counts and tolerances defined here.

Tensors: ``input`` [N, H, W, group·group_channels], ``offset`` [N, H_out,
W_out, group·P·2], ``mask`` [N, H_out, W_out, group·P] (P = kh·kw, − 1 with
``remove_center``). ``dcnv3_layer``: ``input`` and the layer's weights
(``kernels.ops.dcnv3_layer.layer_weight_shapes``), all differentiable.

Input modes (input ~ N(0, 1) in all). A sample's position is
x = base_x + (tap_x + dx)·offset_scale; the modes choose the position and
solve for dx, so they mean the same for every ``offset_scale``:

- ``random``: dx, dy = U(-2, 2) + N(0, 1), rounded to the dtype; a position
  within ``KINK_MARGIN`` of an integer (a kink of B0) is moved to that integer
  + 0.5 (exact when offset_scale is a power of two, within the dtype's
  rounding of it otherwise), so gradients are well defined. Masks
  sigmoid(N(0, 1)) in (0, 1); with ``softmax``, logits 2·N(0, 1).
- ``integer_offsets``: every position an integer (on a pixel, or outside).
  Forward only. Needs offsets the dtype holds exactly: an error names the case
  otherwise (offset_scale not a power of two, say).
- ``border``: every position has y ∈ {-1, 0, H-1, H} or x ∈ {-1, 0, W-1, W}
  exactly (a third y only, a third x only, a third both). Forward only; same
  exactness requirement.
- ``far``: half the sample points (whole (x, y) pairs) displaced by
  ±[2, 3]·reach, reach = H + W + 2·(pad_h + pad_w): outside the map whatever
  the window; the other half as ``random``.
- ``zero_mask``: offsets as ``random``; the mask exactly 0 (with ``softmax``,
  logits −1e4, whose softmax weight is exactly 0 in every dtype's float32
  arithmetic) for one whole tap per group and about a quarter of the others.

Counts: docstrings of ``core_flops`` / ``core_backward_flops`` / ``layer_flops``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from harness.operators.conv2d import GEOMETRY_ID_PAIRS
from harness.operators.deform_conv2d import KINK_MARGIN, _round_to
from harness.operators.inputs import (
    UNIT_ROUNDOFF,
    check_mode,
    draw,
    draw_uniform,
    in_float64,
    to_case,
)
from harness.registry import (
    KERNEL_DTYPES,
    Operator,
    TensorSpec,
    Tolerance,
    implementation,
    kernel_availability,
    register_operator,
)
from harness.sampling import SamplingPicture
from kernels.ops import dcnv3_layer as layer_ops
from kernels.peers import dcnv3_gridsample
from kernels.reference import dcnv3 as reference_ops
from kernels.reference.dcnv3 import Geometry

# The core op's parameters with their defaults, in the contract's order;
# ``dcnv3`` adds ``softmax``, ``dcnv4`` takes them as they are.
CORE_PARAMS: dict[str, Any] = {
    "N": 2,
    "H": 8,
    "W": 8,
    "group": 2,
    "group_channels": 8,
    "kernel_h": 3,
    "kernel_w": 3,
    "stride_h": 1,
    "stride_w": 1,
    "pad_h": 1,
    "pad_w": 1,
    "dilation_h": 1,
    "dilation_w": 1,
    "offset_scale": 1.0,
    "remove_center": False,
}
DCNV3_PARAMS: dict[str, Any] = {**CORE_PARAMS, "softmax": False}
# The layer: the core's geometry with stride 1 and "same" padding, plus the block's options.
LAYER_PARAMS: dict[str, Any] = {
    **{name: value for name, value in CORE_PARAMS.items()
       if name not in ("stride_h", "stride_w", "pad_h", "pad_w")},
    "dw_kernel_size": 3,
    "center_feature_scale": False,
}

CORE_MODES = ("random", "integer_offsets", "border", "far", "zero_mask")
FORWARD_ONLY_MODES = ("integer_offsets", "border")
ZERO_MASK_LOGIT = -1e4  # exp(-1e4 - max) underflows to exactly 0, and -1e4 is finite in float16

# Flops per sample point (N·H_out·W_out·G·P) and per channel sample (× D); see core_flops.
POINT_FLOPS = 14
SOFTMAX_POINT_FLOPS = 5
SAMPLE_FLOPS = 9
BACKWARD_POINT_FLOPS = 18
BACKWARD_SOFTMAX_POINT_FLOPS = 4
BACKWARD_SAMPLE_FLOPS = 32

_U = UNIT_ROUNDOFF
CORE_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(
        rel_l2=1e-12, max_abs=1e-11,
        why=("u = 2^-53. Each output sums P ≤ 25 masked bilinear samples; positions |x| < 2^11 "
             "carry ≤ 2^-42 into the weights. Two float64 implementations (reference, "
             "grid_sample peer) differ by ~1e-15: 1e-12 leaves ≥ 100x."),
    ),
    "float32": Tolerance(
        rel_l2=1e-4, max_abs=2e-4,
        why=("u = 2^-24 ≈ 6e-8. Sums of P ≤ 25 terms err ~5u; the dominant error is the "
             "float32 position x = base + (tap + dx)·offset_scale, which rounds by up to "
             "2^-24·|x| ≤ 3e-5 pixels for maps ≤ 320 wide, moving a sample by as much times "
             "the map's slope: ~1e-5 relative. 10x margin in rel_l2; max_abs (relative to "
             "max|ref|) covers the per-element tail of a million outputs."),
    ),
    "float16": Tolerance(
        rel_l2=4 * _U["float16"], max_abs=8 * _U["float16"],
        why=("u = 2^-11 ≈ 4.9e-4; inputs are exact in the dtype, the kernel samples and sums in "
             "float32 and rounds the output once (≤ u relative, rms ~u/sqrt(3)); gradients "
             "(atomics in float32, stored in half) likewise. rel_l2 = 4u, max_abs = 8u: the "
             "conv family's bounds, which also hold here with a wide margin."),
    ),
    "bfloat16": Tolerance(
        rel_l2=4 * _U["bfloat16"], max_abs=8 * _U["bfloat16"],
        why="u = 2^-8 ≈ 3.9e-3; the float16 argument: rel_l2 = 4u, max_abs = 8u.",
    ),
}


# --- parameters -------------------------------------------------------------

def validate_core_params(params: Mapping[str, Any]) -> None:
    """Reject a case no implementation can run, naming the parameter.

    ``H, W, group, group_channels`` >= 1 and ``N`` >= 0 (an empty batch is a
    case); the geometry as ``kernels.reference.dcnv3.Geometry`` checks it; a
    non-empty output.
    """
    for name, minimum in (("N", 0), ("H", 1), ("W", 1), ("group", 1), ("group_channels", 1)):
        if params[name] < minimum:
            raise ValueError(f"parameter {name!r} must be >= {minimum}, got {params[name]}")
    geometry = Geometry.from_params(params)
    out_h, out_w = geometry.output_size(params["H"], params["W"])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"the output is empty: expected H_out, W_out >= 1, got H_out={out_h}, "
                         f"W_out={out_w} (H={params['H']}, W={params['W']}, pads, dilated kernel)")


def layer_geometry(params: Mapping[str, Any]) -> Geometry:
    """The layer's core geometry: stride 1 and padding dilation·(k − 1) // 2."""
    return Geometry.from_params({
        **params, "stride_h": 1, "stride_w": 1,
        "pad_h": params["dilation_h"] * (params["kernel_h"] - 1) // 2,
        "pad_w": params["dilation_w"] * (params["kernel_w"] - 1) // 2,
    })


def validate_layer_params(params: Mapping[str, Any]) -> None:
    """The core's checks, plus odd ``kernel_h``, ``kernel_w``, ``dw_kernel_size`` (the layer keeps H × W)."""
    for name in ("kernel_h", "kernel_w", "dw_kernel_size"):
        if params[name] < 1 or params[name] % 2 == 0:
            raise ValueError(f"parameter {name!r} must be odd and >= 1 (the layer keeps H × W), "
                             f"got {params[name]}")
    validate_core_params({**params, **dataclasses.asdict(layer_geometry(params))})


def core_arguments(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments every ``dcnv4`` implementation takes (``dcnv3`` adds ``softmax``)."""
    return {name: params[name] for name in CORE_PARAMS if name not in ("N", "H", "W")}


# --- input generation -------------------------------------------------------

def _positions(params) -> tuple[Geometry, tuple[int, ...], tuple[torch.Tensor, ...]]:
    """(geometry, point shape [N, H_out, W_out, G, P], (base_y, base_x, tap_y, tap_x))
    in float64, broadcastable to the point shape."""
    geometry = Geometry.from_params(params)
    out_h, out_w = geometry.output_size(params["H"], params["W"])
    shape = (params["N"], out_h, out_w, params["group"], geometry.taps)
    base_y, base_x = geometry.window_origin(out_h, out_w, dtype=torch.float64, device="cpu")
    tap_y, tap_x = geometry.tap_grid(dtype=torch.float64, device="cpu")
    return geometry, shape, (base_y[:, None, None, None], base_x[:, None, None], tap_y, tap_x)


def _offsets_for(targets: torch.Tensor, base: torch.Tensor, tap: torch.Tensor, scale: float) -> torch.Tensor:
    """The d with base + (tap + d)·scale = targets (float64, before rounding to the dtype)."""
    return (targets - base) / scale - tap


def _random_offsets(params, generator, dtype) -> torch.Tensor:
    """[N, H_out, W_out, G, P, 2] (dx, dy), see the module docstring's ``random``."""
    geometry, shape, (base_y, base_x, tap_y, tap_x) = _positions(params)
    scale = geometry.offset_scale
    offset = _round_to(draw_uniform(generator, (*shape, 2), -2.0, 2.0) + draw(generator, (*shape, 2)), dtype)
    for axis, (base, tap) in enumerate(((base_x, tap_x), (base_y, tap_y))):
        position = base + (tap + offset[..., axis]) * scale
        nearest = position.round()
        near_kink = (position - nearest).abs() < KINK_MARGIN
        moved = _round_to(_offsets_for(nearest + 0.5, base, tap, scale), dtype)
        offset[..., axis] = torch.where(near_kink, moved, offset[..., axis])
    return offset


def _exact(params, dtype, offset, targets, mode) -> torch.Tensor:
    """``offset`` rounded to ``dtype``, checked to hit ``targets`` (a list per axis) exactly."""
    geometry, _, (base_y, base_x, tap_y, tap_x) = _positions(params)
    rounded = _round_to(offset, dtype)
    for axis, (base, tap) in enumerate(((base_x, tap_x), (base_y, tap_y))):
        position = base + (tap + rounded[..., axis]) * geometry.offset_scale
        if not torch.equal(position, targets[axis]):
            raise ValueError(
                f"input mode {mode!r} needs offsets that {dtype} holds exactly and positions "
                f"base + (tap + d)·offset_scale without rounding; expected offset_scale a power "
                f"of two and maps small enough for {dtype}, got offset_scale="
                f"{geometry.offset_scale}, H={params['H']}, W={params['W']}"
            )
    return rounded


def _integer_offsets(params, generator, dtype) -> torch.Tensor:
    """Every position an integer: round(base + tap·scale + U(-2, 2) + N(0, 1))."""
    geometry, shape, (base_y, base_x, tap_y, tap_x) = _positions(params)
    targets, offset = [], torch.empty(*shape, 2, dtype=torch.float64)
    for axis, (base, tap) in enumerate(((base_x, tap_x), (base_y, tap_y))):
        noise = draw_uniform(generator, shape, -2.0, 2.0) + draw(generator, shape)
        target = (base + tap * geometry.offset_scale + noise).round()
        offset[..., axis] = _offsets_for(target, base, tap, geometry.offset_scale)
        targets.append(target)
    return _exact(params, dtype, offset, targets, "integer_offsets")


def _border_offsets(params, generator, dtype) -> torch.Tensor:
    """Pin x, y or both of every sample point to B0's boundary {-1, 0, size-1, size}."""
    geometry, shape, (base_y, base_x, tap_y, tap_x) = _positions(params)
    offset = _random_offsets(params, generator, dtype)
    pinned_axes = torch.randint(3, shape, generator=generator)  # 0: x, 1: y, 2: both
    targets = []
    for axis, (base, tap, size) in enumerate(((base_x, tap_x, params["W"]), (base_y, tap_y, params["H"]))):
        boundary = torch.tensor([-1.0, 0.0, size - 1.0, float(size)], dtype=torch.float64)
        pinned = (pinned_axes == axis) | (pinned_axes == 2)
        free = base + (tap + offset[..., axis]) * geometry.offset_scale
        target = torch.where(pinned, boundary[torch.randint(4, shape, generator=generator)], free)
        offset[..., axis] = torch.where(pinned, _offsets_for(target, base, tap, geometry.offset_scale),
                                        offset[..., axis])
        targets.append(target)
    return _exact(params, dtype, offset, targets, "border")


def _far_offsets(params, generator, dtype) -> torch.Tensor:
    """Half the sample points displaced by ±[2, 3]·reach, the others as ``random``."""
    geometry, shape, (_, _, tap_y, tap_x) = _positions(params)
    offset = _random_offsets(params, generator, dtype)
    reach = params["H"] + params["W"] + 2 * (params["pad_h"] + params["pad_w"])
    far = torch.rand(shape, generator=generator) < 0.5
    for axis, tap in enumerate((tap_x, tap_y)):
        sign = torch.randint(2, shape, generator=generator, dtype=torch.float64) * 2 - 1
        displacement = sign * draw_uniform(generator, shape, 2.0 * reach, 3.0 * reach)
        distant = _round_to(displacement / geometry.offset_scale - tap, dtype)
        offset[..., axis] = torch.where(far, distant, offset[..., axis])
    return offset


OFFSET_GENERATORS: dict[str, Callable[..., torch.Tensor]] = {
    "random": _random_offsets,
    "integer_offsets": _integer_offsets,
    "border": _border_offsets,
    "far": _far_offsets,
    "zero_mask": _random_offsets,
}


def draw_offset_and_mask(params, generator, dtype, mode, softmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(offset [N, H_out, W_out, G, P, 2], mask [N, H_out, W_out, G, P]), float64 on
    the CPU, offsets already rounded to ``dtype``; by ``mode`` (module docstring)."""
    offset = OFFSET_GENERATORS[mode](params, generator, dtype)
    shape = offset.shape[:-1]
    logits = draw(generator, shape)
    mask = 2 * logits if softmax else torch.sigmoid(logits)
    if mode == "zero_mask":
        dead = torch.zeros(shape, dtype=torch.bool)
        dead[..., torch.arange(shape[3]), torch.randint(shape[4], (shape[3],), generator=generator)] = True
        dead |= torch.rand(shape, generator=generator) < 0.25
        mask = torch.where(dead, ZERO_MASK_LOGIT if softmax else 0.0, mask)
    return offset, mask


def _make_core_inputs(params, dtype, device, generator, mode="random"):
    """input, offset, mask (by ``mode``), in that draw order."""
    check_mode("dcnv3", mode, CORE_MODES)
    p = params
    input = draw(generator, (p["N"], p["H"], p["W"], p["group"] * p["group_channels"]))
    offset, mask = draw_offset_and_mask(params, generator, dtype, mode, p["softmax"])
    return to_case({"input": input, "offset": offset.flatten(3), "mask": mask.flatten(3)}, dtype, device)


# --- counts -----------------------------------------------------------------

def sample_counts(params: Mapping[str, Any], geometry: Geometry | None = None) -> tuple[int, int, int]:
    """(sample points N·H_out·W_out·G·P, channel samples × D, outputs N·H_out·W_out·G·D)."""
    geometry = geometry or Geometry.from_params(params)
    out_h, out_w = geometry.output_size(params["H"], params["W"])
    points = params["N"] * out_h * out_w * params["group"] * geometry.taps
    pixels = params["N"] * out_h * out_w
    return points, points * params["group_channels"], pixels * params["group"] * params["group_channels"]


def core_flops(params: Mapping[str, Any], softmax: bool, geometry: Geometry | None = None) -> float:
    """Forward flops of the core op.

    14 per sample point: per axis base + (tap + d)·scale (add, multiply, add),
    the fraction and its complement (2 subtracts), then the 4 corner weights
    (4 multiplies); + 5 with ``softmax`` (max compare, subtract, exp, sum add,
    divide). 9 per channel sample: the blend of 4 corners (4 multiplies, 3 adds),
    the mask multiply and the add into the sum over taps.
    """
    points, samples, _ = sample_counts(params, geometry)
    return float((POINT_FLOPS + SOFTMAX_POINT_FLOPS * softmax) * points + SAMPLE_FLOPS * samples)


def core_bytes(params: Mapping[str, Any], itemsize: int, geometry: Geometry | None = None) -> float:
    """itemsize · (input + offset + mask + output): each read or written once."""
    points, _, outputs = sample_counts(params, geometry)
    inputs = params["N"] * params["H"] * params["W"] * params["group"] * params["group_channels"]
    return float(itemsize * (inputs + 3 * points + outputs))


def core_backward_flops(params: Mapping[str, Any], softmax: bool, geometry: Geometry | None = None) -> float:
    """Backward flops of the core op.

    18 per sample point: the 14 of the forward recomputed, the two position
    gradients times offset_scale and their stores (4); + 4 with ``softmax``
    (the softmax's backward: Σ m·g, subtract, multiply, from the saved
    weights). 32 per channel sample: the sample recomputed (7) for grad_mask
    (multiply-add, 2), mask·grad_output (1), its scatter into 4 corners of
    grad_input (4 multiplies, 4 adds), the blend's d/dx and d/dy
    (2 × (2 subtracts, 2 multiplies, 1 add)) times it, accumulated (4).
    """
    points, samples, _ = sample_counts(params, geometry)
    return float((BACKWARD_POINT_FLOPS + BACKWARD_SOFTMAX_POINT_FLOPS * softmax) * points
                 + BACKWARD_SAMPLE_FLOPS * samples)


def core_backward_bytes(params: Mapping[str, Any], itemsize: int) -> float:
    """itemsize · (input, offset, mask, grad_output read; grad_input, grad_offset,
    grad_mask written): twice the forward's input side plus the output's size."""
    points, _, outputs = sample_counts(params)
    inputs = params["N"] * params["H"] * params["W"] * params["group"] * params["group_channels"]
    return float(itemsize * (2 * (inputs + 3 * points) + outputs))


# --- dcnv3 ------------------------------------------------------------------

# Measured on the CPU (suite dcn34-edge): forward rel_l2 5.5e-3 in float16 and
# 5.3e-2 in bfloat16 (3x the bounds), gradients 0.16 and 0.25 (grad_offset).
GRIDSAMPLE_HALF = ("F.grid_sample computes the normalised sampling grid and the blend in the "
                   "case's dtype: a position error of up to W·2^-12 pixels in float16, "
                   "W·2^-9 in bfloat16")
GRIDSAMPLE_INACCURATE = {"float16": GRIDSAMPLE_HALF, "bfloat16": GRIDSAMPLE_HALF}


def _no_cuda_compile(device: str) -> str | None:
    return "torch_compile is a GPU peer (torch.compile of the grid_sample formulation)" \
        if device != "cuda" else None


class CompiledCall:
    """``torch.compile(call, dynamic=False)``, compiled for this case alone, honest about it.

    ``row_values()`` (attached to the row's ``measured`` after timing) counts the
    graphs dynamo compiled on the first call, the graphs compiled after it
    (recompilations), graph breaks (code between graphs runs eagerly) and frames
    that fell back to eager; the row says ``torch_compile_compiled`` false when
    any of the call ran eagerly or nothing was compiled, so it never claims
    compiled code that did not run. Errors are never suppressed (an error row,
    not a silent eager run).
    """

    def __init__(self, call: Callable[[], torch.Tensor]):
        import torch._dynamo

        if torch._dynamo.config.suppress_errors:
            raise RuntimeError("torch._dynamo.config.suppress_errors is on: a failed compile "
                               "would run eagerly and be reported as compiled")
        torch._dynamo.reset()  # per case: nothing compiled for another shape is reused
        self._counts = [_dynamo_counts()]  # before, then after the first call
        self._compiled = torch.compile(call, dynamic=False)

    def __call__(self) -> torch.Tensor:
        out = self._compiled()
        if len(self._counts) == 1:
            self._counts.append(_dynamo_counts())
        return out

    def row_values(self) -> dict[str, int | bool]:
        before, first = self._counts[0], self._counts[-1]
        now = _dynamo_counts()
        found = {
            "graphs": first["unique_graphs"] - before["unique_graphs"],
            "recompiles": now["unique_graphs"] - first["unique_graphs"],
            "graph_breaks": now["graph_breaks"] - before["graph_breaks"],
            "eager_frames": now["eager_frames"] - before["eager_frames"],
        }
        found["compiled"] = (found["graphs"] > 0 and found["eager_frames"] == 0
                             and found["graph_breaks"] == 0)
        return {f"torch_compile_{name}": value for name, value in found.items()}


def _dynamo_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    frames = counters["frames"]
    return {"unique_graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "eager_frames": frames["total"] - frames["ok"]}


def register_core_implementations(op: str, tensor_names: tuple[str, ...],
                                  arguments: Callable[[Mapping[str, Any]], dict[str, Any]],
                                  kernel_module: str) -> None:
    """reference, pytorch_gridsample, torch_compile and cupy_<design> for our kernels'
    designs (direct, vectorized, staged,
    shared_scatter) of ``op``: each calls its module's
    function named ``op`` on ``tensor_names``."""

    def prepare(load_function, doc):
        def bind(inputs, params):
            return functools.partial(load_function(), *(inputs[name] for name in tensor_names),
                                     **arguments(params))

        bind.__doc__ = doc
        return bind

    implementation(op, "reference", kind="reference", dtypes=tuple(CORE_TOLERANCES))(in_float64(
        prepare(lambda: getattr(reference_ops, op),
                f"kernels.reference.dcnv3.{op}: plain PyTorch from the contract, in float64.")))
    def prepare_gridsample(inputs, params):
        """InternImage's pure-PyTorch formulation (pad + F.grid_sample per group), in the case's dtype."""
        return getattr(dcnv3_gridsample, f"prepare_{op}")(
            *(inputs[name] for name in tensor_names), **arguments(params))

    def prepare_compiled(inputs, params):
        """torch.compile(dynamic=False) of the grid_sample formulation per case, in the case's dtype."""
        return CompiledCall(prepare_gridsample(inputs, params))

    implementation(op, "pytorch_gridsample", kind="peer", dtypes=KERNEL_DTYPES,
                   known_inaccurate=GRIDSAMPLE_INACCURATE)(prepare_gridsample)
    implementation(op, "torch_compile", kind="peer", dtypes=KERNEL_DTYPES, devices=("cuda",),
                   available=_no_cuda_compile, known_inaccurate=GRIDSAMPLE_INACCURATE)(
        prepare_compiled)
    for design in ("direct", "vectorized", "staged", "shared_scatter"):
        def prepare_kernel(inputs, params, design=design):
            kernel_prepare = importlib.import_module(kernel_module).prepare
            return kernel_prepare(*(inputs[name] for name in tensor_names), **arguments(params),
                                  design=design)

        # float64 too: the kernels' double instantiations (for gradcheck).
        implementation(op, f"cupy_{design}", kind="kernel", dtypes=(*KERNEL_DTYPES, "float64"),
                       available=kernel_availability(kernel_module), emulated_on=("cpu",),
                       description=f"{kernel_module}.{op}(design={design!r}): our CuPy kernels "
                                   "(CPU: the emulator); checked once, then unchecked.")(
            prepare_kernel)


def _dcnv3_arguments(params):
    return {**core_arguments(params), "softmax": params["softmax"]}


# --- the sampling view (reports' sampling page) ---------------------------

def sampling_view(params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> SamplingPicture:
    """DCNv3/DCNv4 (channels-last): taps column-major, (dx, dy) at g·P·2 + 2p, x first;
    DCNv4's fused ``offset_mask`` unpacked as the contract says."""
    import torch

    from kernels.reference.dcnv3 import Geometry, unpack_offset_mask

    geometry, group = Geometry.from_params(params), params["group"]
    taps = geometry.taps
    if "offset_mask" in arrays:
        offset, mask = unpack_offset_mask(
            torch.from_numpy(arrays["offset_mask"].astype(np.float64)), group, taps)
    else:
        offset = torch.from_numpy(arrays["offset"].astype(np.float64))
        mask = torch.from_numpy(arrays["mask"].astype(np.float64))
    _, out_h, out_w, _ = offset.shape
    ho, wo = out_h // 2, out_w // 2
    y, x = geometry.sample_positions(offset, group)
    base_y, base_x = geometry.sample_positions(torch.zeros_like(offset), group)
    weight = mask[0, ho, wo, :taps]
    if params.get("softmax"):
        weight = torch.softmax(weight, dim=0)
    tap_y, tap_x = geometry.tap_grid(dtype=torch.float64, device="cpu")
    heat = arrays["input"][0, :, :, :params["group_channels"]].astype(np.float64).mean(axis=-1)
    return SamplingPicture(
        op=params["op"], case_id=params["case_id"],
        title=f"output (ho={ho}, wo={wo}) of batch element 0, group 0",
        heat=heat,
        regular=np.stack([base_y[0, ho, wo, 0].numpy(), base_x[0, ho, wo, 0].numpy()], axis=1),
        deformed=np.stack([y[0, ho, wo, 0].numpy(), x[0, ho, wo, 0].numpy()], axis=1),
        weight=weight.numpy(),
        labels=[f"tap {p} (dy={ty:g}, dx={tx:g})"
                for p, (ty, tx) in enumerate(zip(tap_y.tolist(), tap_x.tolist(), strict=True))],
    )


register_operator(Operator(
    name="dcnv3",
    summary="InternImage's DCNv3 core op, channels-last (mask as given, or softmax over taps fused)",
    params=DCNV3_PARAMS,
    tensors=(
        TensorSpec("input", "[N, H, W, group·group_channels]"),
        TensorSpec("offset", "[N, H_out, W_out, group·P·2]"),
        TensorSpec("mask", "[N, H_out, W_out, group·P]"),
    ),
    make_inputs=_make_core_inputs,
    flops=lambda p: core_flops(p, p["softmax"]),
    bytes=core_bytes,
    tolerances=CORE_TOLERANCES,
    backward_flops=lambda p: core_backward_flops(p, p["softmax"]),
    backward_bytes=core_backward_bytes,
    input_modes=CORE_MODES,
    baseline="pytorch_gridsample",
    id_pairs=GEOMETRY_ID_PAIRS,
    forward_only_modes=FORWARD_ONLY_MODES,
    validate=validate_core_params,
    sampling_view=sampling_view,
))
register_core_implementations("dcnv3", ("input", "offset", "mask"), _dcnv3_arguments, "kernels.ops.dcnv3")


# --- dcnv3_layer ------------------------------------------------------------

def _layer_shapes(params) -> dict[str, tuple[int, ...]]:
    channels = params["group"] * params["group_channels"]
    return layer_ops.layer_weight_shapes(channels, params["group"], layer_geometry(params).taps,
                                         params["dw_kernel_size"], params["center_feature_scale"])


def _make_layer_inputs(params, dtype, device, generator, mode="random"):
    """``input`` [N, H, W, C] ~ N(0, 1), then every weight in ``layer_weight_shapes`` order:
    U(±1/sqrt(fan_in)) (offset weights ×4, so the layer's offsets span a few pixels),
    LayerNorm weight 1 + 0.1·N(0, 1) and bias 0.1·N(0, 1)."""
    check_mode("dcnv3_layer", mode, ("random",))
    p = params
    tensors = {"input": draw(generator, (p["N"], p["H"], p["W"], p["group"] * p["group_channels"]))}
    shapes = _layer_shapes(params)
    for name, shape in shapes.items():
        if name.startswith("norm_"):
            tensors[name] = (name == "norm_weight") + 0.1 * draw(generator, shape)
            continue
        bound = 1 / math.sqrt(math.prod(shapes[name.replace("_bias", "_weight")][1:]))  # fan_in
        tensors[name] = draw_uniform(generator, shape, -bound, bound) * (4 if name == "offset_weight" else 1)
    return to_case(tensors, dtype, device)


def _layer_gemm_flops(params) -> tuple[float, float]:
    """(flops of the layer's matrix products and depthwise conv, elementwise flops)."""
    shapes = _layer_shapes(params)
    pixels = params["N"] * params["H"] * params["W"]
    channels = params["group"] * params["group_channels"]
    gemm = sum(2.0 * pixels * shape[0] * shape[1] for name, shape in shapes.items()
               if name.endswith("_weight") and len(shape) == 2)
    gemm += 2.0 * pixels * channels * params["dw_kernel_size"] ** 2
    # bias adds (1 per output of each product), LayerNorm 8, GELU 5 per element,
    # centre-feature sigmoid 4 per group and blend 3 per element.
    biases = sum(pixels * shape[0] for name, shape in shapes.items() if name.endswith("_bias")
                 and not name.startswith("norm_"))
    elementwise = biases + 13 * pixels * channels
    if params["center_feature_scale"]:
        elementwise += pixels * (4 * params["group"] + 3 * channels)
    return gemm, float(elementwise)


def layer_flops(params) -> float:
    """Matrix products (input_proj, offset, mask, output_proj, centre-feature
    scale: 2 flops per multiply-add), depthwise conv (2·C·k² per pixel), bias
    adds, LayerNorm (8 per element) + GELU (5 per element), the centre-feature
    blend, and the core op with its softmax (``core_flops``)."""
    gemm, elementwise = _layer_gemm_flops(params)
    return gemm + elementwise + core_flops(params, True, layer_geometry(params))


def layer_backward_flops(params) -> float:
    """2 × the matrix products (gradients of inputs and weights), 2 × the
    elementwise flops, and the core op's backward with softmax."""
    gemm, elementwise = _layer_gemm_flops(params)
    return 2 * gemm + 2 * elementwise + core_backward_flops(params, True, layer_geometry(params))


def layer_bytes(params, itemsize) -> float:
    """itemsize · (input + weights + output): the fewest a fused layer could move."""
    weights = sum(math.prod(shape) for shape in _layer_shapes(params).values())
    activations = 2 * params["N"] * params["H"] * params["W"] * params["group"] * params["group_channels"]
    return float(itemsize * (activations + weights))


def layer_backward_bytes(params, itemsize) -> float:
    """itemsize · (input, weights, grad_output read; grad_input, grad_weights written)."""
    return 2 * layer_bytes(params, itemsize)


LAYER_TOLERANCES: dict[str, Tolerance] = {
    "float64": CORE_TOLERANCES["float64"],
    "float32": Tolerance(
        rel_l2=1e-4, max_abs=5e-4,
        why=("u = 2^-24, no TF32: the products have C ≤ 2560 terms (~sqrt(C)·u ≈ 3e-6), and "
             "the offsets the layer computes differ from float64's by ~1e-6 pixels, moving each "
             "sample by that times the map's slope: ~1e-5 relative; 10x margin in rel_l2."),
    ),
    "float16": Tolerance(
        rel_l2=16 * _U["float16"], max_abs=32 * _U["float16"],
        why=("u = 2^-11. Every stage (input_proj, dw conv, LayerNorm, GELU, offset and mask "
             "products, core op, output_proj) rounds its output to the dtype: ~u/sqrt(3) each, "
             "and a rounded offset (|d| ~ 2: ±2u pixels) moves its sample by that times the "
             "slope. ~3u in L2 measured-order; rel_l2 = 16u, max_abs = 32u."),
    ),
    "bfloat16": Tolerance(
        rel_l2=16 * _U["bfloat16"], max_abs=32 * _U["bfloat16"],
        why="u = 2^-8; the float16 argument: rel_l2 = 16u, max_abs = 32u.",
    ),
}

# The layer computes its offsets, so they differ from the float64 oracle's by the
# dtype's rounding (δ ≈ a few u·|offset| pixels), and B0's slope jumps at every
# integer position: a sample within δ of one gets its offset gradient from the
# other side of the kink, an O(1) error in ~2δ of the samples whatever the
# implementation (a perfect one included). The gradients of everything upstream
# of the offsets (offset, dw-conv and norm weights, the input) then err by
# ~sqrt(2δ) relative: measured on the CPU (N = 8, 32×32, 4 groups of 16) 8e-4
# in float32, 3e-2 in float16, 0.15 in bfloat16. The bounds below are that
# argument with ~3x margin: they catch wrong wiring, NaN and garbage, not
# rounding; the core op's gradients are judged tightly by ``dcnv3``.
LAYER_BACKWARD_TOLERANCES: dict[str, Tolerance] = {
    "float64": CORE_TOLERANCES["float64"],
    "float32": Tolerance(rel_l2=5e-3, max_abs=0.1, why=(
        "kinks of B0 under offsets computed in float32 (δ ~ 1e-6 pixels): sqrt(2δ) ≈ 1.4e-3 "
        "relative, measured 8e-4 (max_abs 0.016); ~3x margin (see harness.operators.dcnv3).")),
    "float16": Tolerance(rel_l2=0.1, max_abs=0.5, why=(
        "kinks of B0 under offsets computed in float16 (δ ~ 1e-3 pixels): sqrt(2δ) ≈ 4e-2, "
        "measured 3e-2 (max_abs 0.09); ~3x margin.")),
    "bfloat16": Tolerance(rel_l2=0.5, max_abs=1.0, why=(
        "kinks of B0 under offsets computed in bfloat16 (δ ~ 8e-3 pixels): sqrt(2δ) ≈ 0.13, "
        "measured 0.15 (max_abs 0.14); ~3x margin: a wiring check only.")),
}


def _layer_tensor_specs() -> tuple[TensorSpec, ...]:
    c, gp = "C", "group·P"
    shapes = {
        "input_proj_weight": f"[{c}, {c}]", "input_proj_bias": f"[{c}]",
        "dw_weight": f"[{c}, 1, dw_kernel_size, dw_kernel_size]", "dw_bias": f"[{c}]",
        "norm_weight": f"[{c}]", "norm_bias": f"[{c}]",
        "offset_weight": f"[{gp}·2, {c}]", "offset_bias": f"[{gp}·2]",
        "mask_weight": f"[{gp}, {c}]", "mask_bias": f"[{gp}]",
        "output_proj_weight": f"[{c}, {c}]", "output_proj_bias": f"[{c}]",
        "center_feature_scale_weight": f"[group, {c}]", "center_feature_scale_bias": "[group]",
    }
    return (TensorSpec("input", "[N, H, W, C], C = group·group_channels"),) + tuple(
        TensorSpec(name, shapes[name], optional=name.startswith("center_feature_scale"))
        for name in layer_ops.LAYER_WEIGHTS)


def _layer_prepare(core_loader: Callable[[], Callable], doc: str):
    def prepare(inputs, params):
        weights = {name: tensor for name, tensor in inputs.items() if name != "input"}
        options = {name: params[name] for name in LAYER_PARAMS
                   if name not in ("N", "H", "W", "center_feature_scale")}
        return layer_ops.prepare_layer(inputs["input"], weights, core=core_loader(), **options)

    prepare.__doc__ = doc
    return prepare


register_operator(Operator(
    name="dcnv3_layer",
    summary="InternImage's whole DCNv3 block (projections, dw conv + LN + GELU, softmax, core op)",
    params=LAYER_PARAMS,
    tensors=_layer_tensor_specs(),
    make_inputs=_make_layer_inputs,
    flops=layer_flops,
    bytes=layer_bytes,
    tolerances=LAYER_TOLERANCES,
    backward_tolerances=LAYER_BACKWARD_TOLERANCES,
    backward_flops=layer_backward_flops,
    backward_bytes=layer_backward_bytes,
    input_modes=("random",),
    baseline="pytorch_gridsample",
    id_pairs=GEOMETRY_ID_PAIRS,
    validate=validate_layer_params,
))

implementation("dcnv3_layer", "reference", kind="reference", dtypes=tuple(LAYER_TOLERANCES))(in_float64(
    _layer_prepare(lambda: reference_ops.dcnv3, "The layer on kernels.reference.dcnv3.dcnv3, in float64.")))
implementation("dcnv3_layer", "pytorch_gridsample", kind="peer", dtypes=KERNEL_DTYPES,
               known_inaccurate=GRIDSAMPLE_INACCURATE)(
    _layer_prepare(lambda: dcnv3_gridsample.unchecked_dcnv3,
                   "The layer on the grid_sample core, in the case's dtype."))
for _design in ("direct", "vectorized", "staged", "shared_scatter"):
    # The core runs on offsets and masks the layer computes from checked weights: unchecked.
    implementation("dcnv3_layer", f"cupy_{_design}", kind="kernel", dtypes=KERNEL_DTYPES,
                   available=kernel_availability("kernels.ops.dcnv3"), emulated_on=("cpu",))(
        _layer_prepare(lambda design=_design: functools.partial(
            importlib.import_module("kernels.ops.dcnv3").unchecked_dcnv3, design=design),
            f"The layer on kernels.ops.dcnv3.dcnv3(design={_design!r}) (CPU: the emulator)."))
