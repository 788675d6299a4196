"""A plugin for the fault tests (``--plugin fault_toy``): the operator ``fault_scale``
(``2 · input``) with a right implementation and one per fault a worker must survive.

It registers into the real registry when imported, so worker processes and Ray
tasks (which import the run's plugins) see it too. The kernels run through the
CPU emulator: one writes through a wild pointer (a segfault of the whole
process), one spins on a flag nobody sets (a hang no Python code can
interrupt).
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from harness.registry import Operator, TensorSpec, Tolerance, implementation, register_operator

OP = "fault_scale"
HOG_MAX = 3 << 30  # what the hog holds: a limit that fails leaves a timeout, not a dead machine

WILD_WRITE = r"""
extern "C" __global__ void wild_write(float* out, int n) {
    // A pointer no allocation owns: the emulated thread's store faults the process.
    float* wild = (float*)(size_t)0x10;
    wild[threadIdx.x] = out[threadIdx.x];
}
"""

SPIN = r"""
extern "C" __global__ void spin(volatile int* flag) {
    // Waits for a store that never comes: the launch never returns.
    while (flag[0] == 0) { }
}
"""


def _make_inputs(params, dtype, device, generator, mode="random"):
    x = torch.randn(params["N"], params["C"], generator=generator, dtype=torch.float64)
    return {"input": x.to(dtype).to(device)}


def _math(inputs, params):
    return 2 * inputs["input"]


def _launch(source: str, name: str, *args) -> None:
    from kernels import emulator

    emulator.RawModule(code=source).get_function(name)((1,), (32,), args)


def _forward(compute):
    def prepare(inputs, params):
        return lambda: compute(inputs, params)
    prepare.__doc__ = compute.__doc__
    return prepare


def segfault(inputs, params):
    """Planted fault: an emulated kernel writing through a wild pointer."""
    out = np.zeros(32, dtype=np.float32)
    _launch(WILD_WRITE, "wild_write", out, np.int32(32))
    return _math(inputs, params)


def deadlock(inputs, params):
    """Planted fault: an emulated kernel that never returns."""
    _launch(SPIN, "spin", np.zeros(1, dtype=np.int32))
    return _math(inputs, params)


def sleeps(inputs, params):
    """Planted fault: sleeps far past any case timeout of the tests."""
    time.sleep(3600)
    return _math(inputs, params)


def exits(inputs, params):
    """Planted fault: the process exits under the harness's feet."""
    os._exit(1)


def hog(inputs, params):
    """Planted fault: allocates (and touches) HOG_MAX bytes, then holds them."""
    held = np.ones(HOG_MAX, dtype=np.uint8)
    time.sleep(3600)
    del held
    return _math(inputs, params)


register_operator(Operator(
    name=OP,
    summary="2 · input, with planted faults",
    params={"N": 2, "C": 3},
    tensors=(TensorSpec("input", "[N, C]"),),
    make_inputs=_make_inputs,
    flops=lambda p: 1.0 * p["N"] * p["C"],
    bytes=lambda p, itemsize: 2.0 * itemsize * p["N"] * p["C"],
    tolerances={"float32": Tolerance(1e-6, 1e-6, "exact"),
                "float64": Tolerance(1e-12, 1e-12, "exact")},
    has_backward=False,
    baseline="reference",
))
implementation(OP, "reference", kind="reference", dtypes=("float32", "float64"),
               has_backward=False)(_forward(_math))
implementation(OP, "good", kind="peer", has_backward=False)(_forward(_math))
for _fault in (segfault, deadlock, sleeps, exits, hog):
    implementation(OP, _fault.__name__, kind="kernel", has_backward=False)(_forward(_fault))
