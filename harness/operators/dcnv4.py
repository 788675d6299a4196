"""``dcnv4``: DCNv4's operator, ``dcnv3``'s geometry with a fused ``offset_mask``.

Contract: ``docs/ops-semantics.md``, "DCNv3 and DCNv4, channels-last". The
parameters, input modes, counts and tolerances are ``dcnv3``'s
(``harness.operators.dcnv3``) without ``softmax``: the mask is used as given.

Tensors: ``input`` [N, H, W, group·group_channels] and ``offset_mask``
[N, H_out, W_out, M], M = ceil(group·P·3 / 8)·8: group g holds (dx, dy) of
tap p at g·3P + 2p and + 1, then the mask of tap p at g·3P + 2P + p. The
generator packs ``dcnv3``'s offsets and mask so, and fills the padding
columns with ``PADDING_GARBAGE``: an implementation that reads them is off by
thousands, and their gradient must come back exactly 0.
"""

from __future__ import annotations

import torch

from harness.operators.conv2d import GEOMETRY_ID_PAIRS
from harness.operators.dcnv3 import (
    CORE_MODES,
    CORE_PARAMS,
    CORE_TOLERANCES,
    FORWARD_ONLY_MODES,
    core_arguments,
    core_backward_bytes,
    core_backward_flops,
    core_bytes,
    core_flops,
    draw_offset_and_mask,
    register_core_implementations,
    sampling_view,
    validate_core_params,
)
from harness.operators.inputs import check_mode, draw, to_case
from harness.registry import Operator, TensorSpec, register_operator
from kernels.reference.dcnv3 import Geometry, offset_mask_channels

# Finite (NaN would poison sums an implementation must not compute anyway) and
# exact in every dtype; the operator's values are O(1), so reading it shows.
PADDING_GARBAGE = 1e4


def _make_inputs(params, dtype, device, generator, mode="random"):
    """input, then offset and mask drawn as ``dcnv3``'s (no softmax) and packed."""
    check_mode("dcnv4", mode, CORE_MODES)
    p = params
    input = draw(generator, (p["N"], p["H"], p["W"], p["group"] * p["group_channels"]))
    offset, mask = draw_offset_and_mask(params, generator, dtype, mode, softmax=False)
    batch, out_h, out_w, groups, taps, _ = offset.shape
    packed = torch.cat((offset.flatten(4), mask), dim=-1).flatten(3)  # [.., G·3P]
    padding = offset_mask_channels(groups, taps) - packed.shape[-1]
    garbage = torch.full((batch, out_h, out_w, padding), PADDING_GARBAGE, dtype=torch.float64)
    return to_case({"input": input, "offset_mask": torch.cat((packed, garbage), dim=-1)}, dtype, device)


def _bytes(params, itemsize):
    """``dcnv3``'s count (input + offset + mask + output) plus the padding columns read."""
    return core_bytes(params, itemsize) + itemsize * _padding_elements(params)


def _backward_bytes(params, itemsize):
    """``dcnv3``'s count plus the padding columns read and their zero gradient written."""
    return core_backward_bytes(params, itemsize) + 2 * itemsize * _padding_elements(params)


def _padding_elements(params) -> int:
    geometry = Geometry.from_params(params)
    out_h, out_w = geometry.output_size(params["H"], params["W"])
    columns = offset_mask_channels(params["group"], geometry.taps) - 3 * params["group"] * geometry.taps
    return params["N"] * out_h * out_w * columns


register_operator(Operator(
    name="dcnv4",
    summary="DCNv4's operator, channels-last: dcnv3's geometry, fused offset_mask, no softmax",
    params=CORE_PARAMS,
    tensors=(
        TensorSpec("input", "[N, H, W, group·group_channels]"),
        TensorSpec("offset_mask", "[N, H_out, W_out, ceil(group·P·3/8)·8]"),
    ),
    make_inputs=_make_inputs,
    flops=lambda p: core_flops(p, softmax=False),
    bytes=_bytes,
    tolerances=CORE_TOLERANCES,
    backward_flops=lambda p: core_backward_flops(p, softmax=False),
    backward_bytes=_backward_bytes,
    input_modes=CORE_MODES,
    baseline="pytorch_gridsample",
    forward_only_modes=FORWARD_ONLY_MODES,
    validate=validate_core_params,
    id_pairs=GEOMETRY_ID_PAIRS,
    sampling_view=sampling_view,  # dcnv3's: it unpacks offset_mask
))
register_core_implementations("dcnv4", ("input", "offset_mask"), core_arguments, "kernels.ops.dcnv4")
