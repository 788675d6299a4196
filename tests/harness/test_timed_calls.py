"""The timed call of every implementation does the operator's work only.

On the CPU a profiler hook watches each implementation's timed call (forward,
and backward where it has one) on a small case of its operator: no function
of ours named like an argument check (``check_*``, ``_check*``, ``validate*``)
may run, and no host synchronisation (``.item()``, ``.tolist()``, ``.cpu()``,
``.numpy()``, ``torch.cuda.synchronize``) may happen. The emulator's own
machinery (``kernels/emulator``: on a GPU that is the driver) is not watched,
nor are the references: the float64 oracle, written straight from the contract
with its checks, is never what a speedup or a claim about speed is made of.
On a GPU the same calls run under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from harness_toy import TOY

from harness import execution, registry
from harness.cases import make_case

REPO = Path(__file__).resolve().parents[2]
OURS = (str(REPO / "harness"), str(REPO / "kernels"))
EMULATOR = str(REPO / "kernels" / "emulator")
SYNCS = {"item", "tolist", "cpu", "numpy", "synchronize", "_local_scalar_dense"}
# kernels.launch validates each launch's grid and block against CUDA's limits: a few
# integer comparisons that are part of launching (the driver checks the same), not of
# checking the operator's arguments.
LAUNCHING = {"_check_configuration"}


def _is_check(name: str) -> bool:
    return name.startswith(("check_", "_check", "validate", "_validate")) and name not in LAUNCHING


class Watch:
    """A ``sys.setprofile`` hook recording argument checks and host syncs."""

    def __init__(self):
        self.found: list[str] = []
        self._inside_emulator = 0

    def __call__(self, frame, event, arg):
        filename = frame.f_code.co_filename
        if event == "call" and filename.startswith(EMULATOR):
            self._inside_emulator += 1
        elif event == "return" and filename.startswith(EMULATOR):
            self._inside_emulator -= 1
        if self._inside_emulator:
            return
        if event == "call" and filename.startswith(OURS) and _is_check(frame.f_code.co_name):
            self.found.append(f"check {frame.f_code.co_name} ({filename}:{frame.f_lineno})")
        elif event == "c_call" and getattr(arg, "__name__", "") in SYNCS:
            self.found.append(f"host sync {arg.__name__} (called from {filename}:{frame.f_lineno})")


def watched(call) -> list[str]:
    watch = Watch()
    sys.setprofile(watch)
    try:
        call()
    finally:
        sys.setprofile(None)
    return watch.found


def _dtype(impl: registry.Implementation) -> str:
    return next(d for d in ("float32", "float64", "float16", "bfloat16") if d in impl.dtypes)


def _timed_calls(device: str):
    registry.load_all()
    for (op_name, name), impl in sorted(registry.IMPLEMENTATIONS.items()):
        if impl.kind == "reference":
            continue
        dtype = _dtype(impl)
        if impl.unavailable_reason(device, dtype) is None:
            yield pytest.param(op_name, name, dtype, id=f"{op_name}/{name}")


# Cases where a peer computes the operator (it refuses the defaults, rightly).
CASE_OVERRIDES = {("deform_psroi_pool", "torchvision"): {"no_trans": True}}


def _call_of(op_name: str, name: str, dtype: str, device: str, direction: str):
    impl = registry.get_implementation(op_name, name)
    case = make_case(registry.get_operator(op_name), CASE_OVERRIDES.get((op_name, name), {}),
                     dtype, "random")
    backward = direction == "backward"
    if backward and (execution.wants_backward(case) or not impl.has_backward):
        pytest.skip(f"{op_name}/{name} has no backward here")
    case_run = execution.prepare(case, device, seed=0, backward=backward)
    with torch.no_grad() if not backward else torch.enable_grad():
        call = execution.timed_call(case_run, impl, direction)
        call()  # the first call may compile and cache: not what is timed
    return call


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize(("op_name", "name", "dtype"), list(_timed_calls("cpu")))
def test_the_timed_call_makes_no_argument_check_and_no_host_sync(op_name, name, dtype, direction):
    call = _call_of(op_name, name, dtype, "cpu", direction)
    with torch.no_grad() if direction == "forward" else torch.enable_grad():
        assert watched(call) == []


def test_the_watch_catches_a_sync_and_a_check(toy):
    """The hook itself: the toy's planted ``syncs`` implementation calls ``.item()``
    in its timed call, and an argument check of ours is seen wherever it runs."""
    impl = registry.get_implementation(TOY, "syncs")
    case = make_case(registry.get_operator(TOY), {}, "float32", "random")
    case_run = execution.prepare(case, "cpu", seed=0, backward=False)
    found = watched(execution.timed_call(case_run, impl, "forward"))
    assert found and found[0].startswith("host sync item")

    from kernels.ops import deform_roi_pool

    rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
    found = watched(lambda: deform_roi_pool.check_values(rois, 1))
    assert found[0].startswith("check check_values") and "host sync tolist" in found[1]


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize(("op_name", "name", "dtype"), list(_timed_calls("cuda")))
def test_the_timed_call_never_synchronises_on_a_gpu(op_name, name, dtype, direction):
    call = _call_of(op_name, name, dtype, "cuda", direction)
    torch.cuda.synchronize()
    with torch.no_grad() if direction == "forward" else torch.enable_grad():
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
