"""``deform_roi_pool`` (DCNv1) and ``modulated_deform_roi_pool`` (DCNv2).

Contract: ``docs/ops-semantics.md``, "RoI pooling, NCHW" (mmcv semantics,
sampling rule B1). Parameters are ``roi_align``'s plus ``gamma``; the RoI
generator, margins, tolerances and counts come from
``harness.operators.roi_align`` (see ``docs/operators/roi_pool.md``).

Tensors: ``input`` [N, C, H, W], ``rois`` [K, 5] (not differentiable),
``offset`` [K, 2, pooled_h, pooled_w], ``mask`` [K, 1, pooled_h, pooled_w]
(DCNv2 only). Input modes (``input`` ~ N(0, 1) in all; DCNv2 masks
sigmoid(N(0, 1))):

- ``random``, ``rois_outside``, ``degenerate_rois``: RoIs as in
  ``harness.operators.roi_align``; offsets U(-1, 1) (a bin moves by up to
  gamma times the RoI size), redrawn bin by bin until no sample is within
  ``KINK_MARGIN`` of an integer (B1's jumps and kinks) -- except in
  ``degenerate_rois`` (forward only).
- ``far_offsets``: RoIs as in ``random``; half the bins get offsets of
  ±U(2, 3)·(H + W + roi size)/(gamma·roi size) per axis, which move every
  sample of the bin past -1 or H (W): the bin is 0 and has no offset
  gradient; the other half as in ``random``. Needs gamma != 0.

Counts: ``roi_align``'s (10 flops per sample point, 8 per channel sample, 1
per output element) plus 4 per bin for the offset shift (gamma·size·offset,
2 multiplies per axis) and, for DCNv2, 1 per output element (the mask).
Backward: per channel sample 8 (input) + 14 (position gradients), per sample
point 10 (recomputed), per output element 1 (the divide) + 2 for DCNv2
(grad·mask, grad_mask), per bin 8 (the shift recomputed, 4, and gamma·size
times the two position sums, 4).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from harness.operators.inputs import check_mode, draw, draw_uniform, in_float64, to_case
from harness.operators.roi_align import (
    BACKWARD_INPUT_FLOPS,
    BACKWARD_POSITION_FLOPS,
    CHANNEL_SAMPLE_FLOPS,
    FORWARD_ONLY_MODES,
    POINT_FLOPS,
    POOLED_ID_PAIRS,
    ROI_MODES,
    ROI_PARAMS,
    ROI_TENSORS,
    ROI_TOLERANCES,
    b1_counts,
    b1_positions,
    draw_clean_rois,
    kernel_function,
    near_grid,
    redraw_until_clean,
    register_kernel_designs,
    roi_arguments,
    roi_element_counts,
    round_to,
    torchvision_roi_align,
    validate_roi_params,
)
from harness.registry import (
    Operator,
    TensorSpec,
    implementation,
    register_operator,
)
from harness.sampling import SamplingPicture, grid_points
from kernels.reference import deform_roi_pool as reference_ops
from kernels.reference.deform_roi_pool import roi_boxes

DEFORM_ROI_PARAMS: dict[str, Any] = {**ROI_PARAMS, "gamma": 0.1}
DEFORM_ROI_MODES = (*ROI_MODES, "far_offsets")
SHIFT_FLOPS = 4  # per bin: gamma·size·offset along both axes
MASK_FLOPS = 1
BACKWARD_MASK_FLOPS = 2


def _offset_draw(params, generator, rois, mode):
    """One draw of offsets [K, 2, pooled_h, pooled_w] (float64) for ``mode``."""
    shape = (params["K"], 2, params["pooled_h"], params["pooled_w"])
    offset = draw_uniform(generator, shape, -1.0, 1.0)
    if mode != "far_offsets":
        return offset
    if params["gamma"] == 0:
        raise ValueError("input mode 'far_offsets' moves bins by gamma·size·offset: expected "
                         "gamma != 0, got gamma=0")
    _, _, roi_h, roi_w = roi_boxes(rois, params["spatial_scale"])
    size = torch.stack([roi_w, roi_h], dim=1).clamp(min=1e-3)[:, :, None, None]  # channel 0: x
    reach = (params["H"] + params["W"] + size) / (abs(params["gamma"]) * size)
    sign = torch.randint(2, shape, generator=generator, dtype=torch.float64) * 2 - 1
    distant = sign * draw_uniform(generator, shape, 2.0, 3.0) * reach
    far = (torch.rand(shape[0], 1, *shape[2:], generator=generator) < 0.5).expand(shape)
    return torch.where(far, distant, offset)


def _bins_near_kinks(params, rois, offset):
    """[K, 1, pooled_h, pooled_w] bool: bins with a sample within KINK_MARGIN of an integer."""
    flagged = torch.zeros(offset.shape[0], 1, *offset.shape[2:], dtype=torch.bool)
    for members, y, x in b1_positions(rois, offset, params, params["gamma"]):
        flagged[members, 0] = near_grid(y, 1.0).any(-1) | near_grid(x, 1.0).any(-1)
    return flagged


def _input_maker(op: str, modulated: bool):
    def make_inputs(params, dtype, device, generator, mode="random"):
        """input, rois, offset (by ``mode``), mask (DCNv2), in that draw order."""
        check_mode(op, mode, DEFORM_ROI_MODES)
        p = params
        roi_mode = "random" if mode == "far_offsets" else mode
        tensors = {"input": draw(generator, (p["N"], p["C"], p["H"], p["W"])),
                   "rois": draw_clean_rois(params, generator, dtype, roi_mode)}
        rois = tensors["rois"]

        def fresh():
            return round_to(_offset_draw(params, generator, rois, mode), dtype)

        offset = fresh()
        if mode not in FORWARD_ONLY_MODES:
            offset = redraw_until_clean(offset, fresh,
                                        lambda o: _bins_near_kinks(params, rois, o), "offsets")
        tensors["offset"] = offset
        if modulated:
            tensors["mask"] = torch.sigmoid(draw(generator, (p["K"], 1, p["pooled_h"], p["pooled_w"])))
        return to_case(tensors, dtype, device)

    return make_inputs


def _counters(modulated: bool):
    mask = MASK_FLOPS if modulated else 0
    backward_mask = BACKWARD_MASK_FLOPS if modulated else 0

    def element_counts(params):
        counts = roi_element_counts(params)
        bins = params["K"] * params["pooled_h"] * params["pooled_w"]
        counts["offset"] = 2 * bins
        counts["mask"] = bins if modulated else 0
        return counts

    def flops(params):
        points, samples, outputs = b1_counts(params)
        bins = params["K"] * params["pooled_h"] * params["pooled_w"]
        return (POINT_FLOPS * points + CHANNEL_SAMPLE_FLOPS * samples + (1 + mask) * outputs
                + SHIFT_FLOPS * bins)

    def bytes_(params, itemsize):
        return float(itemsize * sum(element_counts(params).values()))

    def backward_flops(params):
        points, samples, outputs = b1_counts(params)
        bins = params["K"] * params["pooled_h"] * params["pooled_w"]
        return (POINT_FLOPS * points + (BACKWARD_INPUT_FLOPS + BACKWARD_POSITION_FLOPS) * samples
                + (1 + backward_mask) * outputs + 2 * SHIFT_FLOPS * bins)

    def backward_bytes(params, itemsize):
        counts = element_counts(params)
        differentiable = counts["input"] + counts["offset"] + counts["mask"]
        read = differentiable + counts["rois"] + counts["output"]  # grad_output: the output's shape
        return float(itemsize * (read + differentiable))

    return flops, bytes_, backward_flops, backward_bytes


def _prepare(load_function, modulated: bool, doc: str):
    """An implementation's prepare: ``load_function()(input, rois, offset[, mask], **params)``
    with its arguments bound."""

    def prepare(inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]):
        tensors = [inputs["input"], inputs["rois"], inputs["offset"]]
        if modulated:
            tensors.append(inputs["mask"])
        return functools.partial(load_function(), *tensors, **roi_arguments(params),
                                 gamma=params["gamma"])

    prepare.__doc__ = doc
    return prepare


def kernel_preparer(design: str):
    """kernels.ops.deform_roi_pool.prepare of ``design``: checked once (RoI values
    included), then the unchecked operator, which never synchronises."""

    def prepare_kernel(inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any]):
        prepare = kernel_function("deform_roi_pool", "prepare")
        return prepare(inputs["input"], inputs["rois"], inputs.get("offset"), inputs.get("mask"),
                       **roi_arguments(params), gamma=params.get("gamma", 0.0), design=design)

    return prepare_kernel


# --- the sampling view (reports' sampling page) ---------------------------

def sampling_view(params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> SamplingPicture:
    """DCNv1/DCNv2 RoI pooling (mmcv semantics): the sample grid of RoI 0's centre bin,
    moved as a whole by gamma·roi size·offset (channel 0 moves x, channel 1 moves y)."""
    import torch

    from kernels.reference.deform_roi_pool import roi_boxes, sample_positions, sampling_grid

    pooled_h, pooled_w = params["pooled_h"], params["pooled_w"]
    ph, pw = pooled_h // 2, pooled_w // 2
    rois = torch.from_numpy(arrays["rois"][:1].astype(np.float64))
    offset = torch.from_numpy(arrays["offset"][:1].astype(np.float64))
    _, _, roi_h, roi_w = roi_boxes(rois, params["spatial_scale"])
    grid_h, grid_w = sampling_grid(roi_h, roi_w, pooled_h, pooled_w, params["sampling_ratio"])
    grid = (int(grid_h[0]), int(grid_w[0]))
    geometry = (pooled_h, pooled_w, params["spatial_scale"], params["gamma"])
    y, x = sample_positions(rois, offset, grid, *geometry)
    base_y, base_x = sample_positions(rois, None, grid, *geometry)
    count = grid[0] * grid[1]
    mask = arrays.get("mask")
    return SamplingPicture(
        op=params["op"], case_id=params["case_id"],
        title=f"bin (ph={ph}, pw={pw}) of RoI 0 ({grid[0]}×{grid[1]} samples)",
        heat=arrays["input"][int(arrays["rois"][0, 0])].astype(np.float64).mean(axis=0),
        regular=grid_points(base_y[0, ph, pw].numpy(), base_x[0, ph, pw].numpy()),
        deformed=grid_points(y[0, ph, pw].numpy(), x[0, ph, pw].numpy()),
        weight=None if mask is None else np.full(count, float(mask[0, 0, ph, pw])),
        labels=[f"sample (iy={s // grid[1]}, ix={s % grid[1]})" for s in range(count)],
    )


# Operator name -> (whether it takes a mask, summary).
DEFORM_ROI_OPERATORS = {
    "deform_roi_pool": (False, "Deformable RoI pooling DCNv1 (mmcv deform_roi_pool), NCHW"),
    "modulated_deform_roi_pool": (True, "Modulated deformable RoI pooling DCNv2 (mmcv), NCHW"),
}

for _name, (_modulated, _summary) in DEFORM_ROI_OPERATORS.items():
    _flops, _bytes, _backward_flops, _backward_bytes = _counters(_modulated)
    _tensors = [*ROI_TENSORS.values(), TensorSpec("offset", "[K, 2, pooled_h, pooled_w]")]
    if _modulated:
        _tensors.append(TensorSpec("mask", "[K, 1, pooled_h, pooled_w]"))
    register_operator(
        Operator(
            name=_name,
            summary=_summary,
            params=DEFORM_ROI_PARAMS,
            tensors=tuple(_tensors),
            make_inputs=_input_maker(_name, _modulated),
            flops=_flops,
            bytes=_bytes,
            tolerances=ROI_TOLERANCES,
            backward_flops=_backward_flops,
            backward_bytes=_backward_bytes,
            input_modes=DEFORM_ROI_MODES,
            # No peer computes this operator (mmcv is not a dependency): speedups are
            # over torchvision's roi_align on the same input and RoIs, what a user
            # pays for the deformation over plain RoIAlign.
            baseline="torchvision_roi_align",
            forward_only_modes=FORWARD_ONLY_MODES,
            validate=validate_roi_params,
            id_pairs=POOLED_ID_PAIRS,
            sampling_view=sampling_view,
        )
    )
    implementation(_name, "reference", kind="reference", dtypes=tuple(ROI_TOLERANCES))(in_float64(
        _prepare(lambda _op=_name: getattr(reference_ops, _op), _modulated,
                 f"kernels.reference.deform_roi_pool.{_name}: plain PyTorch from the contract, in float64.")))
    # float32 only: a baseline cannot be known-inaccurate, and torchvision's half is.
    implementation(_name, "torchvision_roi_align", kind="baseline", dtypes=("float32",),
                   judged_as="roi_align",
                   description="torchvision.ops.roi_align(aligned=True) on the same input and "
                               "RoIs, offsets (and mask) left out: the baseline, judged as "
                               "roi_align")(torchvision_roi_align)
    register_kernel_designs(_name, "deform_roi_pool", _name, kernel_preparer)
