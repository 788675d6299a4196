"""Host time per call of every kernel implementation, through the real CUDA code path.

    PYTHONPATH=. python scripts/host_overhead.py [--calls N] [--suite smoke] [--json FILE]

For each implementation of kind ``kernel``, on the first float32 case of the
suite for each operator: the CPU time of one call of what the harness times,
with ``kernels.launch``'s CUDA branch driven by the CuPy stand-in
(``kernels.emulator.cupy_shim``, ``run_kernels=False``: each launch is
configured, packed and recorded as on a GPU, and no kernel runs). That is the
host's cost of enqueueing the call: on a GPU it is what the events measured
whenever it exceeded the kernels' time. The stand-in's own bookkeeping (a
patched ``data_ptr``, the launch log) is in every number alike.

It works on a tree from before the prepare / call split too (implementations
registered as ``forward(inputs, params)``): there the timed call was
``forward(inputs, params)`` itself, checks included. Not a test: a measurement
for the timing notes (docs/timing.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from harness import execution, registry, suites
from kernels.emulator import cupy_shim


def timed_call(impl, inputs, params):
    """What the harness times: the prepared call, or (before the split) the forward."""
    if hasattr(impl, "prepare"):
        return impl.prepare(inputs, params)
    return lambda: impl.forward(inputs, params)


def host_us(call, calls: int) -> float:
    """Median CPU µs of one call, after a few unmeasured ones."""
    for _ in range(5):
        call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - start) / 1e3)
    return statistics.median(samples)


def first_cases(suite_name: str) -> dict[str, suites.SuiteCase]:
    found = {}
    for suite_case in suites.load(suite_name).cases:
        if suite_case.case.dtype == "float32":
            found.setdefault(suite_case.case.op.name, suite_case)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--suite", default="smoke")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    found = {}
    for op_name, suite_case in sorted(first_cases(args.suite).items()):
        case_run = execution.prepare(suite_case.case, "cpu", seed=0, backward=False)
        for impl in registry.implementations_of(op_name):
            if impl.kind != "kernel":
                continue
            with cupy_shim.emulated_gpu("H200", run_kernels=False), torch.no_grad():
                call = timed_call(impl, case_run.inputs, suite_case.case.params)
                name = f"{op_name}/{impl.name}"
                found[name] = {"case": suite_case.case.id, "host_us": host_us(call, args.calls)}
            print(f"{name:40s} {found[name]['host_us']:8.1f} µs", flush=True)
    if args.json:
        args.json.write_text(json.dumps(found, indent=2) + "\n")


if __name__ == "__main__":
    main()
