"""``ms_deform_attn``: Deformable DETR's multi-scale deformable attention.

Contract: ``docs/ops-semantics.md``, "Multi-scale deformable attention"; the
operator, its inputs and its numbers are explained in ``docs/operators/msda.md``.
Peers users install (torch-ms-deform-attn, deformops, DCNv4's package) are
registered in ``kernels.peers`` modules of their own and wired here.

Tensors: ``value`` [N, S, M, D], ``spatial_shapes`` [L, 2] and
``level_start_index`` [L] (int64, no gradient), ``sampling_locations``
[N, Lq, M, L, P, 2], ``attention_weights`` [N, Lq, M, L, P].

Levels: level l is ceil(H/2^l) × ceil(W/2^l), or ``spatial_shapes`` =
"HxW,HxW,…" names them outright (then ``L`` must be their number; a level
may be empty, "0x0").

Input modes (value ~ N(0, 1), weights sigmoid(N(0, 1)), with ``softmax``
logits 2·N(0, 1), in all). A point's pixel is x = loc_x·W_l − 0.5; the modes
choose the pixel and solve for loc:

- ``random``: pixel U(−1.5, W_l + 0.5), loc rounded to the dtype; a pixel
  within ``KINK_MARGIN`` of an integer (a kink of B0) is moved to that
  integer + 0.5 (rounded again), so gradients are well defined. About 1/8 of
  the points fall outside the map (partly or wholly zero).
- ``pixel_lines``: x, y or both (a third each) on an integer pixel in
  [−1, W_l]: the corners and the map's border, where B0 has kinks. Forward only.
- ``outside``: half the points at loc in ±[1.2, 3] outside [0, 1] on one or
  both axes (B0 gives 0, so do their gradients); the other half as ``random``.

Counts: docstrings of ``_flops`` / ``_backward_flops``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from harness.operators.dcnv3 import CORE_TOLERANCES, GRIDSAMPLE_INACCURATE
from harness.operators.deform_conv2d import KINK_MARGIN, _round_to
from harness.operators.inputs import check_mode, draw, draw_uniform, in_float64, to_case
from harness.registry import (
    KERNEL_DTYPES,
    Operator,
    TensorSpec,
    implementation,
    kernel_availability,
    register_operator,
)
from harness.sampling import SamplingPicture
from kernels.peers import ms_deform_attn_gridsample
from kernels.reference import ms_deform_attn as reference_ops

PARAMS: dict[str, Any] = {
    "N": 2,
    "Lq": 16,
    "M": 2,
    "D": 8,
    "L": 3,
    "P": 4,
    "H": 16,
    "W": 20,
    "softmax": False,
    "spatial_shapes": "",  # "HxW,HxW,…" names the levels; empty: the pyramid of H, W
}
MODES = ("random", "pixel_lines", "outside")
FORWARD_ONLY_MODES = ("pixel_lines",)

# Flops per sample point (N·Lq·M·L·P) and per channel sample (× D); see _flops.
POINT_FLOPS = 12
SOFTMAX_POINT_FLOPS = 5
SAMPLE_FLOPS = 9
BACKWARD_POINT_FLOPS = 18
BACKWARD_SOFTMAX_POINT_FLOPS = 4
BACKWARD_SAMPLE_FLOPS = 32


def level_shapes(params: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(H_l, W_l) of every level: ``spatial_shapes`` parsed, or the pyramid of H × W."""
    named = params["spatial_shapes"].strip()
    if not named:
        return [(-(-params["H"] // 2**level), -(-params["W"] // 2**level))
                for level in range(params["L"])]
    shapes = []
    for token in named.split(","):
        height, sep, width = token.strip().partition("x")
        if not sep or not height.isdigit() or not width.isdigit():
            raise ValueError(f"parameter 'spatial_shapes' must be 'HxW,HxW,...' with integers "
                             f">= 0, got {named!r} (the token {token.strip()!r})")
        shapes.append((int(height), int(width)))
    return shapes


def validate(params: Mapping[str, Any]) -> None:
    """Reject a case no implementation can run, naming the parameter.

    ``N, Lq`` >= 0; ``M, D, L, P, H, W`` >= 1; ``spatial_shapes`` well formed
    with ``L`` levels.
    """
    for name in ("N", "Lq"):
        if params[name] < 0:
            raise ValueError(f"parameter {name!r} must be >= 0, got {params[name]}")
    for name in ("M", "D", "L", "P", "H", "W"):
        if params[name] < 1:
            raise ValueError(f"parameter {name!r} must be >= 1, got {params[name]}")
    shapes = level_shapes(params)
    if len(shapes) != params["L"]:
        raise ValueError(f"parameter 'L' must be the number of levels spatial_shapes names: "
                         f"expected {len(shapes)} ({params['spatial_shapes']!r}), got {params['L']}")


def _arguments(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"softmax": params["softmax"]}


# --- input generation -------------------------------------------------------

def _sizes(params) -> tuple[torch.Tensor, tuple[int, ...]]:
    """(level sizes [L, 2] as float64 (H_l, W_l), point shape [N, Lq, M, L, P])."""
    shapes = torch.tensor(level_shapes(params), dtype=torch.float64).reshape(-1, 2)
    p = params
    return shapes, (p["N"], p["Lq"], p["M"], p["L"], p["P"])


def _locations_for(pixels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """loc = (pixel + 0.5) / size; ``pixels`` [..., L, P, 2] (x, y), ``sizes`` (W_l, H_l)
    broadcast over the points. An empty level's locations are 0.5."""
    per_level = sizes[:, None, :]  # [L, 1, 2]
    return torch.where(per_level > 0, (pixels + 0.5) / per_level.clamp(min=1), 0.5)


def _pixels_of(locations: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    return locations * sizes[:, None, :] - 0.5


def _random_locations(params, generator, dtype) -> torch.Tensor:
    shapes, point_shape = _sizes(params)
    sizes = shapes.flip(-1)  # (W_l, H_l): x first
    low, high = -1.5, sizes[:, None, :] + 0.5
    unit = draw_uniform(generator, (*point_shape, 2), 0.0, 1.0)
    locations = _round_to(_locations_for(low + (high - low) * unit, sizes), dtype)
    pixels = _pixels_of(locations, sizes)
    nearest = pixels.round()
    near_kink = (pixels - nearest).abs() < KINK_MARGIN
    moved = _round_to(_locations_for(nearest + 0.5, sizes), dtype)
    return torch.where(near_kink, moved, locations)


def _pixel_line_locations(params, generator, dtype) -> torch.Tensor:
    shapes, point_shape = _sizes(params)
    sizes = shapes.flip(-1)
    locations = _random_locations(params, generator, dtype)
    pinned_axes = torch.randint(3, point_shape, generator=generator)  # 0: x, 1: y, 2: both
    for axis in (0, 1):
        pinned = (pinned_axes == axis) | (pinned_axes == 2)
        size = sizes[:, axis][:, None]  # [L, 1]
        line = (torch.rand(point_shape, generator=generator, dtype=torch.float64)
                * (size + 2)).floor() - 1  # an integer pixel in [-1, size]
        on_line = torch.where(size > 0, (line + 0.5) / size.clamp(min=1), 0.5)
        locations[..., axis] = torch.where(pinned, _round_to(on_line, dtype), locations[..., axis])
    return locations


def _outside_locations(params, generator, dtype) -> torch.Tensor:
    _, point_shape = _sizes(params)
    locations = _random_locations(params, generator, dtype)
    moved = torch.rand(point_shape, generator=generator) < 0.5
    axes = torch.randint(3, point_shape, generator=generator)  # 0: x, 1: y, 2: both
    for axis in (0, 1):
        side = torch.randint(2, point_shape, generator=generator, dtype=torch.float64)
        distance = draw_uniform(generator, point_shape, 0.2, 2.0)
        far = torch.where(side > 0, 1.0 + distance, -distance)
        chosen = moved & ((axes == axis) | (axes == 2))
        locations[..., axis] = torch.where(chosen, _round_to(far, dtype), locations[..., axis])
    return locations


LOCATION_GENERATORS = {
    "random": _random_locations,
    "pixel_lines": _pixel_line_locations,
    "outside": _outside_locations,
}


def _make_inputs(params, dtype, device, generator, mode="random"):
    """value, then sampling_locations (by ``mode``), then attention_weights."""
    check_mode("ms_deform_attn", mode, MODES)
    p = params
    shapes = level_shapes(params)
    positions = sum(height * width for height, width in shapes)
    value = draw(generator, (p["N"], positions, p["M"], p["D"]))
    locations = LOCATION_GENERATORS[mode](params, generator, dtype)
    logits = draw(generator, (p["N"], p["Lq"], p["M"], p["L"], p["P"]))
    weights = 2 * logits if p["softmax"] else torch.sigmoid(logits)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    floating = to_case({"value": value, "sampling_locations": locations,
                        "attention_weights": weights}, dtype, device)
    return {
        "value": floating["value"],
        "spatial_shapes": spatial_shapes.to(device),
        "level_start_index": reference_ops.level_start_index_of(spatial_shapes).to(device),
        "sampling_locations": floating["sampling_locations"],
        "attention_weights": floating["attention_weights"],
    }


# --- counts -----------------------------------------------------------------

def _counts(params) -> tuple[int, int, int, int]:
    """(sample points N·Lq·M·L·P, channel samples × D, outputs N·Lq·M·D, value elements)."""
    p = params
    points = p["N"] * p["Lq"] * p["M"] * p["L"] * p["P"]
    positions = sum(height * width for height, width in level_shapes(params))
    return (points, points * p["D"], p["N"] * p["Lq"] * p["M"] * p["D"],
            p["N"] * positions * p["M"] * p["D"])


def _flops(params) -> float:
    """Forward flops.

    12 per sample point: per axis loc·size − 0.5 (multiply, subtract), the
    fraction and its complement (2 subtracts), then the 4 corner weights
    (4 multiplies); + 5 with ``softmax`` (max compare, subtract, exp, sum add,
    divide). 9 per channel sample: the blend of 4 corners (4 multiplies,
    3 adds), the weight multiply and the add into the sum over points.
    """
    points, samples, _, _ = _counts(params)
    return float((POINT_FLOPS + SOFTMAX_POINT_FLOPS * params["softmax"]) * points
                 + SAMPLE_FLOPS * samples)


def _backward_flops(params) -> float:
    """Backward flops: ``dcnv3``'s count per point and per channel sample
    (``harness.operators.dcnv3.core_backward_flops``): 18 per point (+ 4 with
    ``softmax``), 32 per channel sample."""
    points, samples, _, _ = _counts(params)
    return float((BACKWARD_POINT_FLOPS + BACKWARD_SOFTMAX_POINT_FLOPS * params["softmax"]) * points
                 + BACKWARD_SAMPLE_FLOPS * samples)


def _bytes(params, itemsize) -> float:
    """itemsize · (value + locations (2 per point) + weights + output): each once."""
    points, _, outputs, values = _counts(params)
    return float(itemsize * (values + 3 * points + outputs))


def _backward_bytes(params, itemsize) -> float:
    """itemsize · (value, locations, weights, grad_output read; their gradients written)."""
    points, _, outputs, values = _counts(params)
    return float(itemsize * (2 * (values + 3 * points) + outputs))


def sampling_view(params: Mapping[str, Any], arrays: Mapping[str, Any]) -> SamplingPicture:
    """Every level of one head side by side (a column of NaN between them, each at its
    own resolution), the points of one query on each; pixel x = loc_x·W_l − 0.5,
    y = loc_y·H_l − 0.5. A query has no regular grid: the grid marks are each level's
    centroid of the points, so the arrows show their spread."""
    shapes = arrays["spatial_shapes"].astype(np.int64).reshape(-1, 2)
    starts = arrays["level_start_index"].astype(np.int64)
    locations, weights = arrays["sampling_locations"], arrays["attention_weights"]
    query = locations.shape[1] // 2
    height = int(shapes[:, 0].max())
    levels, regular, deformed, labels, x_first = [], [], [], [], 0
    for level, ((h, w), start) in enumerate(zip(shapes.tolist(), starts.tolist(), strict=True)):
        level_map = np.full((height, w), np.nan)
        level_map[:h] = arrays["value"][0, start:start + h * w, 0].astype(np.float64).mean(-1).reshape(h, w)
        levels += [level_map, np.full((height, 1), np.nan)]
        points = locations[0, query, 0, level].astype(np.float64)  # [P, 2], x first
        at = np.stack([points[:, 1] * h - 0.5, points[:, 0] * w - 0.5 + x_first], axis=1)
        deformed.append(at)
        regular.append(np.repeat(at.mean(axis=0, keepdims=True), len(at), axis=0))
        labels += [f"level {level} ({h}x{w}), point {p}" for p in range(len(at))]
        x_first += w + 1
    weight = weights[0, query, 0].astype(np.float64).reshape(-1)
    if params["softmax"]:
        weight = np.exp(weight - weight.max()) / np.exp(weight - weight.max()).sum()
    return SamplingPicture(
        op=params["op"], case_id=params["case_id"],
        title=f"query {query} of batch element 0, head 0, on its {len(shapes)} levels",
        heat=np.concatenate(levels[:-1], axis=1), regular=np.concatenate(regular),
        deformed=np.concatenate(deformed), weight=weight, labels=labels,
    )


register_operator(Operator(
    name="ms_deform_attn",
    summary="Deformable DETR's multi-scale deformable attention (weights as given, or softmax fused)",
    params=PARAMS,
    tensors=(
        TensorSpec("value", "[N, S, M, D], S = Σ_l H_l·W_l"),
        TensorSpec("spatial_shapes", "[L, 2] int64", differentiable=False),
        TensorSpec("level_start_index", "[L] int64", differentiable=False),
        TensorSpec("sampling_locations", "[N, Lq, M, L, P, 2]"),
        TensorSpec("attention_weights", "[N, Lq, M, L, P]"),
    ),
    make_inputs=_make_inputs,
    flops=_flops,
    bytes=_bytes,
    # dcnv3's argument holds: ≤ L·P ≤ 40 bilinear samples per output, positions
    # loc·W − 0.5 rounded in float32 (≤ 2^-24·W pixels), half inputs exact.
    tolerances=CORE_TOLERANCES,
    backward_flops=_backward_flops,
    backward_bytes=_backward_bytes,
    input_modes=MODES,
    baseline="pytorch_gridsample",
    forward_only_modes=FORWARD_ONLY_MODES,
    validate=validate,
    id_keys={"spatial_shapes": "levels"},
    sampling_view=sampling_view,
))

TENSORS = ("value", "spatial_shapes", "level_start_index", "sampling_locations",
           "attention_weights")


def bound(function):
    """``prepare(inputs, params)`` calling ``function(*tensors, softmax=...)``."""
    def prepare(inputs, params):
        return functools.partial(function, *(inputs[name] for name in TENSORS), **_arguments(params))

    return prepare


@implementation("ms_deform_attn", "reference", kind="reference", dtypes=tuple(CORE_TOLERANCES))
@in_float64
def reference_ms_deform_attn(inputs, params):
    """kernels.reference.ms_deform_attn: plain PyTorch from the contract, in float64."""
    return bound(reference_ops.ms_deform_attn)(inputs, params)


@implementation("ms_deform_attn", "pytorch_gridsample", kind="peer", dtypes=KERNEL_DTYPES,
                known_inaccurate=GRIDSAMPLE_INACCURATE)
def gridsample_ms_deform_attn(inputs, params):
    """Deformable DETR's pure-PyTorch formulation (F.grid_sample per level), in the case's dtype."""
    return ms_deform_attn_gridsample.prepare_ms_deform_attn(
        *(inputs[name] for name in TENSORS), **_arguments(params))


@implementation("ms_deform_attn", "cupy_vectorized", kind="kernel", dtypes=(*KERNEL_DTYPES, "float64"),
                available=kernel_availability("kernels.ops.ms_deform_attn"), emulated_on=("cpu",))
def kernel_ms_deform_attn(inputs, params):
    """kernels.ops.ms_deform_attn: our CuPy kernels (CPU: the emulator); checked once, then unchecked."""
    ops = importlib.import_module("kernels.ops.ms_deform_attn")
    return ops.prepare(*(inputs[name] for name in TENSORS), **_arguments(params))

