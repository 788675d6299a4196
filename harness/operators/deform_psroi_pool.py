"""``deform_psroi_pool``: R-FCN's deformable position-sensitive RoI pooling.

Contract: ``docs/ops-semantics.md``, "RoI pooling, NCHW" (the original
Deformable ConvNets semantics, sampling rule B2). The RoI generator, margins
and tolerances come from ``harness.operators.roi_align`` (see
``docs/operators/roi_pool.md``).

Tensors: ``input`` [N, output_dim·group_size², H, W], ``rois`` [K, 5] (not
differentiable), ``trans`` [K, 2·num_classes, part_size, part_size] (absent
with ``no_trans``). Input modes (``input`` ~ N(0, 1) in all):

- ``random``, ``rois_outside``, ``degenerate_rois``: RoIs as in
  ``harness.operators.roi_align``; trans U(-1, 1) (a bin moves by up to
  trans_std times the RoI size), redrawn cell by cell until no sample is
  within ``KINK_MARGIN`` of a multiple of 0.5 (B2's jumps at -0.5 and H-0.5,
  its kinks at the integers); with ``no_trans`` the RoIs are redrawn until no
  sample is that close to a jump. Not in ``degenerate_rois`` (forward only).
- ``far_offsets``: RoIs as in ``random``; half the trans cells get
  ±U(2, 3)·(H + W + roi size)/(trans_std·roi size) per axis, which move every
  sample they govern past -0.5 or H-0.5 (W-0.5): skipped, the bin is 0 (count
  0). Needs trans and trans_std != 0.

Counts, with S = K·output_dim·pooled_size²·sample_per_part² samples (each
reads one channel): forward 10 per sample (position and weights) + 8 (blend
and sum) + 1 per output element (the divide) + 4 per output element with
trans (trans·trans_std·roi size, 2 multiplies per axis). Backward: 10 + 8 per
sample (input gradient), + 14 per sample with trans (position gradients),
+ 1 per output element, + 4 per output element with trans.
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
    KERNEL_DESIGNS,
    POINT_FLOPS,
    ROI_MODES,
    ROI_TOLERANCES,
    draw_rois,
    kernel_function,
    near,
    near_grid,
    redraw_until_clean,
    register_kernel_designs,
    round_to,
)
from harness.registry import (
    Operator,
    TensorSpec,
    implementation,
    register_operator,
)
from harness.sampling import SamplingPicture, grid_points
from kernels.peers import torchvision_ops
from kernels.reference import deform_psroi_pool as reference_ops
from kernels.reference.deform_psroi_pool import MIN_ROI_SIZE, c_round, sample_positions

OP = "deform_psroi_pool"
PSROI_PARAMS: dict[str, Any] = {
    "N": 2,
    "H": 12,
    "W": 16,
    "K": 8,
    "output_dim": 4,
    "group_size": 3,
    "pooled_size": 3,
    "part_size": 3,
    "sample_per_part": 2,
    "trans_std": 0.1,
    "no_trans": False,
    "num_classes": 2,
    "spatial_scale": 0.25,
}
PSROI_MODES = (*ROI_MODES, "far_offsets")
TRANS_FLOPS = 4


def validate_psroi_params(params: Mapping[str, Any]) -> None:
    """Reject a case the operator cannot run, naming the parameter (K = 0 and
    output_dim = 0 are cases: an empty output)."""
    for name, minimum in (("N", 1), ("H", 1), ("W", 1), ("K", 0), ("output_dim", 0),
                          ("group_size", 1), ("pooled_size", 1), ("part_size", 0),
                          ("sample_per_part", 1), ("num_classes", 1)):
        if params[name] < minimum:
            raise ValueError(f"parameter {name!r} must be >= {minimum}, got {params[name]}")
    if not params["spatial_scale"] > 0:
        raise ValueError(f"parameter 'spatial_scale' must be > 0, got {params['spatial_scale']}")
    if not params["no_trans"] and params["output_dim"] % params["num_classes"]:
        raise ValueError(
            "parameter 'num_classes' must divide output_dim: expected output_dim % num_classes == 0, "
            f"got output_dim={params['output_dim']}, num_classes={params['num_classes']}")


def psroi_arguments(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of every implementation."""
    names = ("spatial_scale", "output_dim", "group_size", "pooled_size", "part_size",
             "sample_per_part", "trans_std", "no_trans")
    return {name: params[name] for name in names}


def _part_size(params) -> int:
    return params["part_size"] or params["pooled_size"]


def _positions(params, rois, trans):
    return sample_positions(rois, trans, spatial_scale=params["spatial_scale"],
                            pooled_size=params["pooled_size"], part_size=_part_size(params),
                            sample_per_part=params["sample_per_part"], trans_std=params["trans_std"],
                            num_classes=1 if trans is None else params["num_classes"])


def _rois_near_jumps(params, rois):
    """[K, 1] bool: RoIs (no trans) with a sample within KINK_MARGIN of -0.5 or H-0.5 (W-0.5)."""
    h, w = _positions(params, rois, None)
    jumps_h = torch.tensor([-0.5, params["H"] - 0.5], dtype=torch.float64)
    jumps_w = torch.tensor([-0.5, params["W"] - 0.5], dtype=torch.float64)
    return (near(h, jumps_h).flatten(1).any(1) | near(w, jumps_w).flatten(1).any(1))[:, None]


def _cells_near_kinks(params, rois, trans):
    """[K, 2·num_classes, part, part] bool: trans cells moving a sample within KINK_MARGIN
    of a multiple of 0.5."""
    h, w = _positions(params, rois, trans)  # [K, classes, P, P, S]
    bad_bins = near_grid(h, 0.5).any(-1) | near_grid(w, 0.5).any(-1)
    part, pooled = _part_size(params), params["pooled_size"]
    # cell_of[ph, part_h] = 1 where bin row ph reads trans row part_h (same for columns)
    cell_of = torch.nn.functional.one_hot(torch.arange(pooled) * part // pooled, part).double()
    cells = torch.einsum("kcab,ai,bj->kcij", bad_bins.double(), cell_of, cell_of)
    return (cells > 0).repeat_interleave(2, dim=1)


def _trans_draw(params, generator, rois, mode):
    """One draw of trans [K, 2·num_classes, part, part] (float64) for ``mode``."""
    part = _part_size(params)
    shape = (params["K"], params["num_classes"], 2, part, part)
    trans = draw_uniform(generator, shape, -1.0, 1.0)
    if mode == "far_offsets":
        if params["trans_std"] == 0:
            raise ValueError("input mode 'far_offsets' moves bins by trans_std·size·trans: "
                             "expected trans_std != 0, got trans_std=0")
        sizes = []
        for low, high in ((1, 3), (2, 4)):  # x then y: trans channel 0 moves x
            size = ((c_round(rois[:, high]) + 1 - c_round(rois[:, low])) * params["spatial_scale"])
            sizes.append(size.clamp(min=MIN_ROI_SIZE))
        size = torch.stack(sizes, dim=1)[:, None, :, None, None]
        reach = (params["H"] + params["W"] + size) / (abs(params["trans_std"]) * size)
        sign = torch.randint(2, shape, generator=generator, dtype=torch.float64) * 2 - 1
        distant = sign * draw_uniform(generator, shape, 2.0, 3.0) * reach
        far = (torch.rand(shape[0], shape[1], 1, part, part, generator=generator) < 0.5).expand(shape)
        trans = torch.where(far, distant, trans)
    return trans.reshape(params["K"], 2 * params["num_classes"], part, part)


def _make_inputs(params, dtype, device, generator, mode="random"):
    """input, rois (by ``mode``), trans (unless ``no_trans``), in that draw order."""
    check_mode(OP, mode, PSROI_MODES)
    p = params
    if mode == "far_offsets" and p["no_trans"]:
        raise ValueError("input mode 'far_offsets' moves bins with trans: expected no_trans=false, "
                         "got no_trans=true")
    channels = p["output_dim"] * p["group_size"] ** 2
    tensors = {"input": draw(generator, (p["N"], channels, p["H"], p["W"]))}
    roi_mode = "random" if mode == "far_offsets" else mode

    def fresh_rois():
        return round_to(draw_rois(params, generator, roi_mode), dtype)

    rois = fresh_rois()
    checked = mode not in FORWARD_ONLY_MODES
    if checked and p["no_trans"]:
        rois = redraw_until_clean(rois, fresh_rois, lambda r: _rois_near_jumps(params, r), "RoIs")
    tensors["rois"] = rois
    if not p["no_trans"]:
        def fresh_trans():
            return round_to(_trans_draw(params, generator, rois, mode), dtype)

        trans = fresh_trans()
        if checked:
            trans = redraw_until_clean(trans, fresh_trans,
                                       lambda t: _cells_near_kinks(params, rois, t), "trans")
        tensors["trans"] = trans
    return to_case(tensors, dtype, device)


def _samples(params) -> int:
    p = params
    return p["K"] * p["output_dim"] * p["pooled_size"] ** 2 * p["sample_per_part"] ** 2


def _outputs(params) -> int:
    return params["K"] * params["output_dim"] * params["pooled_size"] ** 2


def _element_counts(params) -> dict[str, int]:
    p = params
    part = _part_size(p)
    return {"input": p["N"] * p["output_dim"] * p["group_size"] ** 2 * p["H"] * p["W"],
            "rois": 5 * p["K"],
            "trans": 0 if p["no_trans"] else p["K"] * 2 * p["num_classes"] * part * part,
            "output": _outputs(p)}


def _flops(params):
    trans = 0 if params["no_trans"] else TRANS_FLOPS
    return ((POINT_FLOPS + CHANNEL_SAMPLE_FLOPS) * _samples(params)
            + (1 + trans) * _outputs(params))


def _bytes(params, itemsize):
    return float(itemsize * sum(_element_counts(params).values()))


def _backward_flops(params):
    trans = 0 if params["no_trans"] else TRANS_FLOPS
    position = 0 if params["no_trans"] else BACKWARD_POSITION_FLOPS
    return ((POINT_FLOPS + BACKWARD_INPUT_FLOPS + position) * _samples(params)
            + (1 + trans) * _outputs(params))


def _backward_bytes(params, itemsize):
    counts = _element_counts(params)
    differentiable = counts["input"] + counts["trans"]
    return float(itemsize * (differentiable + counts["rois"] + counts["output"] + differentiable))


# --- the sampling view (reports' sampling page) ---------------------------

def sampling_view(params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> SamplingPicture:
    """Deformable PS RoI pooling (R-FCN): the samples of RoI 0's centre bin for output
    channel 0 (class 0), moved by trans·trans_std·roi size, over the position-sensitive
    input channel that bin reads."""
    import torch

    from kernels.reference.deform_psroi_pool import sample_positions

    pooled, samples = params["pooled_size"], params["sample_per_part"]
    group_size = params["group_size"]
    part_size = params["part_size"] or pooled
    b = pooled // 2
    rois = torch.from_numpy(arrays["rois"][:1].astype(np.float64))
    trans = None if params["no_trans"] else torch.from_numpy(arrays["trans"][:1].astype(np.float64))
    geometry = dict(spatial_scale=params["spatial_scale"], pooled_size=pooled,
                    part_size=part_size, sample_per_part=samples,
                    trans_std=params["trans_std"], num_classes=params["num_classes"])
    h, w = sample_positions(rois, trans, **geometry)
    base_h, base_w = sample_positions(rois, None, **geometry)
    cell = min(b * group_size // pooled, group_size - 1)  # gh = gw for the centre bin
    channel = cell * group_size + cell  # (ctop·group_size + gh)·group_size + gw, ctop = 0
    return SamplingPicture(
        op=params["op"], case_id=params["case_id"],
        title=f"bin (ph={b}, pw={b}) of RoI 0, output channel 0 (input channel {channel})",
        heat=arrays["input"][int(arrays["rois"][0, 0]), channel].astype(np.float64),
        regular=grid_points(base_h[0, 0, b, b].numpy(), base_w[0, 0, b, b].numpy()),
        deformed=grid_points(h[0, 0, b, b].numpy(), w[0, 0, b, b].numpy()),
        weight=None,
        labels=[f"sample (ih={s // samples}, iw={s % samples})" for s in range(samples**2)],
    )


register_operator(
    Operator(
        name=OP,
        summary="Deformable position-sensitive RoI pooling (R-FCN, Deformable ConvNets), NCHW",
        params=PSROI_PARAMS,
        tensors=(
            TensorSpec("input", "[N, output_dim·group_size², H, W]"),
            TensorSpec("rois", "[K, 5]", differentiable=False),
            TensorSpec("trans", "[K, 2·num_classes, part_size, part_size]", optional=True),
        ),
        make_inputs=_make_inputs,
        flops=_flops,
        bytes=_bytes,
        tolerances=ROI_TOLERANCES,
        backward_flops=_backward_flops,
        backward_bytes=_backward_bytes,
        input_modes=PSROI_MODES,
        # torchvision's ps_roi_align computes this operator on a subset only
        # (no_trans, group_size == pooled_size, samples inside the map): there the
        # speedups are over it; elsewhere no peer computes it and there are none.
        baseline="torchvision",
        forward_only_modes=FORWARD_ONLY_MODES,
        validate=validate_psroi_params,
        sampling_view=sampling_view,
    )
)


def _bind(function, inputs, params):
    return functools.partial(function, inputs["input"], inputs["rois"], inputs.get("trans"),
                             **psroi_arguments(params))


@implementation(OP, "reference", kind="reference", dtypes=tuple(ROI_TOLERANCES))
@in_float64
def reference_deform_psroi_pool(inputs, params):
    """kernels.reference.deform_psroi_pool: plain PyTorch from the contract, in float64."""
    return _bind(reference_ops.deform_psroi_pool, inputs, params)


@implementation(OP, "torchvision", kind="peer", dtypes=("float32",))
def torchvision_deform_psroi_pool(inputs, params):
    """torchvision.ops.ps_roi_align on moved RoIs: only no_trans, group_size == pooled_size, samples inside."""
    return torchvision_ops.prepare_deform_psroi_pool(
        inputs["input"], inputs["rois"], inputs.get("trans"), **psroi_arguments(params))


def _cupy_deform_psroi_pool(design: str):
    def prepare_kernel(inputs, params):
        # prepare checks once (RoI and trans values included); the call never synchronises.
        prepare = kernel_function("deform_psroi_pool", "prepare")
        return prepare(inputs["input"], inputs["rois"], inputs.get("trans"),
                       **psroi_arguments(params), design=design)

    return prepare_kernel


# KERNEL_DESIGNS and the design only this op has (kernels.ops.deform_psroi_pool.DESIGNS).
PSROI_KERNEL_DESIGNS = {**KERNEL_DESIGNS, "cupy_samples_fastest": "samples_fastest"}
register_kernel_designs(OP, "deform_psroi_pool", "deform_psroi_pool", _cupy_deform_psroi_pool,
                        PSROI_KERNEL_DESIGNS)

