"""Performance counters of our kernels without a GPU: the emulator's counters mode
on a case or a suite, per kernel, with the modelled time floor (docs/counters.md).

    dcnbench counters OP --impl IMPL [--param K=V ...] [--dtype D] [--mode M] [--backward]
                         [--gpu h200|a100]
    dcnbench counters --suite counters [--gpu GPU] [--check BASELINE] [--update BASELINE]

Counters are deterministic for a given case and seed (they count addresses, not
time), so a suite's counters are compared with a committed baseline
(``results/counters/baseline.json``): ``--check`` fails when a kernel's sectors,
atomic sectors or modelled floor grow by more than ``GATE_GROWTH``; ``--update``
rewrites the baseline (commit it with the kernel change that moved it, saying why).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from harness import execution, registry, suites
from harness.cases import Case

GATE_GROWTH = 0.02  # a kernel may grow a gated counter by at most 2 %
GATED = ("sectors", "atomic_sectors", "floor_s")
BASELINE = Path("results") / "counters" / "baseline.json"
DEFAULT_GPU = "h200"
KINDS = ("load", "store", "atomic")


@dataclasses.dataclass(frozen=True)
class KernelCounters:
    """One kernel's counters over its launches in one case × implementation × direction."""

    case_id: str
    op: str
    impl: str
    direction: str
    dtype: str
    kernel: str
    launches: int
    threads: int
    blocks: int
    requests: dict[str, int]  # keyed by KINDS
    sectors_by_kind: dict[str, int]
    bytes_useful: dict[str, int]
    dram_bytes: int
    shared_requests: int  # shared-memory requests, every kind
    shared_wavefronts: int  # their wavefronts: shared_requests when no bank conflicts
    floor_s: float  # modelled, on the run's GPU
    bound: str  # the resource that sets the floor

    @property
    def key(self) -> str:
        return f"{self.case_id} {self.impl} {self.direction} {self.kernel}"

    @property
    def sectors(self) -> int:
        return sum(self.sectors_by_kind.values())

    @property
    def atomic_sectors(self) -> int:
        return self.sectors_by_kind["atomic"]

    def sectors_per_request(self, kind: str) -> float:
        return self.sectors_by_kind[kind] / self.requests[kind] if self.requests[kind] else 0.0

    @property
    def efficiency(self) -> float:
        """Useful bytes over the bytes of every sector moved, all kinds together."""
        return sum(self.bytes_useful.values()) / (32 * self.sectors) if self.sectors else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "sectors": self.sectors,
                "atomic_sectors": self.atomic_sectors}


@dataclasses.dataclass(frozen=True)
class CaseCounters:
    """The kernels of one case × implementation × direction, and their sum."""

    case: Case
    impl: str
    direction: str
    gpu: str
    kernels: tuple[KernelCounters, ...]
    ideal_bytes: float | None  # the operator's own bytes for this direction
    floor_s: float  # of all kernels' traffic, one after another

    @property
    def roofline_fraction(self) -> float | None:
        """Modelled: the ideal bytes at DRAM bandwidth over the floor."""
        from kernels.emulator import gpu_model

        if self.ideal_bytes is None or not self.floor_s:
            return None
        return self.ideal_bytes / gpu_model.gpu_rates(self.gpu).dram_bytes_per_s / self.floor_s


def kernel_implementations(op: str) -> list[registry.Implementation]:
    """Our kernels of ``op``: the implementations the emulator runs on the CPU."""
    return [i for i in registry.implementations_of(op) if i.kind == "kernel"
            and i.is_emulated("cpu")]


def check_implementation(op: str, impl: str) -> registry.Implementation:
    ours = kernel_implementations(op)
    found = next((i for i in ours if i.name == impl), None)
    if found is None:
        names = ", ".join(i.name for i in ours) or "none"
        raise ValueError(f"--impl: expected one of {op}'s kernel implementations ({names}), "
                         f"got {impl!r}; counters count our CUDA kernels only")
    return found


@contextlib.contextmanager
def counting() -> Iterator[list]:
    """Runs the ``with`` block's emulated launches in counters mode; yields the
    list their LaunchCounters are appended to."""
    from kernels import emulator

    with emulator.mode("counters"), emulator.recording() as launches:
        yield launches


def skip_reason(case: Case, impl: registry.Implementation, direction: str) -> str | None:
    """The runner's reason to skip the row on the CPU, where the counters run."""
    return execution.skip_reason(case, impl, direction, "cpu")


def measure(case: Case, impl: registry.Implementation, direction: str, seed: int) -> list:
    """The LaunchCounters of ``impl`` on ``case`` in ``direction``: for the
    backward, the launches of the gradient computation only."""
    op, dtype = case.op, registry.DTYPES[case.dtype]
    generator = torch.Generator().manual_seed(seed)
    inputs = op.make_inputs(case.params, dtype, "cpu", generator, case.mode)
    if direction == "forward":
        with torch.no_grad(), counting() as launches:
            impl.forward(inputs, case.params)
        return launches
    names = [spec.name for spec in op.tensors if spec.differentiable and spec.name in inputs
             and inputs[spec.name].is_floating_point()]
    leaves = {name: inputs[name].detach().requires_grad_() for name in names}
    out = impl.forward({**inputs, **leaves}, case.params)
    grad_output = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(dtype)
    with counting() as launches:
        torch.autograd.grad(out, list(leaves.values()), grad_output, materialize_grads=True)
    return launches


def summarize(case: Case, impl: str, direction: str, launches: Iterable, gpu: str
              ) -> CaseCounters:
    """Per-kernel sums of ``launches`` (in first-launch order) and the floors."""
    from kernels.emulator import gpu_model

    by_kernel: dict[str, list] = {}
    for launch in launches:
        by_kernel.setdefault(launch.kernel, []).append(launch)
    kernels = []
    for name, group in by_kernel.items():
        totals = {kind: sum((g.total(kind) for g in group[1:]), group[0].total(kind))
                  for kind in KINDS}
        model = gpu_model.floor(gpu_model.Traffic.of(group), gpu)
        kernels.append(KernelCounters(
            case.id, case.op.name, impl, direction, case.dtype, name, len(group),
            sum(g.threads for g in group), sum(g.blocks for g in group),
            {k: t.requests for k, t in totals.items()}, {k: t.sectors for k, t in totals.items()},
            {k: t.bytes_useful for k, t in totals.items()}, sum(g.dram_bytes for g in group),
            sum(g.shared[k].requests for g in group for k in KINDS),
            sum(g.shared[k].wavefronts for g in group for k in KINDS),
            model.seconds, model.bound))
    bytes_fn = case.op.bytes if direction == "forward" else case.op.backward_bytes
    ideal = (float(bytes_fn(case.params, registry.DTYPES[case.dtype].itemsize))
             if bytes_fn is not None else None)
    return CaseCounters(case, impl, direction, gpu, tuple(kernels), ideal,
                        sum(k.floor_s for k in kernels))


def row_metrics(summary: CaseCounters) -> dict[str, float]:
    """The flat numbers a result row stores in its ``counters`` field (docs/counters.md)."""
    metrics: dict[str, float] = {"launches": float(sum(k.launches for k in summary.kernels))}
    for kind in KINDS:
        requests = sum(k.requests[kind] for k in summary.kernels)
        sectors = sum(k.sectors_by_kind[kind] for k in summary.kernels)
        metrics[f"{kind}_requests"] = float(requests)
        metrics[f"{kind}_sectors"] = float(sectors)
        metrics[f"{kind}_sectors_per_request"] = sectors / requests if requests else 0.0
    useful = sum(sum(k.bytes_useful.values()) for k in summary.kernels)
    sectors = sum(k.sectors for k in summary.kernels)
    metrics["efficiency"] = useful / (32 * sectors) if sectors else 0.0
    metrics["dram_bytes"] = float(sum(k.dram_bytes for k in summary.kernels))
    metrics["shared_requests"] = float(sum(k.shared_requests for k in summary.kernels))
    metrics["shared_wavefronts"] = float(sum(k.shared_wavefronts for k in summary.kernels))
    metrics[f"modelled_floor_{summary.gpu}_s"] = summary.floor_s
    if summary.roofline_fraction is not None:
        metrics[f"modelled_roofline_fraction_{summary.gpu}"] = summary.roofline_fraction
    return metrics


# ------------------------------------------------------------------ suites --


def run_suite(suite: suites.Suite, gpu: str, console: Console | None = None
              ) -> list[CaseCounters]:
    """Every kernel implementation of every case, forward and (where it has one) backward."""
    results = []
    for suite_case in suite.cases:
        case = suite_case.case
        for impl in kernel_implementations(case.op.name):
            if impl.name not in suite_case.impls:
                continue
            for direction in ("forward", "backward") if suite_case.backward else ("forward",):
                reason = skip_reason(case, impl, direction)
                if reason is not None:
                    continue
                if console is not None:
                    console.print(f"[dim]{case.id} {impl.name} {direction}", highlight=False)
                launches = measure(case, impl, direction, suite.seed)
                results.append(summarize(case, impl.name, direction, launches, gpu))
    return results


def baseline_document(suite: suites.Suite, gpu: str, results: Iterable[CaseCounters]) -> dict:
    return {
        "what": "counters of every kernel on the suite (dcnbench counters --suite); the "
                "floors are modelled, not measured: docs/counters.md",
        "suite": suite.name, "suite_sha256": suite.sha256, "seed": suite.seed, "gpu": gpu,
        "kernels": {k.key: k.as_json() for r in results for k in r.kernels},
        # Not gated: what the report's counters page sets the kernels against.
        "cases": {f"{r.case.id} {r.impl} {r.direction}": {
            "op": r.case.op.name, "dtype": r.case.dtype, "ideal_bytes": r.ideal_bytes,
            "floor_s": r.floor_s, "roofline_fraction": r.roofline_fraction} for r in results},
    }


def gate(baseline: dict, current: dict, growth: float = GATE_GROWTH) -> list[str]:
    """What grew by more than ``growth`` (or appeared, or went) against the baseline."""
    problems = []
    if baseline["gpu"] != current["gpu"]:
        return [f"the baseline models {baseline['gpu']}, this run {current['gpu']}"]
    old, new = baseline["kernels"], current["kernels"]
    for key in sorted(old.keys() - new.keys()):
        problems.append(f"{key}: in the baseline, not in this run")
    for key in sorted(new.keys() - old.keys()):
        problems.append(f"{key}: not in the baseline")
    for key in sorted(old.keys() & new.keys()):
        for metric in GATED:
            before, after = old[key][metric], new[key][metric]
            if after > before * (1 + growth) and after - before > 1e-15:
                change = f"+{100 * (after / before - 1):.1f}%" if before else "from 0"
                problems.append(f"{key}: {metric} {before:.6g} -> {after:.6g} ({change})")
    return problems


# ------------------------------------------------------------------ tables --


def occupancy(kernels: Iterable[str]) -> dict[str, str]:
    """ptxas's registers and theoretical occupancy on sm_90 of each kernel (the build
    check's, `dcnbench kernels`), compiling only the sources that hold them."""
    from kernels import build_check, cuda_sources

    wanted = set(kernels)
    files = [name for name, source in cuda_sources.load_all().items()
             if wanted & set(source.name_expressions)]
    result = build_check.check_kernels(archs=("sm_90",), only=files)
    return {k.kernel: f"{k.occupancy.percent:.0f}% ({k.resources.registers} regs)"
            for k in result.kernels if k.kernel in wanted and k.occupancy is not None}


def print_table(results: Iterable[CaseCounters], console: Console, gpu: str,
                occupancy: dict[str, str] | None = None) -> None:
    """The counters of every kernel of ``results``; with ``occupancy`` (kernel ->
    text), a column of it."""
    from kernels.emulator import gpu_model

    table = Table(title=f"counters per kernel (emulated; floor modelled on "
                        f"{gpu_model.gpu_rates(gpu).name})", title_justify="left")
    for header in ("case", "impl", "dir", "kernel", "launches", "threads", "ld sect/req",
                   "st sect/req", "efficiency", "atomic sectors", "smem wf/req", "DRAM MB",
                   "ideal MB",
                   "floor µs", "bound", "roofline", *(["sm_90 occupancy"] if occupancy else [])):
        table.add_column(header, justify="left" if header in ("case", "kernel") else "right")
    for result in results:
        for i, k in enumerate(result.kernels):
            if i == 0 and table.row_count:
                table.add_section()
            last = i == len(result.kernels) - 1
            ideal = f"{result.ideal_bytes / 1e6:.3f}" if last and result.ideal_bytes else ""
            fraction = result.roofline_fraction if last else None
            table.add_row(
                k.case_id if i == 0 else "", k.impl, {"forward": "fwd", "backward": "bwd"}[k.direction], k.kernel, str(k.launches), str(k.threads),
                f"{k.sectors_per_request('load'):.2f}", f"{k.sectors_per_request('store'):.2f}",
                f"{k.efficiency:.1%}", str(k.atomic_sectors),
                f"{k.shared_wavefronts / k.shared_requests:.2f}" if k.shared_requests else "",
                f"{k.dram_bytes / 1e6:.3f}", ideal,
                f"{k.floor_s * 1e6:.2f}", k.bound, f"{fraction:.0%}" if fraction else "",
                *([occupancy.get(k.kernel, "")] if occupancy else []))
    # Wide: CI logs are not terminals, and rich would squeeze the table to 80 columns.
    Console(file=console.file, width=max(console.width, 220)).print(table)


def print_buffers(launches: Iterable, console: Console) -> None:
    """Per kernel and array argument: sectors by kind and the distinct sectors (a
    perfect cache's DRAM traffic), summed over the kernel's launches."""
    table = Table(title="per buffer (emulated)", title_justify="left")
    for header in ("kernel", "buffer", "MB", "load sectors", "store sectors", "atomic sectors",
                   "distinct read", "distinct written"):
        table.add_column(header, justify="left" if header in ("kernel", "buffer") else "right")
    sums: dict[tuple[str, str], list[int]] = {}
    for launch in launches:
        for b in launch.buffers:
            row = sums.setdefault((launch.kernel, b.name), [0] * 6)
            values = (b.nbytes, *(b.access[kind].sectors for kind in KINDS),
                      b.distinct_read_sectors, b.distinct_written_sectors)
            row[:] = [a + v for a, v in zip(row, values, strict=True)]
    for (kernel, name), (nbytes, *sectors) in sums.items():
        table.add_row(kernel, name, f"{nbytes / 1e6:.3f}", *(str(v) for v in sectors))
    Console(file=console.file, width=max(console.width, 160)).print(table)


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------- the command --


def add_arguments(parser) -> None:
    """The arguments of ``dcnbench counters``."""
    from kernels.emulator import gpu_model

    parser.add_argument("op", nargs="?", metavar="OP", help="operator (or --suite)")
    parser.add_argument("--impl", metavar="IMPL", help="one of the operator's kernels")
    parser.add_argument("--param", action="extend", nargs="+", default=[], metavar="NAME=VALUE",
                        help="parameter values; the others keep their defaults")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mode", default="random", help="input mode (see `dcnbench list`)")
    parser.add_argument("--backward", action="store_true",
                        help="count the backward's kernels instead of the forward's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu", default=DEFAULT_GPU, choices=tuple(gpu_model.GPUS),
                        help=f"GPU of the modelled floor (default {DEFAULT_GPU})")
    parser.add_argument("--occupancy", action="store_true",
                        help="add each kernel's sm_90 registers and occupancy (NVRTC + ptxas, "
                             "as `dcnbench kernels`; a few seconds per source)")
    parser.add_argument("--suite", metavar="NAME|PATH",
                        help="count every kernel of a suite instead of one case")
    parser.add_argument("--check", type=Path, metavar="BASELINE",
                        help="with --suite: exit 1 when a kernel's sectors, atomic sectors or "
                             f"modelled floor grew by more than {GATE_GROWTH * 100:.0f}%% over BASELINE")
    parser.add_argument("--update", type=Path, metavar="BASELINE",
                        help="with --suite: write the counters as the new BASELINE")


def main(args, console: Console) -> int:
    from harness.cases import make_case
    from harness.cli import UsageError, _parse_params

    if args.suite is None:
        if args.op is None or args.impl is None:
            raise UsageError("counters: expected OP --impl IMPL, or --suite NAME")
        if args.check or args.update:
            raise UsageError("--check / --update: need --suite")
        op = registry.get_operator(args.op)
        impl = check_implementation(op.name, args.impl)
        case = make_case(op, _parse_params(args.param), args.dtype, args.mode)
        direction = "backward" if args.backward else "forward"
        reason = skip_reason(case, impl, direction)
        if reason is not None:
            raise UsageError(f"{case.id} {impl.name} {direction}: {reason}")
        launches = measure(case, impl, direction, args.seed)
        results = [summarize(case, impl.name, direction, launches, args.gpu)]
        print_table(results, console, args.gpu, _occupancy_if(args, results))
        print_buffers(launches, console)
        return 0
    if args.op is not None:
        raise UsageError(f"counters: give OP or --suite, not both (got {args.op!r} and --suite)")
    suite = suites.load(args.suite)
    registry.load_all()
    results = run_suite(suite, args.gpu, console)
    print_table(results, console, args.gpu, _occupancy_if(args, results))
    document = baseline_document(suite, args.gpu, results)
    if args.update:
        write_json(args.update, document)
        console.print(f"wrote the baseline [bold]{args.update}")
    if args.check:
        if not args.check.is_file():
            raise UsageError(f"--check: no baseline at {args.check} (write one with --update)")
        problems = gate(json.loads(args.check.read_text()), document)
        if problems:
            console.print(f"[bold red]{len(problems)} counter(s) moved beyond the gate "
                          f"({GATE_GROWTH:.0%}) against {args.check}:", highlight=False)
            for problem in problems:
                console.print(f"  {problem}", highlight=False, markup=False)
            console.print("A kernel change that moves them updates the baseline in the same "
                          f"commit (dcnbench counters --suite {suite.name} --update "
                          f"{args.check}), saying why.", highlight=False)
            return 1
        console.print(f"counters gate: {len(document['kernels'])} kernels within "
                      f"{GATE_GROWTH:.0%} of {args.check}")
    return 0


def _occupancy_if(args, results: list[CaseCounters]) -> dict[str, str] | None:
    return occupancy(k.kernel for r in results for k in r.kernels) if args.occupancy else None
