"""A toy operator for the harness tests, in a private registry.

``toy_scale`` computes ``scale · input · weight[c] + bias[c]`` and comes with
implementations that are right, planted wrong, NaN-producing, crashing,
unavailable, emulated, forward-only, or leave an output element unwritten, so
every path of the checker and the runner is exercised without the real
operators.
"""

from __future__ import annotations

import torch

from harness import registry
from harness.registry import Operator, TensorSpec, Tolerance, implementation
from kernels import launch

TOY = "toy_scale"
TOY_PARAMS = {"N": 2, "C": 3, "H": 4, "W": 5, "stride_h": 1, "stride_w": 1, "scale": 1.0,
              "bias": True}
TOY_TOLERANCES = {
    "float64": Tolerance(1e-12, 1e-12, "exact math"),
    "float32": Tolerance(1e-6, 1e-6, "one rounding per element"),
    "float16": Tolerance(2e-3, 2e-3, "one rounding per element"),
    "bfloat16": Tolerance(1e-2, 1e-2, "one rounding per element"),
}
# Implementations that agree with the reference on every input.
CORRECT_IMPLS = ("reference", "baseline", "good", "emulated")


def _make_inputs(params, dtype, device, generator, mode="random"):
    shape = (params["N"], params["C"], params["H"], params["W"])
    if mode == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    else:
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
    tensors = {"input": x, "weight": torch.randn(params["C"], generator=generator,
                                                  dtype=torch.float64)}
    if params["bias"]:
        tensors["bias"] = torch.randn(params["C"], generator=generator, dtype=torch.float64)
    return {name: t.to(dtype).to(device) for name, t in tensors.items()}


def _validate(params):
    if params["C"] < 1:
        raise ValueError(f"parameter 'C' must be >= 1, got {params['C']}")


def toy_math(inputs, params):
    out = params["scale"] * inputs["input"] * inputs["weight"][None, :, None, None]
    if "bias" in inputs:
        out = out + inputs["bias"][None, :, None, None]
    return out


class Calls:
    """For each implementation, whether outputs were poisoned at each of its calls."""

    def __init__(self):
        self.poisoned: dict[str, list[bool]] = {}

    def note(self, name: str) -> None:
        self.poisoned.setdefault(name, []).append(launch.outputs_poisoned())


def register_toy(calls: Calls) -> None:
    registry.register_operator(Operator(
        name=TOY,
        summary="scale · input · weight[c] + bias[c]",
        params=TOY_PARAMS,
        tensors=(TensorSpec("input", "[N, C, H, W]"), TensorSpec("weight", "[C]"),
                 TensorSpec("bias", "[C]", optional=True)),
        make_inputs=_make_inputs,
        flops=lambda p: 3.0 * p["N"] * p["C"] * p["H"] * p["W"],
        bytes=lambda p, itemsize: 2.0 * itemsize * p["N"] * p["C"] * p["H"] * p["W"],
        tolerances=TOY_TOLERANCES,
        backward_flops=lambda p: 6.0 * p["N"] * p["C"] * p["H"] * p["W"],
        backward_bytes=lambda p, itemsize: 3.0 * itemsize * p["N"] * p["C"] * p["H"] * p["W"],
        input_modes=("random", "zeros"),
        forward_only_modes=("zeros",),
        baseline="baseline",
        validate=_validate,
    ))

    def plain(name):
        def forward(inputs, params):
            calls.note(name)
            return toy_math(inputs, params)
        forward.__doc__ = f"The toy math ({name})."
        return forward

    all_dtypes = tuple(TOY_TOLERANCES)
    implementation(TOY, "reference", kind="reference", dtypes=all_dtypes)(plain("reference"))
    implementation(TOY, "baseline", kind="baseline")(plain("baseline"))
    implementation(TOY, "good", kind="peer")(plain("good"))
    implementation(TOY, "emulated", kind="kernel", devices=("cuda",),
                   emulated_on=("cpu",))(plain("emulated"))
    implementation(TOY, "missing", kind="peer",
                   available=lambda device: "needs the frobnicator")(plain("missing"))
    implementation(TOY, "forward_only", kind="peer", has_backward=False)(plain("forward_only"))

    @implementation(TOY, "wrong", kind="kernel")
    def wrong(inputs, params):
        """Planted bug: 1% too large."""
        calls.note("wrong")
        return toy_math(inputs, params) * 1.01

    @implementation(TOY, "nan", kind="kernel")
    def nan(inputs, params):
        """Planted bug: one NaN, everything else exact."""
        calls.note("nan")
        out = toy_math(inputs, params)
        mask = torch.zeros_like(out, dtype=torch.bool)
        mask.view(-1)[0] = True
        return out.masked_fill(mask, float("nan"))

    @implementation(TOY, "unwritten", kind="kernel", has_backward=False)
    def unwritten(inputs, params):
        """Planted bug: a kernel-style output whose last element is never written."""
        calls.note("unwritten")
        result = toy_math(inputs, params).detach()
        out = launch.new_output(result.shape, result.dtype, result.device)
        out.view(-1)[:-1] = result.reshape(-1)[:-1]
        return out

    @implementation(TOY, "crash", kind="kernel")
    def crash(inputs, params):
        """Planted bug: raises."""
        calls.note("crash")
        raise RuntimeError("boom")


TOY_SUITE = """
    description = "toy"
    [[sweep]]
    op = "toy_scale"
    backward = true
    modes = ["random", "zeros"]
    [sweep.axes]
    C = [2, 3]
"""
