"""The sampling view: where one output location of a deformable operator samples its input.

Each deformable operator has a small adapter that reads a saved case (the
``.npz`` of ``dcnbench case … --save``: ``params`` plus the tensors by their
contract names) and returns a :class:`SamplingPicture`: a heat map of the
input the output location reads, the regular (undeformed) sample grid and the
deformed sample points, with each point's modulation weight where the
operator has one. Adapters use the reference's own geometry code, so the
picture follows the contract (``docs/ops-semantics.md``) exactly.

Adding an operator = one function registered in ``ADAPTERS``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class SamplingPicture:
    op: str
    case_id: str
    title: str  # which output location, batch element and group
    heat: np.ndarray  # [H, W]: the input the location reads (mean over its channels)
    regular: np.ndarray  # [P, 2]: (y, x) of each tap without offsets
    deformed: np.ndarray  # [P, 2]: (y, x) of each tap with the case's offsets
    weight: np.ndarray | None  # [P]: each tap's modulation (mask), None without one
    labels: list[str]  # one per tap


def _conv_picture(params: dict[str, Any], arrays: dict[str, np.ndarray]) -> SamplingPicture:
    """DCNv1/DCNv2 (NCHW): tap k = i·kw + j; offset channel 2·(g·kh·kw + k) is dy, +1 dx."""
    import torch

    from kernels.reference.deform_conv2d import base_coordinates, sample_coordinates

    kernel = (params["kernel_h"], params["kernel_w"])
    stride = (params["stride_h"], params["stride_w"])
    padding = (params["pad_h"], params["pad_w"])
    dilation = (params["dilation_h"], params["dilation_w"])
    offset = torch.from_numpy(arrays["offset"].astype(np.float64))
    _, _, out_h, out_w = offset.shape
    ho, wo = out_h // 2, out_w // 2
    y, x = sample_coordinates(offset, kernel, stride, padding, dilation, params["offset_groups"])
    base_y, base_x = base_coordinates((out_h, out_w), kernel, stride, padding, dilation,
                                      dtype=torch.float64, device="cpu")
    group_channels = params["C_in"] // params["offset_groups"]
    heat = arrays["input"][0, :group_channels].astype(np.float64).mean(axis=0)
    mask = arrays.get("mask")
    taps = kernel[0] * kernel[1]
    return SamplingPicture(
        op=params["op"], case_id=params["case_id"],
        title=f"output (ho={ho}, wo={wo}) of batch element 0, offset group 0",
        heat=heat,
        regular=np.stack([base_y[:, ho, wo].numpy(), base_x[:, ho, wo].numpy()], axis=1),
        deformed=np.stack([y[0, 0, :, ho, wo].numpy(), x[0, 0, :, ho, wo].numpy()], axis=1),
        weight=None if mask is None else mask[0, :taps, ho, wo].astype(np.float64),
        labels=[f"tap {k} (i={k // kernel[1]}, j={k % kernel[1]})" for k in range(taps)],
    )


def _dcnv3_picture(params: dict[str, Any], arrays: dict[str, np.ndarray]) -> SamplingPicture:
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


def _points(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """[len(ys)·len(xs), 2]: every (y, x) of a bin's sample grid, rows outer."""
    grid_y, grid_x = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([grid_y.ravel(), grid_x.ravel()], axis=1)


def _roi_pool_picture(params: dict[str, Any], arrays: dict[str, np.ndarray]) -> SamplingPicture:
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
        regular=_points(base_y[0, ph, pw].numpy(), base_x[0, ph, pw].numpy()),
        deformed=_points(y[0, ph, pw].numpy(), x[0, ph, pw].numpy()),
        weight=None if mask is None else np.full(count, float(mask[0, 0, ph, pw])),
        labels=[f"sample (iy={s // grid[1]}, ix={s % grid[1]})" for s in range(count)],
    )


def _psroi_pool_picture(params: dict[str, Any], arrays: dict[str, np.ndarray]) -> SamplingPicture:
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
        regular=_points(base_h[0, 0, b, b].numpy(), base_w[0, 0, b, b].numpy()),
        deformed=_points(h[0, 0, b, b].numpy(), w[0, 0, b, b].numpy()),
        weight=None,
        labels=[f"sample (ih={s // samples}, iw={s % samples})" for s in range(samples**2)],
    )


def _msda_picture(params: dict[str, Any], arrays: dict[str, np.ndarray]) -> SamplingPicture:
    """Multi-scale deformable attention: every level of one head side by side (a column of
    NaN between them, each at its own resolution), the points of one query on each; pixel
    x = loc_x·W_l − 0.5, y = loc_y·H_l − 0.5. A query has no regular grid: the grid marks
    are each level's centroid of the points, so the arrows show their spread."""
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


ADAPTERS: dict[str, Callable[[dict[str, Any], dict[str, np.ndarray]], SamplingPicture]] = {
    "deform_conv2d": _conv_picture,
    "modulated_deform_conv2d": _conv_picture,
    "dcnv3": _dcnv3_picture,
    "dcnv4": _dcnv3_picture,
    "deform_roi_pool": _roi_pool_picture,
    "modulated_deform_roi_pool": _roi_pool_picture,
    "deform_psroi_pool": _psroi_pool_picture,
    "ms_deform_attn": _msda_picture,
}


def picture(path: Path) -> SamplingPicture:
    """The sampling picture of a saved case; ``ValueError`` for an operator without an
    adapter."""
    from harness import casefile

    params, arrays = casefile.load(Path(path))
    adapter = ADAPTERS.get(params["op"])
    if adapter is None:
        raise ValueError(f"{path}: no sampling view for operator {params['op']!r}; "
                         f"expected one of: {', '.join(ADAPTERS)}")
    return adapter(params, arrays)


def save_case(op: str, params: dict[str, Any], dtype: str, mode: str, seed: int,
              path: Path) -> Path:
    """Run ``op``'s reference on one case on the CPU and save it as ``dcnbench case
    --save`` would (the same inputs as the run that holds the case)."""
    from harness import casefile, execution, registry
    from harness.cases import make_case

    operator = registry.get_operator(op)
    # Parameters read back from a results table may have become floats (a column with
    # gaps): give each the type of its default.
    typed = {name: type(operator.params[name])(value) for name, value in params.items()}
    case = make_case(operator, typed, dtype, mode)
    case_run = execution.prepare(case, "cpu", seed, backward=False)
    row, tensors = execution.run(case_run, registry.reference_of(op), "forward", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    casefile.save(path, case_run, row.impl, tensors, row.status)
    return path
