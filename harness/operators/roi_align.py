"""``roi_align``: the RoI pooling baseline, and what the RoI pooling family shares.

Contract: ``docs/ops-semantics.md``, "RoI pooling, NCHW" (sampling rules B1
and B2) and "Case parameters". ``roi_align`` is
``torchvision.ops.roi_align`` with its ``aligned`` parameter (default true,
then = ``deform_roi_pool`` with no offset); its baseline is torchvision.
``sampling_ratio`` <= 0 is the adaptive grid in every RoI operator. K = 0
(no RoIs) and C = 0 are valid cases: an empty output, zero gradients. ``harness.operators.deform_roi_pool`` and
``harness.operators.deform_psroi_pool`` build on the RoI generator, the
sample-margin enforcement, the tolerances and the kernel availability here.
The full write-up (modes, counts, tolerances, peers): ``docs/operators/roi_pool.md``.

RoIs: ``rois`` [K, 5] = (batch_index, x1, y1, x2, y2) in image coordinates,
image = feature map / spatial_scale (H/spatial_scale × W/spatial_scale);
batch index k mod N (every image, the last included, has RoIs when K >= N;
with 0 < K < N the last RoI is put on the last image). Float in the case's dtype,
not differentiable.

RoI modes (``draw_rois``):

- ``random``: sides log-uniform between one feature pixel (1/spatial_scale)
  and the image side minus one pixel, placed wholly inside the image
  (x1 >= 0, x2 <= image_w - 1).
- ``rois_outside``: RoI k mod 3 = 0 as in ``random``; = 1 straddles the left
  or right (and independently the top or bottom) edge: a random 10-90 % of
  its side outside; = 2 lies wholly outside, past one edge by up to an image
  side (its samples are 0 by B1, skipped by B2).
- ``degenerate_rois``: RoI k mod 3 = 0 has zero size (x1 = x2, y1 = y2);
  = 1 zero width or zero height (alternately); = 2 is sub-pixel (both sides
  below one feature pixel). Forward only: a zero-size RoI samples one point
  everywhere, which may be a pixel (a kink).

Sample margin (every mode but ``degenerate_rois``): after rounding to the
dtype, each sample position (float64, from the reference's geometry) is kept
``KINK_MARGIN`` away from the points where the function jumps or kinks: for
B1 the integers (jumps at -1 and H, kinks at 0, H-1 and between pixels), for
B2 the multiples of 0.5 (jumps at -0.5 and H-0.5, kinks at the integers).
Positions that move with a differentiable input (offset, trans) are checked
against all of them and the offending bin's offset (trans cell) is redrawn;
positions set by the RoI alone (``roi_align``, ``no_trans``) only against the
jumps (the input gradient is continuous elsewhere) and the RoI is redrawn.
Implementations compute positions in float32 (error < 2^-24·|y|, below
2^-14 for maps up to 1024), so none crosses a jump or kink the reference
does not.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

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
from kernels.peers import torchvision_ops
from kernels.reference import roi_align as roi_align_reference
from kernels.reference.deform_roi_pool import grid_groups, sample_positions

ROI_PARAMS: dict[str, Any] = {
    "N": 2,
    "C": 8,
    "H": 12,
    "W": 16,
    "K": 8,
    "pooled_h": 3,
    "pooled_w": 3,
    "spatial_scale": 0.25,
    "sampling_ratio": 2,
}

ROI_MODES = ("random", "rois_outside", "degenerate_rois")
FORWARD_ONLY_MODES = ("degenerate_rois",)
KINK_MARGIN = 2.0**-10
MAX_REDRAWS = 200

ROI_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(
        rel_l2=1e-12, max_abs=1e-11,
        why=("u = 2^-53. A bin sums grid_h·grid_w·4 ≤ 4·16² terms (~sqrt(n)·u ≈ 4e-15); positions "
             "|y| < 2^10 carry ≤ 2^-43 into the weights. 1e-12 leaves > 10x: two float64 "
             "implementations differ only by summation order."),
    ),
    "float32": Tolerance(
        rel_l2=1e-4, max_abs=2e-4,
        why=("u = 2^-24 ≈ 6e-8, float32 accumulation. Sums of n = grid_h·grid_w·4 ≤ 1024 terms "
             "err ~sqrt(n)·u ≈ 2e-6; sample positions computed in float32 (start + bin·index + "
             "offset·gamma·size) round by ≤ 2^-24·|y| ≈ 1e-5 for |y| < 168, which moves each "
             "bilinear weight by as much (≈1e-5 relative). rel_l2 1e-4 is 10x; max_abs (relative "
             "to max|ref|) 2e-4 covers the per-element tail."),
    ),
    "float16": Tolerance(
        rel_l2=4 * UNIT_ROUNDOFF["float16"], max_abs=8 * UNIT_ROUNDOFF["float16"],
        why=("u = 2^-11; float32 accumulation, output (and gradients) rounded once to half: "
             "~u/sqrt(3) in L2, ≤ u·max|ref| per element; the float32 sum adds ~1e-5. "
             "rel_l2 = 4u, max_abs = 8u (margins ≥ 4x)."),
    ),
    "bfloat16": Tolerance(
        rel_l2=4 * UNIT_ROUNDOFF["bfloat16"], max_abs=8 * UNIT_ROUNDOFF["bfloat16"],
        why="u = 2^-8; the float16 argument: rel_l2 = 4u, max_abs = 8u.",
    ),
}

# Flops per sample point (positions, fractions and the four corner weights) and per
# channel sample (4-corner blend, 7, plus the add into the bin's sum); derived in
# docs/operators/roi_pool.md.
POINT_FLOPS = 10
CHANNEL_SAMPLE_FLOPS = 8
# Backward per channel sample: 4 corner gradients (multiply, add) = 8; with moving
# positions also d/dy and d/dx of the blend (2 × 5) and their accumulation (4) = 14.
BACKWARD_INPUT_FLOPS = 8
BACKWARD_POSITION_FLOPS = 14


# --- RoIs -----------------------------------------------------------------------

def image_size(params: Mapping[str, Any]) -> tuple[float, float]:
    """(image_h, image_w): the feature map's extent in image coordinates."""
    return params["H"] / params["spatial_scale"], params["W"] / params["spatial_scale"]


def _log_uniform(generator, count, low, high):
    return torch.exp(draw_uniform(generator, (count,), math.log(low), math.log(max(high, low))))


def _axis_boxes(generator, count, image, pixel, mode):
    """(low, high) coordinates of ``count`` RoIs along one axis of length ``image``."""
    size = _log_uniform(generator, count, pixel, image - 1)
    low = draw_uniform(generator, (count,), 0.0, 1.0) * (image - 1 - size).clamp(min=0)
    kind = torch.arange(count) % 3
    if mode == "rois_outside":
        side = torch.rand(count, generator=generator) < 0.5  # left/top or right/bottom
        outside = draw_uniform(generator, (count,), 0.1, 0.9) * size
        straddle = torch.where(side, -outside, image - size + outside)
        beyond = draw_uniform(generator, (count,), 0.0, image) + 1.0
        away = torch.where(side, -size - beyond, image + beyond)
        low = torch.where(kind == 1, straddle, torch.where(kind == 2, away, low))
    elif mode == "degenerate_rois":
        sub_pixel = draw_uniform(generator, (count,), 0.0, pixel)
        size = torch.where(kind == 2, sub_pixel, torch.zeros(count, dtype=torch.float64))
    return low, low + size


def draw_rois(params: Mapping[str, Any], generator: torch.Generator, mode: str) -> torch.Tensor:
    """[K, 5] float64 RoIs by ``mode`` (see the module docstring)."""
    count, images = params["K"], params["N"]
    image_h, image_w = image_size(params)
    pixel = 1 / params["spatial_scale"]
    x1, x2 = _axis_boxes(generator, count, image_w, pixel, mode)
    y1, y2 = _axis_boxes(generator, count, image_h, pixel, mode)
    if mode == "degenerate_rois":  # RoI k mod 3 = 1: zero width or zero height, alternately
        kind = torch.arange(count) % 3
        tall = _log_uniform(generator, count, pixel, image_h - 1)
        wide = _log_uniform(generator, count, pixel, image_w - 1)
        alternate = (torch.arange(count) // 3) % 2 == 0
        y2 = torch.where((kind == 1) & alternate, y1 + tall, y2)
        x2 = torch.where((kind == 1) & ~alternate, x1 + wide, x2)
    batch = (torch.arange(count) % images).to(torch.float64)
    if count:
        batch[-1] = images - 1
    return torch.stack([batch, x1, y1, x2, y2], dim=1)


def near(positions: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Whether each position is within ``KINK_MARGIN`` of one of ``points`` ([...] bool)."""
    return ((positions[..., None] - points).abs() < KINK_MARGIN).any(dim=-1)


def near_grid(positions: torch.Tensor, spacing: float) -> torch.Tensor:
    """Whether each position is within ``KINK_MARGIN`` of a multiple of ``spacing``."""
    return (positions - (positions / spacing).round() * spacing).abs() < KINK_MARGIN


def redraw_until_clean(tensor: torch.Tensor, draw_fresh: Callable[[], torch.Tensor],
                       bad: Callable[[torch.Tensor], torch.Tensor], what: str) -> torch.Tensor:
    """Replace the entries ``bad(tensor)`` flags with fresh ones until none is flagged.

    ``bad`` returns a bool mask broadcastable to ``tensor``; ``draw_fresh`` a
    full tensor of new candidates (already rounded to the dtype).
    """
    for _ in range(MAX_REDRAWS):
        flagged = bad(tensor)
        if not bool(flagged.any()):
            return tensor
        tensor = torch.where(flagged, draw_fresh(), tensor)
    raise ValueError(f"could not draw {what} whose samples keep {KINK_MARGIN} away from the "
                     f"sampling rule's kinks in {MAX_REDRAWS} tries; the case's map is too small "
                     "for its RoIs")


def round_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` rounded to ``dtype`` and held in float64."""
    return values.to(dtype).to(torch.float64)


def b1_positions(rois, offset, params, gamma=0.0):
    """Every sample position of the RoIAlign-family ops: (y, x) lists per grid group,
    each with the indices of its RoIs (``kernels.reference.deform_roi_pool``)."""
    groups = []
    aligned = params.get("aligned", True)  # only roi_align has the parameter
    for grid, members in grid_groups(rois, params["pooled_h"], params["pooled_w"],
                                     params["spatial_scale"], params["sampling_ratio"], aligned):
        y, x = sample_positions(rois[members], None if offset is None else offset[members], grid,
                                params["pooled_h"], params["pooled_w"], params["spatial_scale"], gamma,
                                aligned)
        groups.append((members, y, x))
    return groups


def draw_clean_rois(params, generator, dtype, mode) -> torch.Tensor:
    """RoIs by ``mode``, rounded to ``dtype``; for ``roi_align`` (no offset) none has a
    sample within ``KINK_MARGIN`` of B1's jumps (-1 and H, -1 and W)."""
    rois = round_to(draw_rois(params, generator, mode), dtype)
    if mode in FORWARD_ONLY_MODES:
        return rois
    jumps_y = torch.tensor([-1.0, float(params["H"])], dtype=torch.float64)
    jumps_x = torch.tensor([-1.0, float(params["W"])], dtype=torch.float64)

    def bad(candidate):
        flagged = torch.zeros(candidate.shape[0], 1, dtype=torch.bool)
        for members, y, x in b1_positions(candidate, None, params):
            hit = near(y, jumps_y).flatten(1).any(1) | near(x, jumps_x).flatten(1).any(1)
            flagged[members, 0] = hit
        return flagged

    return redraw_until_clean(rois, lambda: round_to(draw_rois(params, generator, mode), dtype),
                              bad, "RoIs")


# --- counts -----------------------------------------------------------------------

def expected_grid(params: Mapping[str, Any], axis: str) -> float:
    """Mean samples per bin along ``axis`` ("h" or "w") for the ``random`` RoIs.

    ``sampling_ratio`` when it is > 0; otherwise E[ceil(roi_size / pooled)]
    with the RoI side log-uniform on [pixel, image − 1] (image coordinates),
    in closed form: the side is in (j−1, j]·pooled feature pixels with the
    probability of that interval.
    """
    if params["sampling_ratio"] > 0:
        return float(params["sampling_ratio"])
    scale, pooled = params["spatial_scale"], params[f"pooled_{axis}"]
    image = params["H" if axis == "h" else "W"] / scale
    low, high = math.log(1 / scale), math.log(max(image - 1, 1 / scale))
    if high == low:
        return float(math.ceil(1 / pooled))
    expected, j = 0.0, 1
    while (j - 1) * pooled / scale < math.exp(high):
        a = max(low, math.log((j - 1) * pooled / scale) if j > 1 else low)
        b = min(high, math.log(j * pooled / scale))
        if b > a:
            expected += j * (b - a) / (high - low)
        j += 1
    return expected


def b1_counts(params: Mapping[str, Any]) -> tuple[float, float, int]:
    """(sample points, channel samples, output elements) of a RoIAlign-family forward."""
    bins = params["K"] * params["pooled_h"] * params["pooled_w"]
    points = bins * expected_grid(params, "h") * expected_grid(params, "w")
    return points, points * params["C"], bins * params["C"]


# --- kernels ------------------------------------------------------------------------

def kernel_function(module: str, name: str) -> Callable[..., torch.Tensor]:
    """``kernels.ops.<module>.<name>``, imported on first use (it needs CuPy or the emulator)."""
    return getattr(importlib.import_module(f"kernels.ops.{module}"), name)


# --- roi_align ----------------------------------------------------------------------

# Case ids write the output bins as one token (harness.cases): "pooled7", "pooled7x5".
POOLED_ID_PAIRS = {"pooled_h": ("pooled_w", "pooled", False)}


def validate_roi_params(params: Mapping[str, Any]) -> None:
    """Reject a case no RoIAlign-family op can run, naming the parameter
    (K = 0 and C = 0 are cases: an empty output; sampling_ratio <= 0 is adaptive)."""
    for name, minimum in (("N", 1), ("C", 0), ("H", 1), ("W", 1), ("K", 0), ("pooled_h", 1),
                          ("pooled_w", 1)):
        if params[name] < minimum:
            raise ValueError(f"parameter {name!r} must be >= {minimum}, got {params[name]}")
    if not params["spatial_scale"] > 0:
        raise ValueError(f"parameter 'spatial_scale' must be > 0, got {params['spatial_scale']}")


def roi_arguments(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments every RoIAlign-family implementation takes, and
    ``aligned`` where the operator has it (roi_align)."""
    names = ("pooled_h", "pooled_w", "spatial_scale", "sampling_ratio", "aligned")
    return {name: params[name] for name in names if name in params}


def _make_inputs(params, dtype, device, generator, mode="random"):
    """``input`` [N, C, H, W] ~ N(0, 1), then ``rois`` by ``mode``."""
    check_mode("roi_align", mode, ROI_MODES)
    tensors = {"input": draw(generator, (params["N"], params["C"], params["H"], params["W"])),
               "rois": draw_clean_rois(params, generator, dtype, mode)}
    return to_case(tensors, dtype, device)


def _flops(params):
    points, samples, outputs = b1_counts(params)
    return POINT_FLOPS * points + CHANNEL_SAMPLE_FLOPS * samples + outputs  # + the divide


def roi_element_counts(params) -> dict[str, int]:
    p = params
    return {"input": p["N"] * p["C"] * p["H"] * p["W"], "rois": 5 * p["K"],
            "output": p["K"] * p["C"] * p["pooled_h"] * p["pooled_w"]}


def _bytes(params, itemsize):
    return float(itemsize * sum(roi_element_counts(params).values()))


def _backward_flops(params):
    points, samples, outputs = b1_counts(params)
    return POINT_FLOPS * points + BACKWARD_INPUT_FLOPS * samples + outputs


def _backward_bytes(params, itemsize):
    counts = roi_element_counts(params)
    return float(itemsize * (counts["rois"] + counts["output"] + counts["input"]))


# Our RoI kernels take float64 too (computed in float64, for gradcheck).
ROI_KERNEL_DTYPES = (*KERNEL_DTYPES, "float64")

ROI_TENSORS = {
    "input": TensorSpec("input", "[N, C, H, W]"),
    "rois": TensorSpec("rois", "[K, 5]", differentiable=False),
}

register_operator(
    Operator(
        name="roi_align",
        summary="RoIAlign (torchvision.ops.roi_align, aligned or not): the RoI pooling baseline",
        params={**ROI_PARAMS, "aligned": True},
        tensors=tuple(ROI_TENSORS.values()),
        make_inputs=_make_inputs,
        flops=_flops,
        bytes=_bytes,
        tolerances=ROI_TOLERANCES,
        backward_flops=_backward_flops,
        backward_bytes=_backward_bytes,
        input_modes=ROI_MODES,
        baseline="torchvision",
        forward_only_modes=FORWARD_ONLY_MODES,
        validate=validate_roi_params,
        id_pairs=POOLED_ID_PAIRS,
    )
)


def _bind(function, inputs, params):
    return functools.partial(function, inputs["input"], inputs["rois"], **roi_arguments(params))


@implementation("roi_align", "reference", kind="reference", dtypes=tuple(ROI_TOLERANCES))
@in_float64
def reference_roi_align(inputs, params):
    """kernels.reference.roi_align: plain PyTorch from the contract, in float64."""
    return _bind(roi_align_reference.roi_align, inputs, params)


# No bfloat16: torchvision's roi_align kernels (CPU and CUDA) dispatch floating types
# and half. Kind "peer" (it is also the baseline) so that float16 can be a known inaccuracy.
TORCHVISION_HALF = ("torchvision computes sample positions, weights and the bin sums in "
                    "float16, not float32 as the contract asks")


@implementation("roi_align", "torchvision", kind="peer", dtypes=("float32", "float16"),
                known_inaccurate={"float16": TORCHVISION_HALF})
def torchvision_roi_align(inputs, params):
    """torchvision.ops.roi_align, in the case's dtype."""
    return _bind(torchvision_ops.roi_align, inputs, params)


# Our kernels' designs (kernels.ops.deform_roi_pool.DESIGNS) by implementation name,
# shared with harness.operators.deform_roi_pool and deform_psroi_pool.
KERNEL_DESIGNS = {"cupy": "pw_fastest", "cupy_channels_fastest": "channels_fastest"}


def register_kernel_designs(op: str, module: str, function: str,
                            preparer: Callable[[str], Callable],
                            designs: dict[str, str] = KERNEL_DESIGNS) -> None:
    """One kernel implementation of ``op`` per design of ``designs`` (implementation
    name -> design; KERNEL_DESIGNS unless the op has more), each prepared by
    ``preparer(design)``: ``kernels.ops.<module>.<function>`` of that design."""
    for impl, design in designs.items():
        implementation(op, impl, kind="kernel", dtypes=ROI_KERNEL_DTYPES,
                       available=kernel_availability(f"kernels.ops.{module}"),
                       emulated_on=("cpu",),
                       description=f"kernels.ops.{module}.{function}(design={design!r}): our "
                                   "CuPy kernels (CPU: the emulator).")(preparer(design))


def _cupy_roi_align(design: str):
    def prepare_roi_align(inputs, params):
        prepare = kernel_function("deform_roi_pool", "prepare")
        return prepare(inputs["input"], inputs["rois"], None, None, **roi_arguments(params),
                       gamma=0.0, design=design)

    return prepare_roi_align


register_kernel_designs("roi_align", "deform_roi_pool", "roi_align", _cupy_roi_align)
