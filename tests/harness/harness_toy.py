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
        id_pairs={"stride_h": ("stride_w", "s", False)},
    ))

    def timed(name, compute):
        """A prepare whose call notes its poisoning state and runs ``compute``."""
        def prepare(inputs, params):
            def call():
                calls.note(name)
                return compute(inputs, params)
            return call
        prepare.__doc__ = compute.__doc__ or f"The toy math ({name})."
        return prepare

    all_dtypes = tuple(TOY_TOLERANCES)
    implementation(TOY, "reference", kind="reference", dtypes=all_dtypes)(
        timed("reference", toy_math))
    implementation(TOY, "baseline", kind="baseline")(timed("baseline", toy_math))
    implementation(TOY, "good", kind="peer")(timed("good", toy_math))
    implementation(TOY, "emulated", kind="kernel", devices=("cuda",),
                   emulated_on=("cpu",))(timed("emulated", toy_math))
    implementation(TOY, "missing", kind="peer",
                   available=lambda device: "needs the frobnicator")(timed("missing", toy_math))
    implementation(TOY, "forward_only", kind="peer", has_backward=False)(
        timed("forward_only", toy_math))

    def wrong(inputs, params):
        """Planted bug: 1% too large."""
        return toy_math(inputs, params) * 1.01

    def nan(inputs, params):
        """Planted bug: one NaN, everything else exact."""
        out = toy_math(inputs, params)
        mask = torch.zeros_like(out, dtype=torch.bool)
        mask.view(-1)[0] = True
        return out.masked_fill(mask, float("nan"))

    def unwritten(inputs, params):
        """Planted bug: a kernel-style output whose last element is never written."""
        result = toy_math(inputs, params).detach()
        out = launch.new_output(result.shape, result.dtype, result.device)
        out.view(-1)[:-1] = result.reshape(-1)[:-1]
        return out

    def crash(inputs, params):
        """Planted bug: raises."""
        raise RuntimeError("boom")

    implementation(TOY, "wrong", kind="kernel")(timed("wrong", wrong))
    implementation(TOY, "nan", kind="kernel")(timed("nan", nan))
    implementation(TOY, "unwritten", kind="kernel", has_backward=False)(
        timed("unwritten", unwritten))
    implementation(TOY, "crash", kind="kernel")(timed("crash", crash))

    @implementation(TOY, "cached", kind="kernel", has_backward=False)
    def cached(inputs, params):
        """Planted bug: right on its first call, then returns a stale buffer it never
        writes again (a result cache gone wrong): only a check after timing sees it."""
        first = []

        def call():
            calls.note("cached")
            if not first:
                first.append(toy_math(inputs, params))
                return first[0]
            return torch.zeros_like(first[0])
        return call

    @implementation(TOY, "syncs", kind="kernel", has_backward=False)
    def syncs(inputs, params):
        """Planted bug: checks a value on the host inside the timed call."""
        def call():
            calls.note("syncs")
            if inputs["weight"].abs().max().item() > 1e6:
                raise ValueError("weight too large")
            return toy_math(inputs, params)
        return call


TOY_SUITE = """
    description = "toy"
    [[sweep]]
    op = "toy_scale"
    backward = true
    modes = ["random", "zeros"]
    [sweep.axes]
    C = [2, 3]
"""
