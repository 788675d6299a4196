"""Running implementations on one case: inputs, the float64 oracle, checks, timing.

``prepare`` draws a case's inputs once (seeded, rounded to the case's dtype)
and runs the reference on float64 copies of those very tensors: the oracle.
``run`` then runs one implementation in one direction on the same inputs,
judges it against the oracle and times it, and returns its result row. A
backward pass is autograd of the implementation's forward: the
differentiable inputs become leaves, and ``torch.autograd.grad`` with a
seeded ``grad_output`` gives one gradient per leaf.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Mapping
from typing import Any

import torch

from harness import checking, nvml, registry
from harness.cases import Case
from harness.results import Row
from harness.timing import Stats, TimingConfig, time_call

EMULATED_NOT_TIMED = "emulated: checked for correctness, never timed"
TIMING_OFF = "timing off"
TRACEBACK_LINES = 12


@dataclasses.dataclass
class CaseRun:
    """A case's inputs on the run's device and the reference's results on them."""

    case: Case
    device: str
    seed: int
    inputs: dict[str, torch.Tensor]
    differentiable: tuple[str, ...]  # the inputs that get gradients
    reference_device: str
    ref_output: torch.Tensor
    grad_output: torch.Tensor | None  # these two with the backward only
    ref_grads: dict[str, torch.Tensor] | None


def wants_backward(case: Case) -> str | None:
    """Why this case has no backward check, or None when it has one."""
    if not case.op.has_backward:
        return f"{case.op.name} has no backward"
    if case.mode in case.op.forward_only_modes:
        return (f"mode {case.mode!r} puts samples on a kink of the function: "
                "forward check only")
    return None


def _build_graph(forward, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                 names: tuple[str, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run ``forward`` with the ``names`` inputs as fresh leaves; the output and those leaves."""
    leaves = {name: inputs[name].detach().requires_grad_() for name in names}
    return forward({**inputs, **leaves}, params), list(leaves.values())


def _gradients(out: torch.Tensor, leaves: list[torch.Tensor], grad_output: torch.Tensor,
               retain_graph: bool = False) -> tuple[torch.Tensor, ...]:
    # An input the output does not depend on gets a zero gradient, as the reference's would.
    return torch.autograd.grad(out, leaves, grad_output, retain_graph=retain_graph,
                               materialize_grads=True)


def _reference_device(reference: registry.Implementation, device: str) -> str:
    """The oracle runs on the run's device when the reference can, else on the CPU."""
    return device if reference.unavailable_reason(device, "float64") is None else "cpu"


def prepare(case: Case, device: str, seed: int, backward: bool) -> CaseRun:
    """Draw the case's inputs and run the oracle (with its gradients when ``backward``).

    The generator is seeded with ``seed`` for every case, so a case's inputs
    depend on nothing but the case and the seed.
    """
    op = case.op
    generator = torch.Generator().manual_seed(seed)
    dtype = registry.DTYPES[case.dtype]
    inputs = op.make_inputs(case.params, dtype, device, generator, case.mode)
    names = tuple(
        spec.name for spec in op.tensors
        if spec.differentiable and spec.name in inputs and inputs[spec.name].is_floating_point()
    )
    reference = registry.reference_of(op.name)
    ref_device = _reference_device(reference, device)
    ref_inputs = {
        name: t.to(device=ref_device, dtype=torch.float64) if t.is_floating_point()
        else t.to(ref_device)
        for name, t in inputs.items()
    }
    grad_output = ref_grads = None
    if backward:
        out, leaves = _build_graph(reference.forward, ref_inputs, case.params, names)
        # Drawn after the inputs from the same generator, rounded like them.
        grad_output = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
        grads = _gradients(out, leaves, grad_output.to(device=ref_device, dtype=torch.float64))
        ref_output = out.detach()
        ref_grads = {f"grad_{name}": g for name, g in zip(names, grads, strict=True)}
        grad_output = grad_output.to(device)
    else:
        with torch.no_grad():
            ref_output = reference.forward(ref_inputs, case.params)
    for name, tensor in {"output": ref_output, **(ref_grads or {})}.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"the reference's {name} has {bad} non-finite values")
    return CaseRun(case, device, seed, inputs, names, ref_device, ref_output, grad_output,
                   ref_grads)


def _poisoned_outputs():
    """``kernels.launch.poisoned_outputs()``: kernel wrappers fill the outputs they
    allocate with NaN while it is active, so an element a kernel never writes
    cannot pass. Imported here, on first use, to keep ``kernels`` (and CuPy)
    out of the harness's import."""
    from kernels.launch import poisoned_outputs

    return poisoned_outputs()


def start_row(case: Case, impl: registry.Implementation, direction: str, device: str,
              seed: int) -> Row:
    """A row for ``impl`` on ``case`` with everything known before running it;
    ``skipped``, with the reason, when it does not run here."""
    row = Row(
        case_id=case.id,
        op=case.op.name,
        impl=impl.name,
        impl_kind=impl.kind,
        direction=direction,
        dtype=case.dtype,
        mode=case.mode,
        params=dict(case.params),
        seed=seed,
        device="emulated" if impl.is_emulated(device) else device,
        reproduce=case.reproduce_command(impl.name, device, seed, direction == "backward"),
    )
    reason = impl.unavailable_reason(device, case.dtype)
    if reason is None and direction == "backward":
        reason = wants_backward(case) or (None if impl.has_backward
                                          else f"{case.op.name}/{impl.name} has no backward")
    if reason is not None:
        row.status, row.reason = "skipped", reason
    return row


def unprepared_rows(case: Case, todo: list[tuple[registry.Implementation, str]], device: str,
                    seed: int, exc: Exception) -> list[Row]:
    """The rows of a case whose inputs or reference failed with ``exc``: errors, except
    those that would not have run anyway."""
    rows = [start_row(case, impl, direction, device, seed) for impl, direction in todo]
    for row in rows:
        if row.status != "skipped":
            record_error(row, exc, context="preparing the case: ")
    return rows


def record_error(row: Row, exc: BaseException, context: str = "") -> Row:
    row.status = "error"
    row.reason = f"{context}{type(exc).__name__}: {exc}"
    lines = "".join(traceback.format_exception(exc)).rstrip().splitlines()
    row.traceback = "\n".join(lines[-TRACEBACK_LINES:])
    return row


def run(case_run: CaseRun, impl: registry.Implementation, direction: str,
        timing: TimingConfig | None, copy_gbps: float | None = None,
        baseline_ms: float | None = None, counters: bool = False
        ) -> tuple[Row, dict[str, torch.Tensor]]:
    """Check and time ``impl`` on a prepared case in one direction.

    Returns the row and the tensors the implementation produced (``output``,
    and ``grad_<name>`` for the backward), for saving a case. An exception
    becomes an ``error`` row; it never propagates. With ``counters``, emulated
    kernels run in the emulator's counters mode and the row keeps their
    counters (docs/counters.md).
    """
    case = case_run.case
    row = start_row(case, impl, direction, case_run.device, case_run.seed)
    if row.status == "skipped":
        return row, {}
    row.reference_device = case_run.reference_device
    try:
        tensors = _check(row, case_run, impl, direction, counters)
    except Exception as exc:  # one implementation's failure must not stop the sweep
        return record_error(row, exc), {}
    if timing is None:
        row.timing_skipped = TIMING_OFF
    elif row.device == "emulated":
        row.timing_skipped = EMULATED_NOT_TIMED
    else:
        try:
            _time(row, case_run, impl, direction, timing, copy_gbps, baseline_ms)
        except Exception as exc:
            record_error(row, exc, context="timing: ")
    return row, tensors


def _counting(enabled: bool):
    """The emulator's counters mode around a call when ``enabled`` (imported on
    first use, as the kernels are); yields the list of launches it counted."""
    if not enabled:
        return contextlib.nullcontext([])
    from harness import counters

    return counters.counting()


def _check(row: Row, case_run: CaseRun, impl: registry.Implementation,
           direction: str, counters: bool = False) -> dict[str, torch.Tensor]:
    case, dtype = case_run.case, registry.DTYPES[case_run.case.dtype]
    with _poisoned_outputs():
        if direction == "forward":
            with torch.no_grad(), _counting(counters) as launches:
                out = impl.forward(case_run.inputs, case.params)
            tensors, refs = {"output": out}, {"output": case_run.ref_output}
        else:
            out, leaves = _build_graph(impl.forward, case_run.inputs, case.params,
                                       case_run.differentiable)
            with _counting(counters) as launches:  # the gradient's launches only
                grads = _gradients(out, leaves, case_run.grad_output)
            tensors = {f"grad_{n}": g for n, g in zip(case_run.differentiable, grads, strict=True)}
            refs = case_run.ref_grads
    errors = {name: checking.measure(tensors[name], ref, dtype, name) for name, ref in refs.items()}
    tol = case.op.tolerance(case.dtype, direction)
    verdict = checking.judge(errors, tol)
    row.status = "ok" if verdict.passed else "fail"
    row.reason = verdict.reason
    known = impl.known_inaccurate.get(case.dtype)
    if row.status == "fail" and known and verdict.nonfinite == 0:
        row.status, row.reason = "xfail", f"known inaccuracy ({known}): {verdict.reason}"
    row.rel_l2, row.max_abs, row.nonfinite = verdict.rel_l2, verdict.max_abs, verdict.nonfinite
    row.worst_tensor = verdict.worst
    row.tol_rel_l2, row.tol_max_abs = tol.rel_l2, tol.max_abs
    row.tensors = {name: dataclasses.asdict(e) for name, e in errors.items()}
    if launches:
        from harness import counters as counted

        row.counters = counted.row_metrics(counted.summarize(
            case, impl.name, direction, launches, counted.DEFAULT_GPU))
    return {name: t.detach() for name, t in tensors.items()}


def _time(row: Row, case_run: CaseRun, impl: registry.Implementation, direction: str,
          timing: TimingConfig, copy_gbps: float | None, baseline_ms: float | None) -> None:
    case, device = case_run.case, case_run.device
    if direction == "forward":
        def call():
            with torch.no_grad():
                return impl.forward(case_run.inputs, case.params)
    else:
        # Time the backward alone, on a graph built once and kept (retain_graph).
        out, leaves = _build_graph(impl.forward, case_run.inputs, case.params,
                                   case_run.differentiable)

        def call():
            return _gradients(out, leaves, case_run.grad_output, retain_graph=True)

        # Autograd runs each backward op on its forward's stream, which cannot join
        # a graph captured on another stream: backward is always timed eagerly.
        timing = dataclasses.replace(timing, cuda_graph=False)

    stats = time_call(call, device, timing)
    if device == "cuda":
        sensors = nvml.sensors()
        row.sm_clock_mhz, row.gpu_temp_c = sensors["sm_clock_mhz"], sensors["gpu_temp_c"]
    _record_timing(row, stats, case, direction, copy_gbps, baseline_ms)


def _record_timing(row: Row, stats: Stats, case: Case, direction: str,
                   copy_gbps: float | None, baseline_ms: float | None) -> None:
    """Timing statistics and what follows from them: TFLOP/s, GB/s, the fraction
    of the memory roofline, the speedup over the baseline."""
    row.timer = stats.timer
    row.time_median_ms, row.time_iqr_ms = stats.median_ms, stats.iqr_ms
    row.time_min_ms, row.time_samples, row.time_noisy = stats.min_ms, stats.samples, stats.noisy
    op, seconds = case.op, stats.median_ms * 1e-3
    itemsize = registry.DTYPES[case.dtype].itemsize
    flops_fn, bytes_fn = ((op.flops, op.bytes) if direction == "forward"
                          else (op.backward_flops, op.backward_bytes))
    if flops_fn is not None:
        row.flops = float(flops_fn(case.params))
        row.tflops = row.flops / seconds / 1e12
    if bytes_fn is not None:
        row.bytes = float(bytes_fn(case.params, itemsize))
        row.gbps = row.bytes / seconds / 1e9
        if copy_gbps:
            row.roofline_fraction = row.gbps / copy_gbps
    if row.impl == op.baseline:
        baseline_ms = stats.median_ms
    if baseline_ms is not None:
        row.speedup = baseline_ms / stats.median_ms
