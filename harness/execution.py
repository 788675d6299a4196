"""Running implementations on one case: inputs, the float64 oracle, checks, timing.

``prepare`` draws a case's inputs once (seeded, rounded to the case's dtype)
and runs the reference on float64 copies of those very tensors: the oracle.
``run`` then prepares one implementation in one direction on the same inputs
(its ``prepare`` once: checks, conversions, host synchronisations), judges
its timed call's output against the oracle (under ``registry.CHECK_OBSERVERS``:
our kernels' outputs NaN-poisoned, their launches logged), times that call alone
(``harness.timing``), judges the last timed call's output again (a cache or
a race that the first call hides shows here) and returns its result row with
its metrics (``harness.metrics``). A backward pass is autograd of the
implementation's call: the differentiable inputs become leaves, and
``torch.autograd.grad`` with a seeded ``grad_output`` gives one gradient per
leaf; the timed call is that backward alone, on a graph built once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch

from harness import checking, determinism, metrics, nvml, registry, timing
from harness.cases import Case
from harness.results import Row, encode_samples
from harness.timing import Measurement, TimingConfig

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


def _build_graph(prepare, inputs: Mapping[str, torch.Tensor], params: Mapping[str, Any],
                 names: tuple[str, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prepare and call with the ``names`` inputs as fresh leaves; the output and those leaves."""
    leaves = {name: inputs[name].detach().requires_grad_() for name in names}
    return prepare({**inputs, **leaves}, params)(), list(leaves.values())


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
    generator = torch.Generator().manual_seed(seed)
    inputs = case.op.make_inputs(case.params, registry.DTYPES[case.dtype], device, generator,
                                 case.mode)
    return _with_oracle(case, device, seed, inputs, generator if backward else None)


def related_case_run(case_run: CaseRun, op_name: str) -> CaseRun:
    """``case_run`` as a case of the related operator ``op_name``: the parameters and
    inputs it takes, the same ``grad_output``, and its own reference's results (what
    judges a baseline that computes a related operator, ``Implementation.judged_as``)."""
    op = registry.get_operator(op_name)
    original = case_run.case
    # Parameters the related operator has and this case lacks keep their defaults.
    shared = {name: value for name, value in original.params.items() if name in op.params}
    case = Case(op, op.resolve(shared), original.dtype, original.mode)
    inputs = {spec.name: case_run.inputs[spec.name] for spec in op.tensors
              if spec.name in case_run.inputs}
    return _with_oracle(case, case_run.device, case_run.seed, inputs, case_run.grad_output)


def _with_oracle(case: Case, device: str, seed: int, inputs: dict[str, torch.Tensor],
                 grad_source: torch.Generator | torch.Tensor | None) -> CaseRun:
    """The case run of ``inputs``: the reference's output, and with ``grad_source`` (the
    generator ``grad_output`` is drawn from, or ``grad_output`` itself) its gradients."""
    op = case.op
    dtype = registry.DTYPES[case.dtype]
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
    if grad_source is not None:
        out, leaves = _build_graph(reference.prepare, ref_inputs, case.params, names)
        if isinstance(grad_source, torch.Generator):
            # Drawn after the inputs from the same generator, rounded like them.
            grad_output = torch.randn(out.shape, generator=grad_source,
                                      dtype=torch.float64).to(dtype).to(device)
        else:
            grad_output = grad_source
        grads = _gradients(out, leaves, grad_output.to(device=ref_device, dtype=torch.float64))
        ref_output = out.detach()
        ref_grads = {f"grad_{name}": g for name, g in zip(names, grads, strict=True)}
    else:
        with torch.no_grad():
            ref_output = reference.forward(ref_inputs, case.params)
    for name, tensor in {"output": ref_output, **(ref_grads or {})}.items():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"the reference's {name} has {bad} non-finite values")
    return CaseRun(case, device, seed, inputs, names, ref_device, ref_output, grad_output,
                   ref_grads)


def start_row(case: Case, impl: registry.Implementation, direction: str, device: str,
              seed: int) -> Row:
    """A row for ``impl`` on ``case`` with everything known before running it;
    ``skipped``, with the reason, when it does not run here or does not honour
    what the case asks (``Implementation.declined``)."""
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
    reason = skip_reason(case, impl, direction, device)
    if reason is not None:
        row.status, row.reason = "skipped", reason
    return row


def skip_reason(case: Case, impl: registry.Implementation, direction: str,
                device: str) -> str | None:
    """Why ``impl`` does not run ``case`` in ``direction`` on ``device``, or None: it
    cannot run there or take the dtype, does not honour what the case asks, or (the
    backward) has none or the case wants none."""
    reason = (impl.unavailable_reason(device, case.dtype)
              or impl.declined(case.op, case.params, device, direction))
    if reason is None and direction == "backward":
        reason = wants_backward(case) or (None if impl.has_backward
                                          else f"{case.op.name}/{impl.name} has no backward")
    return reason


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
        timing_config: TimingConfig | None, environment: Mapping[str, Any] | None = None,
        baseline: Mapping[str, Any] | None = None, counters: bool = False
        ) -> tuple[Row, dict[str, torch.Tensor]]:
    """Check and time ``impl`` on a prepared case in one direction.

    ``environment`` is the run's metadata and ``baseline`` the stored row of the
    operator's baseline on this case and direction, when it was timed: the
    metrics read them. Returns the row and the tensors the implementation
    produced (``output``, and ``grad_<name>`` for the backward), for saving a
    case. An exception becomes an ``error`` row; it never propagates. With
    ``counters``, emulated kernels run in the emulator's counters mode and the row
    keeps their counters (docs/counters.md).
    """
    case = case_run.case
    row = start_row(case, impl, direction, case_run.device, case_run.seed)
    if row.status == "skipped":
        return row, {}
    row.impl_source = impl.source
    if impl.judged_as:  # a baseline computing a related operator: that one's oracle judges it
        try:
            case_run = related_case_run(case_run, impl.judged_as)
        except Exception as exc:
            return record_error(row, exc, context=f"preparing {impl.judged_as}'s oracle: "), {}
    row.reference_device = case_run.reference_device
    # The forward is timed as inference: no autograd graph is recorded.
    with torch.no_grad() if direction == "forward" else contextlib.nullcontext():
        try:
            with contextlib.ExitStack() as stack:
                observed = [stack.enter_context(watch()) for watch in registry.CHECK_OBSERVERS]
                call = timed_call(case_run, impl, direction)
                # A backward counts the gradient's launches only.
                with _counting(counters, case, impl, direction) as counted:
                    tensors = _named(case_run, direction, call())
            for fields in observed:
                for name, value in fields().items():
                    setattr(row, name, value)
            _judge(row, case_run, impl, direction, tensors)
            row.counters = counted()
            if direction == "backward":
                row.deterministic = determinism.backward_is_reproducible(
                    impl.forward, case_run.inputs, case.params, case_run.differentiable,
                    case_run.grad_output)
        except Exception as exc:  # one implementation's failure must not stop the sweep
            return record_error(row, exc), {}
        if timing_config is None:
            row.timing_skipped = TIMING_OFF
        elif row.device == "emulated":
            row.timing_skipped = EMULATED_NOT_TIMED
        else:
            try:
                _time(row, case_run, impl, direction, call, timing_config, environment or {},
                      baseline)
            except Exception as exc:
                record_error(row, exc, context="timing: ")
    return row, tensors


def _counting(enabled: bool, case: Case, impl: registry.Implementation, direction: str):
    """Counts the emulated launches of the ``with`` block when ``enabled``
    (``registry.LAUNCH_COUNTERS``); its value gives the row's ``counters``."""
    if not enabled:
        return contextlib.nullcontext(lambda: None)
    (counter,) = registry.LAUNCH_COUNTERS
    return counter(case, impl.name, direction)


def timed_call(case_run: CaseRun, impl: registry.Implementation,
               direction: str) -> Callable[[], Any]:
    """``impl``'s timed call on the case: its prepared call for the forward; for the
    backward, the gradients of a graph built once (and kept: retain_graph)."""
    case = case_run.case
    if direction == "forward":
        return impl.prepare(case_run.inputs, case.params)
    out, leaves = _build_graph(impl.prepare, case_run.inputs, case.params,
                               case_run.differentiable)
    grad_output = case_run.grad_output
    return lambda: _gradients(out, leaves, grad_output, retain_graph=True)


def _named(case_run: CaseRun, direction: str, produced: Any) -> dict[str, torch.Tensor]:
    """A timed call's result by name: ``output``, or ``grad_<name>`` per leaf."""
    if direction == "forward":
        return {"output": produced.detach()}
    return {f"grad_{n}": g.detach()
            for n, g in zip(case_run.differentiable, produced, strict=True)}


def _verdict(case_run: CaseRun, direction: str, tensors: dict[str, torch.Tensor]):
    case = case_run.case
    refs = {"output": case_run.ref_output} if direction == "forward" else case_run.ref_grads
    errors = {name: checking.measure(tensors[name], ref,
                                     registry.DTYPES[case.op.expected_dtype(name, case.dtype)],
                                     name)
              for name, ref in refs.items()}
    tol = case.op.tolerance(case.dtype, direction, case.params)
    return errors, tol, checking.judge(errors, tol)


def _judge(row: Row, case_run: CaseRun, impl: registry.Implementation, direction: str,
           tensors: dict[str, torch.Tensor]) -> None:
    case = case_run.case
    errors, tol, verdict = _verdict(case_run, direction, tensors)
    row.status = "ok" if verdict.passed else "fail"
    row.reason = verdict.reason
    known = impl.known_inaccurate.get(case.dtype)
    if row.status == "fail" and known and verdict.nonfinite == 0:
        row.status, row.reason = "xfail", f"known inaccuracy ({known}): {verdict.reason}"
    row.rel_l2, row.max_abs, row.nonfinite = verdict.rel_l2, verdict.max_abs, verdict.nonfinite
    row.worst_tensor = verdict.worst
    row.tol_rel_l2, row.tol_max_abs = tol.rel_l2, tol.max_abs
    row.tensors = {name: dataclasses.asdict(e) for name, e in errors.items()}


def _recheck(row: Row, case_run: CaseRun, direction: str, output: Any) -> None:
    """Judge the last timed call's output like the first: a row whose first call
    passed fails when its last one does not (a stale cache, a race)."""
    if row.status != "ok":  # only a passing row has something to lose
        return
    _, _, verdict = _verdict(case_run, direction, _named(case_run, direction, output))
    row.rechecked = verdict.passed
    if not row.rechecked:
        row.status = "fail"
        row.reason = f"after timing, the last timed call's output: {verdict.reason}"
        row.rel_l2, row.max_abs, row.nonfinite = verdict.rel_l2, verdict.max_abs, verdict.nonfinite
        row.worst_tensor = verdict.worst


def _time(row: Row, case_run: CaseRun, impl: registry.Implementation, direction: str,
          call: Callable[[], Any], config: TimingConfig, environment: Mapping[str, Any],
          baseline: Mapping[str, Any] | None) -> None:
    case, device = case_run.case, case_run.device
    found = timing.measure(call, device, config)
    _recheck(row, case_run, direction, found.output)
    if device == "cuda":
        sensors = nvml.sensors()
        row.sm_clock_mhz, row.gpu_temp_c = sensors["sm_clock_mhz"], sensors["gpu_temp_c"]
    peak = timing.peak_memory_bytes(call, device)
    if peak is not None:
        row.measured["peak_memory_bytes"] = peak
    # A call may report on itself (torch_compile: graphs, recompiles, eager fallbacks).
    if hasattr(call, "row_values"):
        row.measured.update(call.row_values())
    record_timing(row, found)
    context = metrics.MetricContext(
        op=case.op, params=case.params, direction=direction, dtype=case.dtype, impl=impl.name,
        measurement=found, measured=row.measured, environment=environment, baseline=baseline,
        is_baseline=impl.name == registry.get_operator(row.op).baseline)
    row.flops, row.bytes = context.flops, context.bytes
    row.metrics = metrics.compute(context)


def record_timing(row: Row, found: Measurement) -> None:
    """The device time's summary and every measurement's samples."""
    device = found.device
    row.timer, row.timing_note = found.method, found.note or None
    row.time_median_ms, row.time_iqr_ms, row.time_min_ms = device.median, device.iqr, device.min
    row.time_samples, row.time_noisy = device.count, device.noisy
    measurements = {"time_ms": device, "host_us": found.host_us, "as_called_ms": found.as_called}
    row.samples = {name: encode_samples(stats.samples) for name, stats in measurements.items()
                   if stats is not None}
