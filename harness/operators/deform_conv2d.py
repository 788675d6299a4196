"""``deform_conv2d`` (DCNv1) and ``modulated_deform_conv2d`` (DCNv2).

Contract: ``docs/ops-semantics.md``, "Convolutions, NCHW" (the semantics of
``torchvision.ops.deform_conv2d`` without / with ``mask``, sampling rule B0).
Parameters are conv2d's plus ``offset_groups`` and ``allow_tf32``; validation,
weights, the GEMM count and the tolerances are shared with
``harness.operators.conv2d``.

``allow_tf32`` (default false; float32 only; in the case id as ``tf32`` when
true): the case computes its float32 products on TF32 tensor cores and is
judged by ``TF32_TOLERANCE``, float16's size, not float32's. Only
implementations with such a path run it: ``cupy_implicit_gemm`` (its wmma
m16n16k8 TF32 kernels, both directions; the emulator rounds as the GPU does)
and torchvision's CUDA forward (cuBLAS with
``torch.backends.cuda.matmul.allow_tf32`` on around its call); the others'
rows are skipped, saying why (``TF32_DECLINES``).

Tensors: ``input`` [N, C_in, H, W], ``offset`` [N, 2·offset_groups·kh·kw,
H_out, W_out], ``mask`` [N, offset_groups·kh·kw, H_out, W_out] (DCNv2 only),
``weight`` [C_out, C_in/groups, kh, kw], ``bias`` [C_out] (when ``bias``).

Input modes (``make_inputs``; input ~ N(0, 1), weight ~ N(0, 1/fan_in) in all):

- ``random``: offsets U(-2, 2) + N(0, 1), so samples fall between pixels and,
  near the border, outside the map. After rounding to the dtype, every offset
  within ``KINK_MARGIN`` of an integer is moved to that integer + 0.5: no sample
  coordinate is within 2^-10 of an integer, i.e. of a kink of B0, so gradients
  are well defined even where an implementation computes y = base + dy in
  float32 (which rounds by < 2^-11 for |y| < 2^13). DCNv2 masks
  sigmoid(N(0, 1)), in (0, 1).
- ``integer_offsets``: offsets round(U(-2, 2) + N(0, 1)): every sample sits
  exactly on a pixel (or exactly outside). Forward only: pixels are kinks.
- ``border``: every sample point has y ∈ {-1, 0, H-1, H} or x ∈ {-1, 0, W-1, W}
  exactly (a third of the points y only, a third x only, a third both; the
  other coordinate as in ``random``). These are B0's boundary points. Forward
  only (kinks; torchvision's own offset gradient is inconsistent at -1).
- ``far``: half of the sample points get |dy|, |dx| ∈ [2, 3]·reach with random
  signs, reach = H + W + 2·(pad_h + pad_w): far outside the map (value 0)
  whatever the base position; the other half as in ``random``.
- ``zero_mask`` (DCNv2 only; DCNv1 has no mask): offsets as in ``random``;
  the mask is exactly 0 for one whole tap per offset group (all images and
  positions) and for about a quarter of the other entries.

Counts, with P = N·H_out·W_out output pixels, K = kh·kw, G = offset_groups:

- forward flops = GEMM 2·P·C_out·(C_in/groups)·K
  + sampling: 10 per sample point (P·G·K points: y and x from base + offset,
    2 adds; fractions, 2 subtracts; their complements, 2 subtracts; the four
    corner weights, 4 multiplies) and 7 per channel sample (P·C_in·K: the
    weighted sum of 4 corners, 4 multiplies and 3 adds), +1 per channel sample
    for the DCNv2 mask multiply
  + P·C_out bias adds when ``bias``.
  Each channel sample also reads 4 corners (counted in neither flops nor the
  fewest bytes below: they come from the input read once).
- forward bytes = itemsize · (input + offset + mask + weight + bias + output).
- backward flops = 2 × GEMM (grad_columns = weightᵀ·grad_output,
  grad_weight = grad_output·columnsᵀ)
  + 10 per sample point (recomputing positions and corner weights)
  + 29 per channel sample: recomputing the column for grad_weight (7),
    scattering grad_column times 4 corner weights into grad_input (4 multiplies,
    4 adds), and d/dy, d/dx of the blend (2 × (2 subtracts, 2 multiplies,
    1 add)) times grad_column, accumulated over channels (2 multiplies, 2 adds)
  + DCNv2: 4 more per channel sample (mask in the recomputed column and in the
    scattered gradient; grad_mask's multiply and add) and 2 per sample point
    (the mask times the two position gradients)
  + P·C_out adds for grad_bias when ``bias``.
- backward bytes = itemsize · (input, offset, mask, weight and grad_output
  read once; grad_input, grad_offset, grad_mask, grad_weight, grad_bias
  written once).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from harness.operators.conv2d import (
    CONV_ID_KEYS,
    CONV_PARAMS,
    CONV_TOLERANCES,
    GEOMETRY_ID_PAIRS,
    bias_flops,
    conv_arguments,
    draw_weight_and_bias,
    element_counts,
    gemm_flops,
    output_size,
    validate_conv_params,
)
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
    CaseTolerance,
    Operator,
    TensorSpec,
    Tolerance,
    implementation,
    kernel_availability,
    register_operator,
)
from harness.sampling import SamplingPicture
from kernels.peers import torchvision_ops
from kernels.reference import deform_conv2d as reference_ops
from kernels.reference.deform_conv2d import base_coordinates

DEFORM_PARAMS: dict[str, Any] = {
    **{name: value for name, value in CONV_PARAMS.items() if name != "bias"},
    "offset_groups": 1,
    "bias": True,
    "allow_tf32": False,
}
DEFORM_ID_KEYS = {**CONV_ID_KEYS, "allow_tf32": "tf32"}

# TF32 keeps float16's 10 mantissa bits (u = 2^-11) in float32's range.
TF32_TOLERANCE = Tolerance(
    rel_l2=4 * UNIT_ROUNDOFF["float16"],
    max_abs=8 * UNIT_ROUNDOFF["float16"],
    why=(
        "allow_tf32: u = 2^-11 ≈ 4.9e-4 (TF32's 10 mantissa bits, as float16), float32 "
        "accumulation. Both factors of every product (gathered column and weight; grad_output "
        "and weight or column in the backward) are rounded to TF32: two roundings of rms "
        "u/sqrt(3) each, ~0.8u relative in L2 whatever n is; the output stays float32. "
        "float16's bounds: rel_l2 = 4u (5x margin), max_abs = 8u (the rounding errors' tail "
        "at 5 sigma, 2.5x margin). float32's 1e-4 is TF32-free: a TF32 path fails it."
    ),
)


def validate_tf32_dtype(params: Mapping[str, Any], dtype: str) -> None:
    """allow_tf32 rounds float32 products to TF32: a case of another dtype has none."""
    if params["allow_tf32"] and dtype != "float32":
        raise ValueError(
            f"parameter 'allow_tf32' must be false for dtype {dtype}: TF32 is a float32 path, "
            f"expected allow_tf32=false or dtype float32, got allow_tf32=true with {dtype}"
        )


def tf32_requirement(params: Mapping[str, Any]) -> str | None:
    """What an allow_tf32 case asks of an implementation (``Operator.requirement``)."""
    return "allow_tf32=true (float32 products on TF32)" if params["allow_tf32"] else None


# Offsets of the random mode keep every coordinate at least this far from an
# integer (a kink of B0). float32 positions y = base + dy round by less than
# 2^-24·|y| < 2^-11 for |y| < 2^13, so no implementation crosses a kink.
KINK_MARGIN = 2.0**-10

V1_MODES = ("random", "integer_offsets", "border", "far")
V2_MODES = (*V1_MODES, "zero_mask")
FORWARD_ONLY_MODES = ("integer_offsets", "border")

# Flops per sample point / per channel sample; derived in the module docstring.
POINT_FLOPS = 10
BLEND_FLOPS = 7
MASK_FLOPS = 1
BACKWARD_SAMPLE_FLOPS = 29
BACKWARD_MASK_SAMPLE_FLOPS = 4
BACKWARD_MASK_POINT_FLOPS = 2


# --- input generation -------------------------------------------------------

def _round_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` rounded to ``dtype`` and held in float64."""
    return values.to(dtype).to(torch.float64)


def _offset_shape(params: Mapping[str, Any]) -> tuple[int, ...]:
    """[N, offset_groups, kh·kw, 2 (dy, dx), H_out, W_out]: a view of the contract's offset."""
    out_h, out_w = output_size(params)
    taps = params["kernel_h"] * params["kernel_w"]
    return (params["N"], params["offset_groups"], taps, 2, out_h, out_w)


def _random_offsets(params, generator, dtype):
    """U(-2, 2) + N(0, 1), rounded to ``dtype``, then kept ``KINK_MARGIN`` off integers."""
    shape = _offset_shape(params)
    offset = _round_to(draw_uniform(generator, shape, -2.0, 2.0) + draw(generator, shape), dtype)
    nearest = offset.round()
    # integer + 0.5 is exact in every dtype for the |offset| < 128 drawn here.
    return torch.where((offset - nearest).abs() < KINK_MARGIN, nearest + 0.5, offset)


def _integer_offsets(params, generator, dtype):
    """round(U(-2, 2) + N(0, 1)): small integers, exact in every dtype."""
    shape = _offset_shape(params)
    return (draw_uniform(generator, shape, -2.0, 2.0) + draw(generator, shape)).round()


def _border_offsets(params, generator, dtype):
    """Pin y, x or both of every sample point to B0's boundary {-1, 0, size-1, size}."""
    offset = _random_offsets(params, generator, dtype)
    point_shape = offset[:, :, :, 0].shape  # [N, G, K, H_out, W_out]
    pinned_axes = torch.randint(3, point_shape, generator=generator)  # 0: y, 1: x, 2: both
    bases = base_coordinates(
        point_shape[-2:], (params["kernel_h"], params["kernel_w"]),
        (params["stride_h"], params["stride_w"]), (params["pad_h"], params["pad_w"]),
        (params["dilation_h"], params["dilation_w"]), dtype=torch.float64, device="cpu",
    )
    for axis, (base, size) in enumerate(zip(bases, (params["H"], params["W"]), strict=True)):
        boundary = torch.tensor([-1.0, 0.0, size - 1.0, float(size)], dtype=torch.float64)
        target = boundary[torch.randint(4, point_shape, generator=generator)]
        pinned = (pinned_axes == axis) | (pinned_axes == 2)
        offset[:, :, :, axis] = torch.where(pinned, target - base, offset[:, :, :, axis])
    if not torch.equal(_round_to(offset, dtype), offset):
        raise ValueError(
            f"input mode 'border' needs integer offsets up to {int(offset.abs().max())}, which "
            f"{dtype} cannot hold exactly; expected H and W small enough for {dtype}, "
            f"got H={params['H']}, W={params['W']}"
        )
    return offset


def _far_offsets(params, generator, dtype):
    """Half the sample points far outside the map, the others as in ``random``."""
    offset = _random_offsets(params, generator, dtype)
    reach = params["H"] + params["W"] + 2 * (params["pad_h"] + params["pad_w"])
    shape = offset.shape
    far = torch.rand(shape[:3] + (1,) + shape[4:], generator=generator) < 0.5
    sign = torch.randint(2, shape, generator=generator, dtype=torch.float64) * 2 - 1
    distant = _round_to(sign * draw_uniform(generator, shape, 2.0 * reach, 3.0 * reach), dtype)
    return torch.where(far, distant, offset)


OFFSET_GENERATORS: dict[str, Callable[..., torch.Tensor]] = {
    "random": _random_offsets,
    "integer_offsets": _integer_offsets,
    "border": _border_offsets,
    "far": _far_offsets,
    "zero_mask": _random_offsets,
}


def _mask(params, generator, zero_some: bool) -> torch.Tensor:
    """[N, offset_groups·kh·kw, H_out, W_out], sigmoid(N(0, 1)).

    With ``zero_some``: exactly 0 for one tap per offset group everywhere and
    for about a quarter of the other entries.
    """
    batch, groups, taps, _, out_h, out_w = _offset_shape(params)
    mask = torch.sigmoid(draw(generator, (batch, groups, taps, out_h, out_w)))
    if zero_some:
        dead_taps = torch.randint(taps, (groups,), generator=generator)
        mask[:, torch.arange(groups), dead_taps] = 0.0
        mask[torch.rand(mask.shape, generator=generator) < 0.25] = 0.0
    return mask.reshape(batch, groups * taps, out_h, out_w)


def _input_maker(op: str, modes: tuple[str, ...], modulated: bool):
    def make_inputs(params, dtype, device, generator, mode="random"):
        """input, offset (by ``mode``), mask (DCNv2), weight, bias, in that draw order."""
        check_mode(op, mode, modes)
        p = params
        tensors = {"input": draw(generator, (p["N"], p["C_in"], p["H"], p["W"]))}
        offset = OFFSET_GENERATORS[mode](params, generator, dtype)
        batch, groups, taps, _, out_h, out_w = offset.shape
        tensors["offset"] = offset.reshape(batch, 2 * groups * taps, out_h, out_w)
        if modulated:
            tensors["mask"] = _mask(params, generator, zero_some=mode == "zero_mask")
        tensors.update(draw_weight_and_bias(params, generator))
        return to_case(tensors, dtype, device)

    return make_inputs


# --- counts -----------------------------------------------------------------

def _sample_counts(params) -> tuple[int, int]:
    """(sample points N·G·K·H_out·W_out, channel samples N·C_in·K·H_out·W_out)."""
    out_h, out_w = output_size(params)
    pixels_taps = params["N"] * params["kernel_h"] * params["kernel_w"] * out_h * out_w
    return pixels_taps * params["offset_groups"], pixels_taps * params["C_in"]


def _deform_element_counts(params, modulated: bool) -> dict[str, int]:
    counts = element_counts(params)
    points, _ = _sample_counts(params)
    counts["offset"] = 2 * points
    counts["mask"] = points if modulated else 0
    return counts


def _counters(modulated: bool):
    mask_flops = MASK_FLOPS if modulated else 0
    backward_mask_sample = BACKWARD_MASK_SAMPLE_FLOPS if modulated else 0
    backward_mask_point = BACKWARD_MASK_POINT_FLOPS if modulated else 0

    def flops(params):
        points, samples = _sample_counts(params)
        sampling = POINT_FLOPS * points + (BLEND_FLOPS + mask_flops) * samples
        return gemm_flops(params) + sampling + bias_flops(params)

    def bytes_(params, itemsize):
        return float(itemsize * sum(_deform_element_counts(params, modulated).values()))

    def backward_flops(params):
        points, samples = _sample_counts(params)
        sampling = ((POINT_FLOPS + backward_mask_point) * points
                    + (BACKWARD_SAMPLE_FLOPS + backward_mask_sample) * samples)
        return 2 * gemm_flops(params) + sampling + bias_flops(params)

    def backward_bytes(params, itemsize):
        counts = _deform_element_counts(params, modulated)
        differentiable = counts["input"] + counts["offset"] + counts["mask"] + counts["weight"]
        read = differentiable + counts["output"]  # grad_output has the output's shape
        written = differentiable + counts["bias"]
        return float(itemsize * (read + written))

    return flops, bytes_, backward_flops, backward_bytes


# --- implementations --------------------------------------------------------

def _bind(function, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any], modulated: bool):
    """``function(input, offset[, mask], weight, bias, stride=…, padding=…, dilation=…,
    groups=…, offset_groups=…)`` with its arguments bound: the signature shared by the
    reference and the torchvision adapter."""
    tensors = [inputs["input"], inputs["offset"]] + ([inputs["mask"]] if modulated else [])
    return functools.partial(function, *tensors, inputs["weight"], inputs.get("bias"),
                             **conv_arguments(params), offset_groups=params["offset_groups"])


def _prepare(load_module: Callable[[], Any], op: str, modulated: bool, doc: str):
    """An implementation's prepare: ``op`` of the module ``load_module()`` returns, bound."""

    def prepare(inputs, params):
        return _bind(getattr(load_module(), op), inputs, params, modulated)

    prepare.__doc__ = doc
    return prepare


def _prepare_torchvision(inputs, params):
    """torchvision's group inference checked once; the call is torchvision.ops.deform_conv2d."""
    return torchvision_ops.prepare_deform_conv2d(
        inputs["input"], inputs["offset"], inputs.get("mask"), inputs["weight"], inputs.get("bias"),
        **conv_arguments(params), offset_groups=params["offset_groups"],
        allow_tf32=params["allow_tf32"])


def _prepare_kernel(inputs, params, design):
    """kernels.ops.deform_conv2d.prepare: checked once, then the unchecked operator."""
    from kernels.ops import deform_conv2d  # needs CuPy or the emulator

    return deform_conv2d.prepare(inputs["input"], inputs["offset"], inputs.get("mask"),
                                 inputs["weight"], inputs.get("bias"), **conv_arguments(params),
                                 offset_groups=params["offset_groups"], design=design,
                                 allow_tf32=params["allow_tf32"])


# Our designs: implementation name -> kernels.ops.deform_conv2d's design.
KERNEL_DESIGNS = {"cupy": "im2col", "cupy_implicit_gemm": "implicit_gemm"}


def _declines_always(reason: str):
    """``declines`` of an implementation without a TF32 path: ``reason``, whatever the case."""
    return lambda params, device, direction: reason


def _torchvision_declines(params, device, direction):
    if device != "cuda":
        return "its CPU kernel multiplies in float32 (TF32 is a CUDA tensor-core format)"
    if direction == "backward":
        return ("its backward GEMMs run in autograd after the call, outside the "
                "torch.backends.cuda.matmul.allow_tf32 its forward runs under")
    return None


# Implementation name -> its ``declines`` for allow_tf32 cases (Operator.requirement).
TF32_DECLINES = {
    "reference": _declines_always("it computes in float64 (it is the oracle)"),
    "torchvision": _torchvision_declines,
    "cupy": _declines_always("allow_tf32 is the implicit GEMM's; the im2col design's cuBLAS "
                             "GEMMs follow torch.backends.cuda.matmul.allow_tf32"),
    "cupy_implicit_gemm": lambda params, device, direction: None,
}


# Measured on the CPU: forward just over the float16 bound, grad_offset 12-50x
# over it. Kept as a visible xfail rather than a looser bound for everyone.
TORCHVISION_HALF = ("torchvision computes sample positions, bilinear blends and sums "
                    "in float16, not float32 as the contract asks")


def _register_implementations(op: str, modulated: bool) -> None:
    """reference, torchvision, cupy (im2col) and cupy_implicit_gemm for one operator: each
    calls its module's ``op``."""
    with_mask = " with mask" if modulated else ""
    implementation(op, "reference", kind="reference", dtypes=tuple(CONV_TOLERANCES),
                   declines=TF32_DECLINES["reference"])(in_float64(
        _prepare(lambda: reference_ops, op, modulated,
                 f"kernels.reference.deform_conv2d.{op}: plain PyTorch from the contract, in float64.")))
    # No bfloat16: torchvision's CPU kernel rejects it and its CUDA kernel
    # dispatches floating types and half only.
    implementation(op, "torchvision", kind="peer", dtypes=("float32", "float16"),
                   known_inaccurate={"float16": TORCHVISION_HALF},
                   declines=TF32_DECLINES["torchvision"],
                   description=f"torchvision.ops.deform_conv2d{with_mask}, in the case's dtype.")(
        _prepare_torchvision)
    # float64 too: the kernels' double instantiations (for gradcheck).
    for name, design in KERNEL_DESIGNS.items():
        implementation(op, name, kind="kernel", dtypes=(*KERNEL_DTYPES, "float64"),
                       available=kernel_availability("kernels.ops.deform_conv2d"),
                       emulated_on=("cpu",), declines=TF32_DECLINES[name],
                       description=f"kernels.ops.deform_conv2d.{op}(design={design!r}): our CuPy "
                                   "kernels (CPU: the emulator).")(
            functools.partial(_prepare_kernel, design=design))


# --- the sampling view (reports' sampling page) ---------------------------

def sampling_view(params: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> SamplingPicture:
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


# --- operators --------------------------------------------------------------

_TENSORS = {
    "input": TensorSpec("input", "[N, C_in, H, W]"),
    "offset": TensorSpec("offset", "[N, 2·offset_groups·kernel_h·kernel_w, H_out, W_out]"),
    "mask": TensorSpec("mask", "[N, offset_groups·kernel_h·kernel_w, H_out, W_out]"),
    "weight": TensorSpec("weight", "[C_out, C_in/groups, kernel_h, kernel_w]"),
    "bias": TensorSpec("bias", "[C_out]", optional=True),
}

# Operator name -> (whether it takes a mask, summary).
DEFORM_OPERATORS = {
    "deform_conv2d": (False, "Deformable convolution DCNv1, NCHW (torchvision.ops.deform_conv2d, no mask)"),
    "modulated_deform_conv2d": (True, "Modulated deformable convolution DCNv2, NCHW (torchvision.ops.deform_conv2d with mask)"),
}

for _name, (_modulated, _summary) in DEFORM_OPERATORS.items():
    _modes = V2_MODES if _modulated else V1_MODES
    _flops, _bytes, _backward_flops, _backward_bytes = _counters(_modulated)
    register_operator(
        Operator(
            name=_name,
            summary=_summary,
            params=DEFORM_PARAMS,
            tensors=tuple(spec for key, spec in _TENSORS.items() if _modulated or key != "mask"),
            make_inputs=_input_maker(_name, _modes, _modulated),
            flops=_flops,
            bytes=_bytes,
            tolerances=CONV_TOLERANCES,
            backward_flops=_backward_flops,
            backward_bytes=_backward_bytes,
            input_modes=_modes,
            baseline="torchvision",
            forward_only_modes=FORWARD_ONLY_MODES,
            validate=validate_conv_params,
            id_keys=DEFORM_ID_KEYS,
            id_pairs=GEOMETRY_ID_PAIRS,
            sampling_view=sampling_view,
            case_tolerances=(CaseTolerance({"allow_tf32": True}, "float32", TF32_TOLERANCE),),
            validate_dtype=validate_tf32_dtype,
            requirement=tf32_requirement,
            id_flags_if_true=("allow_tf32",),
        )
    )
    _register_implementations(_name, _modulated)
