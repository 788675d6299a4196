"""``conv2d``: the dense baseline, and what the convolution family shares.

Contract: ``docs/ops-semantics.md``, "Convolutions, NCHW" and "Case
parameters". ``conv2d`` is ``torch.nn.functional.conv2d``; its reference is
that function in float64 and its baseline the same function in the case's
dtype (cuDNN on a GPU). ``harness.operators.deform_conv2d`` builds the two
deformable operators on the parameters, validation, weight generator, GEMM
count and tolerances defined here.

Counts (forward), with L = H_out·W_out and K = kernel_h·kernel_w:

- flops = 2·N·C_out·L·(C_in/groups)·K (multiply-adds of the GEMM)
  + N·C_out·L when ``bias`` (one add per output).
- bytes = itemsize · (input + weight + bias + output elements): the fewest an
  implementation can move, each tensor read or written once.

Backward (gradients of input, weight and bias):

- flops = 2 × the GEMM (grad_input = weightᵀ·grad_output, grad_weight =
  grad_output·inputᵀ) + N·C_out·L adds for grad_bias.
- bytes = itemsize · (input + weight + grad_output read, grad_input +
  grad_weight + grad_bias written).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
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
    register_operator,
)
from kernels.reference.conv2d import conv2d, conv_output_size

# Every conv2d parameter with its default, in the contract's order. The
# deformable operators add ``offset_groups`` after ``groups``.
CONV_PARAMS: dict[str, Any] = {
    "N": 2,
    "C_in": 16,
    "C_out": 16,
    "H": 9,
    "W": 9,
    "kernel_h": 3,
    "kernel_w": 3,
    "stride_h": 1,
    "stride_w": 1,
    "pad_h": 1,
    "pad_w": 1,
    "dilation_h": 1,
    "dilation_w": 1,
    "groups": 1,
    "bias": True,
}

# How case ids write the family's parameters (harness.cases): short keys, and the
# (h, w) pairs as one token; a kernel reads as a size, so it is always "3x3", the
# others collapse to one number when both directions agree.
CONV_ID_KEYS = {"C_in": "Cin", "C_out": "Cout", "groups": "g", "offset_groups": "og"}
GEOMETRY_ID_PAIRS = {
    "kernel_h": ("kernel_w", "k", True),
    "stride_h": ("stride_w", "s", False),
    "pad_h": ("pad_w", "p", False),
    "dilation_h": ("dilation_w", "d", False),
}

# One table for the whole family; see docs/operators/conv.md for the derivation.
# n = (C_in/groups)·kh·kw is at most 4608 (512 channels, 3×3) in the suites.
CONV_TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(
        rel_l2=1e-12,
        max_abs=1e-11,
        why=(
            "u = 2^-53 ≈ 1.1e-16. A float64 dot product of n ≤ 4608 terms errs ~sqrt(n)·u "
            "≈ 1e-14; a sample position |y| < 2^10 carries ≤ 2^-43 ≈ 1e-13 into the bilinear "
            "weights. 1e-12 leaves ≥ 10x: two float64 implementations of the same contract "
            "(reference vs torchvision) differ only by summation order."
        ),
    ),
    "float32": Tolerance(
        rel_l2=1e-4,
        max_abs=2e-4,
        why=(
            "u = 2^-24 ≈ 6e-8, float32 accumulation, no TF32. Accumulating n ≤ 4608 terms errs "
            "~sqrt(n)·u ≈ 4e-6 (worst case n·u ≈ 3e-4, not seen with random signs). The "
            "deformable ops compute y = base + dy in float32: for |y| < 256 that rounds by up "
            "to 2^-17 ≈ 8e-6, which moves each bilinear weight by as much, ~1e-5 relative per "
            "sample; cuDNN's Winograd/FFT algorithms for conv2d lose about as much. ~1e-5 "
            "expected, 10x margin for rel_l2; max_abs (per element, relative to max|ref|) "
            "allows the tail of a million elements (~5 sigma) with the same margin."
        ),
    ),
    "float16": Tolerance(
        rel_l2=4 * UNIT_ROUNDOFF["float16"],
        max_abs=8 * UNIT_ROUNDOFF["float16"],
        why=(
            "u = 2^-11 ≈ 4.9e-4; float32 accumulation, but columns (sampled values) and the "
            "output may be stored in half: two roundings of rms u/sqrt(3) each, ~0.8u relative "
            "in L2 whatever n is (the rounding errors are as random as the terms). rel_l2 = 4u "
            "(5x margin). max_abs = 8u: output rounding (u·max|ref|) plus the accumulated "
            "column roundings' tail (~2u at 5 sigma), 2.5x margin."
        ),
    ),
    "bfloat16": Tolerance(
        rel_l2=4 * UNIT_ROUNDOFF["bfloat16"],
        max_abs=8 * UNIT_ROUNDOFF["bfloat16"],
        why=(
            "u = 2^-8 ≈ 3.9e-3; the same argument as float16 (float32 accumulation, columns "
            "and output stored in bfloat16: ~0.8u in L2): rel_l2 = 4u, max_abs = 8u."
        ),
    ),
}


def output_size(params: Mapping[str, Any]) -> tuple[int, int]:
    """(H_out, W_out) of a convolution-family case."""
    return (
        conv_output_size(params["H"], params["kernel_h"], params["stride_h"], params["pad_h"], params["dilation_h"]),
        conv_output_size(params["W"], params["kernel_w"], params["stride_w"], params["pad_w"], params["dilation_w"]),
    )


def validate_conv_params(params: Mapping[str, Any]) -> None:
    """Reject a case no convolution can run, naming the parameter.

    Sizes, strides and dilations must be >= 1 (N >= 0: an empty batch is a
    case, as torchvision tests it), paddings >= 0, ``groups`` must divide C_in
    and C_out, ``offset_groups`` (when present) must divide C_in, and the
    output must not be empty.
    """
    minimums = {name: 1 for name, value in params.items() if not isinstance(value, bool)}
    minimums.update(N=0, pad_h=0, pad_w=0)
    for name, minimum in minimums.items():
        if params[name] < minimum:
            raise ValueError(f"parameter {name!r} must be >= {minimum}, got {params[name]}")
    for name, divides in (("groups", ("C_in", "C_out")), ("offset_groups", ("C_in",))):
        if name not in params:
            continue
        for channels in divides:
            if params[channels] % params[name]:
                raise ValueError(
                    f"parameter {name!r} must divide {channels}: expected {channels} % {name} == 0, "
                    f"got {channels}={params[channels]}, {name}={params[name]}"
                )
    out_h, out_w = output_size(params)
    for name, size, axis in (("H_out", out_h, "h"), ("W_out", out_w, "w")):
        if size < 1:
            extent = params[f"dilation_{axis}"] * (params[f"kernel_{axis}"] - 1) + 1
            raise ValueError(
                f"the output is empty: expected {name} >= 1, got {name}={size} "
                f"({axis.upper()}={params[axis.upper()]}, pad_{axis}={params[f'pad_{axis}']}, "
                f"dilated kernel_{axis} spans {extent})"
            )


def conv_arguments(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments every conv implementation takes, from a case's params."""
    return {
        "stride": (params["stride_h"], params["stride_w"]),
        "padding": (params["pad_h"], params["pad_w"]),
        "dilation": (params["dilation_h"], params["dilation_w"]),
        "groups": params["groups"],
    }


def gemm_flops(params: Mapping[str, Any]) -> float:
    """2·N·C_out·H_out·W_out·(C_in/groups)·kernel_h·kernel_w."""
    out_h, out_w = output_size(params)
    fan_in = params["C_in"] // params["groups"] * params["kernel_h"] * params["kernel_w"]
    return 2.0 * params["N"] * params["C_out"] * out_h * out_w * fan_in


def bias_flops(params: Mapping[str, Any]) -> float:
    """N·C_out·H_out·W_out adds when the case has a bias, else 0."""
    out_h, out_w = output_size(params)
    return float(params["N"] * params["C_out"] * out_h * out_w) if params["bias"] else 0.0


def element_counts(params: Mapping[str, Any]) -> dict[str, int]:
    """Elements of the tensors every conv case has: input, weight, bias, output."""
    out_h, out_w = output_size(params)
    p = params
    return {
        "input": p["N"] * p["C_in"] * p["H"] * p["W"],
        "weight": p["C_out"] * p["C_in"] // p["groups"] * p["kernel_h"] * p["kernel_w"],
        "bias": p["C_out"] if p["bias"] else 0,
        "output": p["N"] * p["C_out"] * out_h * out_w,
    }


def draw_weight_and_bias(params: Mapping[str, Any], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``weight`` [C_out, C_in/groups, kh, kw] ~ N(0, 1/fan_in) and ``bias`` [C_out].

    The 1/sqrt(fan_in) scale (fan_in = (C_in/groups)·kh·kw) keeps outputs O(1)
    for O(1) inputs; bias is uniform in ±1/sqrt(fan_in), as PyTorch initialises
    it. Float64, CPU; bias only when the case has one.
    """
    p = params
    fan_in = p["C_in"] // p["groups"] * p["kernel_h"] * p["kernel_w"]
    tensors = {"weight": draw(generator, (p["C_out"], p["C_in"] // p["groups"], p["kernel_h"], p["kernel_w"]))
               / math.sqrt(fan_in)}
    if p["bias"]:
        bound = 1 / math.sqrt(fan_in)
        tensors["bias"] = draw_uniform(generator, (p["C_out"],), -bound, bound)
    return tensors


def _make_inputs(params, dtype, device, generator, mode="random"):
    """``input`` [N, C_in, H, W] ~ N(0, 1), then weight and bias (``draw_weight_and_bias``)."""
    check_mode("conv2d", mode, ("random",))
    p = params
    tensors = {"input": draw(generator, (p["N"], p["C_in"], p["H"], p["W"]))}
    tensors.update(draw_weight_and_bias(params, generator))
    return to_case(tensors, dtype, device)


def _flops(params):
    return gemm_flops(params) + bias_flops(params)


def _bytes(params, itemsize):
    return float(itemsize * sum(element_counts(params).values()))


def _backward_flops(params):
    return 2 * gemm_flops(params) + bias_flops(params)


def _backward_bytes(params, itemsize):
    counts = element_counts(params)
    read = counts["input"] + counts["weight"] + counts["output"]  # grad_output has the output's shape
    written = counts["input"] + counts["weight"] + counts["bias"]
    return float(itemsize * (read + written))


register_operator(
    Operator(
        name="conv2d",
        summary="Dense 2-D convolution, NCHW (torch.nn.functional.conv2d): the baseline DCN is compared to",
        params=CONV_PARAMS,
        tensors=(
            TensorSpec("input", "[N, C_in, H, W]"),
            TensorSpec("weight", "[C_out, C_in/groups, kernel_h, kernel_w]"),
            TensorSpec("bias", "[C_out]", optional=True),
        ),
        make_inputs=_make_inputs,
        flops=_flops,
        bytes=_bytes,
        tolerances=CONV_TOLERANCES,
        backward_flops=_backward_flops,
        backward_bytes=_backward_bytes,
        input_modes=("random",),
        baseline="pytorch",
        validate=validate_conv_params,
        id_keys=CONV_ID_KEYS,
        id_pairs=GEOMETRY_ID_PAIRS,
    )
)


def _bind_conv2d(inputs, params):
    return functools.partial(conv2d, inputs["input"], inputs["weight"], inputs.get("bias"),
                             **conv_arguments(params))


@implementation("conv2d", "reference", kind="reference", dtypes=tuple(CONV_TOLERANCES))
@in_float64
def reference_conv2d(inputs, params):
    """torch.nn.functional.conv2d in float64 (kernels.reference.conv2d)."""
    return _bind_conv2d(inputs, params)


@implementation("conv2d", "pytorch", kind="baseline", dtypes=KERNEL_DTYPES)
def pytorch_conv2d(inputs, params):
    """torch.nn.functional.conv2d in the case's dtype (cuDNN on a GPU)."""
    # F.conv2d itself: the reference's wrapper checks its arguments (and takes
    # C = 0) on every call, which a timed call must not.
    return functools.partial(torch.nn.functional.conv2d, inputs["input"], inputs["weight"],
                             inputs.get("bias"), **conv_arguments(params))
