"""The ``dcnbench`` command line (also ``python -m harness`` from a plain checkout).

    dcnbench [--plugin MODULE ...] COMMAND ...
    dcnbench list [--json]
    dcnbench run --suite NAME|PATH [--device cpu|cuda|counters] [--op OP ...] [--impl IMPL ...]
                 [--dtype DTYPE ...] [--out DIR] [--resume] [--seed S] [--no-timing]
                 [--cuda-graph] [--warmup-ms MS] [--rep-ms MS]
                 [--workers N | --devices cuda:0,cuda:1|all] [--executor local|ray [--address A]]
                 [--case-timeout S] [--memory-limit-gb GB] [--shard K/N]
    dcnbench merge RUN_DIR... -o RUN_DIR
    dcnbench case OP [--param NAME=VALUE ...] [--dtype DTYPE] [--mode MODE] [--impl NAME]
                  [--device cpu|cuda] [--seed S] [--backward] [--save FILE.npz]
    dcnbench kernels [...]   (the NVRTC build check: kernels.build_check)
    dcnbench counters OP --impl IMPL [--param K=V ...] [--gpu h200] | --suite NAME [--check B]
    dcnbench report RUN_DIR... [-o SITE_DIR] [--case FILE.npz ...]
    dcnbench compare BASE NEW [--fail-above PCT] [--min-effect PCT] [--all]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness import (
    casefile,
    environment,
    execution,
    plugins,
    registry,
    results,
    runner,
    suites,
    workers,
)
from harness.cases import format_value, make_case
from harness.timing import TimingConfig

EXIT_USAGE = 2


class UsageError(ValueError):
    """A bad argument; the message names it and says what was expected."""


# The seed reaches torch.Generator.manual_seed and numpy, which take 64-bit values.
MAX_SEED = 2**63 - 1


def _seed(text: str) -> int:
    """argparse type of --seed: an integer in 0..MAX_SEED."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..2**63-1, got {text}")
    return value


def _number(low: float, *, above: bool = False):
    """argparse type of a finite number >= ``low`` (> with ``above``): NaN, an
    infinity or a negative time would disable a gate or a measurement silently."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise argparse.ArgumentTypeError(
                f"expected a finite number {'>' if above else '>='} {low:g}, got {text!r}")
        return value
    return parse


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device here (torch.cuda.is_available() is False)")


# ---------------------------------------------------------------------------- list


def _implementation_info(impl: registry.Implementation) -> dict:
    return {
        "name": impl.name,
        "kind": impl.kind,
        "devices": list(impl.devices),
        "emulated_on": list(impl.emulated_on),
        "dtypes": list(impl.dtypes),
        "has_backward": impl.has_backward,
        "description": impl.description,
        "unavailable": {d: impl.unavailable_on(d) for d in registry.DEVICES},
    }


def _operator_info(op: registry.Operator) -> dict:
    return {
        "name": op.name,
        "summary": op.summary,
        "params": dict(op.params),
        "tensors": [{"name": t.name, "shape": t.shape, "differentiable": t.differentiable,
                     "optional": t.optional} for t in op.tensors],
        "input_modes": list(op.input_modes),
        "forward_only_modes": list(op.forward_only_modes),
        "has_backward": op.has_backward,
        "baseline": op.baseline,
        "tolerances": {
            direction: {dtype: vars(tol) for dtype, tol in table.items()}
            for direction, table in (("forward", op.tolerances),
                                     ("backward", op.backward_tolerances or op.tolerances))
        },
        "case_tolerances": [
            {"params": dict(special.params), "dtype": special.dtype,
             "forward": vars(special.forward),
             "backward": vars(special.backward or special.forward)}
            for special in op.case_tolerances
        ],
        "implementations": [_implementation_info(i) for i in registry.implementations_of(op.name)],
    }


def _suite_info(name: str) -> dict:
    try:
        suite = suites.load(name)
    except suites.SuiteError as exc:
        return {"name": name, "error": str(exc)}
    return {"name": name, "description": suite.description, "cases": len(suite.cases)}


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    registry.load_all()
    info = {
        "operators": [_operator_info(op) for op in registry.OPERATORS.values()],
        "suites": [_suite_info(name) for name in suites.available_suites()],
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    ops = Table(title="operators", title_justify="left")
    for header in ("operator", "parameters (defaults)", "input modes", "baseline"):
        ops.add_column(header)
    impls = Table(title="implementations", title_justify="left")
    for header in ("operator", "implementation", "kind", "dtypes", "cpu", "cuda"):
        impls.add_column(header)
    tols = Table(title="tolerances (against the float64 reference)", title_justify="left")
    for header in ("operators", "directions", "dtype", "rel_l2", "max_abs", "why"):
        tols.add_column(header)
    # Operator families share their tolerances: one line for each bound, naming its
    # operators and the directions it judges.
    shared_tolerances: dict[tuple, dict[str, list[str]]] = {}
    for op in info["operators"]:
        params = ", ".join(f"{k}={format_value(v)}" for k, v in op["params"].items())
        modes = ", ".join(m + (" (forward only)" if m in op["forward_only_modes"] else "")
                          for m in op["input_modes"])
        ops.add_row(op["name"], params, modes, op["baseline"])
        for impl in op["implementations"]:
            where = [
                "[green]emulated" if device in impl["emulated_on"] and not reason
                else "[green]yes" if not reason else f"[dim]{reason}"
                for device, reason in impl["unavailable"].items()
            ]
            impls.add_row(op["name"], impl["name"], impl["kind"], ", ".join(impl["dtypes"]),
                          *where)
        bounds = [(direction, dtype, tol) for direction, table in op["tolerances"].items()
                  for dtype, tol in table.items()]
        for case in op["case_tolerances"]:
            # Its line names the cases it judges: "float32, allow_tf32=true".
            cases = ", ".join([case["dtype"], *(f"{name}={format_value(value)}"
                                                for name, value in case["params"].items())])
            bounds += [(direction, cases, case[direction]) for direction in ("forward", "backward")]
        for direction, dtype, tol in bounds:
            key = (dtype, tol["rel_l2"], tol["max_abs"], tol["why"])
            users = shared_tolerances.setdefault(key, {"ops": [], "directions": []})
            for kind, name in (("ops", op["name"]), ("directions", direction)):
                if name not in users[kind]:
                    users[kind].append(name)
    for (dtype, rel_l2, max_abs, why), users in shared_tolerances.items():
        tols.add_row(", ".join(users["ops"]), ", ".join(users["directions"]), dtype,
                     f"{rel_l2:.3g}", f"{max_abs:.3g}", why)
    suite_table = Table(title="suites", title_justify="left")
    for header in ("suite", "cases", "description"):
        suite_table.add_column(header)
    for suite in info["suites"]:
        suite_table.add_row(suite["name"], str(suite.get("cases", "")),
                            suite.get("description") or f"[red]{suite['error']}")
    for table in (ops, impls, tols, suite_table):
        console.print(table)
    return 0


# ---------------------------------------------------------------------------- run


def _parse_devices(text: str | None) -> tuple[int, ...]:
    """``--devices cuda:0,cuda:1`` or ``all`` as GPU indices."""
    if text is None:
        return ()
    if text == "all":
        count = torch.cuda.device_count()
        if count == 0:
            raise UsageError("--devices all: no CUDA device here")
        return tuple(range(count))
    indices = []
    for word in text.split(","):
        prefix, _, index = word.strip().partition(":")
        if prefix != "cuda" or not index.isdigit():
            raise UsageError(f"--devices: expected cuda:0,cuda:1,... or all, got {word!r}")
        if int(index) >= torch.cuda.device_count():
            raise UsageError(f"--devices: {word} is not here ({torch.cuda.device_count()} "
                             "CUDA devices)")
        indices.append(int(index))
    if len(set(indices)) != len(indices):
        raise UsageError(f"--devices: {text!r} names a GPU twice; one timing worker per GPU")
    return tuple(indices)


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise UsageError(f"--shard: expected K/N with 1 <= K <= N, got {text!r}")
    return int(index), int(count)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    # --device counters: the CPU, emulated kernels counted (docs/counters.md), nothing timed.
    counters = args.device == "counters"
    device = "cpu" if counters else args.device
    if args.devices and device != "cuda":
        raise UsageError(f"--devices: names GPUs; expected --device cuda, got {args.device}")
    devices = _parse_devices(args.devices)
    _check_device(device)
    if args.resume and args.out is None:
        raise UsageError("--resume: needs --out DIR naming the run directory to resume")
    suite = suites.load(args.suite)
    timing = None if args.no_timing or counters else TimingConfig(
        warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cuda_graph=args.cuda_graph)
    options = runner.RunOptions(
        suite=suite, device=device, ops=args.op, impls=args.impl, dtypes=args.dtype,
        out=args.out, resume=args.resume, seed=args.seed, timing=timing, counters=counters,
        workers=args.workers, devices=devices, case_timeout=args.case_timeout,
        memory_limit_gb=args.memory_limit_gb, shard=_parse_shard(args.shard),
        executor=args.executor, ray_address=args.address,
    )
    return runner.run_suite(options, console)


# ---------------------------------------------------------------------------- merge


def cmd_merge(args: argparse.Namespace, console: Console) -> int:
    merged = results.merge(args.run_dirs, args.out)
    for warning in merged.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    console.print(f"merged {merged.rows} rows of {len(args.run_dirs)} runs into "
                  f"[bold]{escape(str(args.out))}")
    if merged.missing:
        console.print(f"[red]missing: {len(merged.missing)}[/]", highlight=False)
        for what in merged.missing:
            console.print(f"  {escape(what)}", highlight=False, soft_wrap=True)
        return 1
    return 0


# ---------------------------------------------------------------------------- case


def _parse_params(pairs: Sequence[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--param: expected NAME=VALUE, got {pair!r}")
        params[name] = value
    return params


def cmd_case(args: argparse.Namespace, console: Console) -> int:
    _check_device(args.device)
    if args.save is not None and args.save.suffix != ".npz":
        raise UsageError(f"--save: expected a FILE.npz path, got {str(args.save)!r}")
    op = registry.get_operator(args.op)
    case = make_case(op, _parse_params(args.param), args.dtype, args.mode)
    impl = (registry.get_implementation(op.name, args.impl) if args.impl
            else registry.reference_of(op.name))
    if args.backward and (reason := execution.wants_backward(case)):
        raise UsageError(f"--backward: {reason}")
    where = "emulated on cpu" if impl.is_emulated(args.device) else f"on {args.device}"
    console.print(f"case [bold]{case.id}[/] · {impl.name} {where} · seed {args.seed}")
    todo = [(impl, d) for d in (["forward", "backward"] if args.backward else ["forward"])]
    environment.use_contract_precision()  # as in `run`, so the case reproduces its row
    try:
        case_run = execution.prepare(case, args.device, args.seed, args.backward)
    except Exception as exc:
        rows = execution.unprepared_rows(case, todo, args.device, args.seed, exc)
        case_run, tensors = None, {}
    else:
        results = [execution.run(case_run, impl, d, None) for impl, d in todo]
        rows = [row for row, _ in results]
        tensors = {name: t for _, produced in results for name, t in produced.items()}
    table = Table(title_justify="left")
    for header in ("direction", "status", "worst", "rel_l2", "max_abs", "tolerance",
                   "non-finite", "reason"):
        table.add_column(header)
    for row in rows:
        table.add_row(
            row.direction, row.status, row.worst_tensor or "-",
            *(f"{v:.3g}" if v is not None else "-" for v in (row.rel_l2, row.max_abs)),
            f"{row.tol_rel_l2:.3g} / {row.tol_max_abs:.3g}" if row.tol_rel_l2 is not None
            else "-",
            str(row.nonfinite) if row.nonfinite is not None else "-",
            escape(row.reason),
        )
    console.print(table)
    for row in rows:
        if row.traceback:
            console.print(row.traceback, highlight=False, markup=False)
    failed = [row for row in rows if row.status in ("fail", "error")]
    if args.save is not None:
        if case_run is None:
            raise UsageError("--save: the case's inputs could not be made; nothing to save")
        worst = failed[0].status if failed else rows[-1].status
        casefile.save(args.save, case_run, impl.name, tensors, worst)
        console.print(f"saved [bold]{args.save}")
    return 1 if failed else 0


# ---------------------------------------------------------------------------- kernels


def cmd_kernels(args: argparse.Namespace, console: Console) -> int:
    # The build check is kernels' own program (it pulls in NVRTC, which nothing else
    # needs): it runs as one, with every argument after "kernels"; the harness core
    # imports nothing of kernels.
    command = [sys.executable, "-m", "kernels.build_check", *args.kernel_args]
    return subprocess.call(command)


# ---------------------------------------------------------------------------- counters


def cmd_counters(args: argparse.Namespace, console: Console) -> int:
    from harness import counters  # imported here: it loads the emulator

    return counters.main(args, console)


# ---------------------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    # Imported here: the site needs plotly and jinja2, which the run paths (and the GPU
    # machines) do without.
    try:
        import jinja2  # noqa: F401
        import plotly  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UsageError(f"the report needs {exc.name}, which is not installed; install the "
                         "report extra: pip install -e '.[report]'") from None
    from reports import site

    built = site.build(args.run_dirs, args.out, cases=args.case)
    console.print(f"report: {len(built.pages)} pages from {built.rows} rows of "
                  f"{built.runs} runs in {built.seconds:.1f} s")
    console.print(f"open [bold]{built.index.resolve().as_uri()}")
    return 0


# ---------------------------------------------------------------------------- compare


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    from harness import compare

    comparison = compare.compare_runs(args.base, args.new, args.min_effect / 100)
    compare.print_comparison(comparison, console, limit=None if args.all else 40)
    if args.fail_above is None:
        return 0
    slower = compare.regressions(comparison, args.fail_above)
    if len(slower):
        console.print(f"[bold red]{len(slower)} cases slower than {args.fail_above:g}% "
                      "beyond their noise")
        return 1
    return 0


# ---------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcnbench",
        description="Benchmark and check the deformable-convolution operators.",
    )
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import this plugin module first (implementations, operators, "
                             "metrics from outside the repository); repeatable")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("list", help="operators, implementations, tolerances, suites")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(handler=cmd_list)

    device = {"choices": registry.DEVICES, "default": _default_device(),
              "help": "where to run (default: cuda when there is a GPU, else cpu)"}

    p = commands.add_parser("run", help="run a suite and write a results directory")
    p.add_argument("--suite", required=True, metavar="NAME|PATH",
                   help=f"a suite in suites/ ({', '.join(suites.available_suites())}) "
                        "or a path to a .toml file")
    p.add_argument("--device", **{**device, "choices": (*registry.DEVICES, "counters"),
                                  "help": device["help"] + "; counters: the CPU with the "
                                  "emulator's counters in each row (docs/counters.md)"})
    p.add_argument("--op", action="extend", nargs="+", default=[], metavar="OP",
                   help="only these operators")
    p.add_argument("--impl", action="extend", nargs="+", default=[], metavar="IMPL",
                   help="only these implementations")
    p.add_argument("--dtype", action="extend", nargs="+", default=[], metavar="DTYPE",
                   help="only these dtypes")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="run directory (default: results/local/<UTC time>-<host>-<suite>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out, skipping the rows it already has")
    p.add_argument("--seed", type=_seed, help="seed of every case's inputs (default: the suite's)")
    p.add_argument("--no-timing", action="store_true", help="check correctness only")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time CUDA graph replays of each call (no launch overhead)")
    defaults = TimingConfig()
    p.add_argument("--warmup-ms", type=_number(0), default=defaults.warmup_ms, metavar="MS",
                   help=f"warm-up time per measurement (default {defaults.warmup_ms:g})")
    p.add_argument("--rep-ms", type=_number(0, above=True), default=defaults.rep_ms, metavar="MS",
                   help=f"measured time per measurement (default {defaults.rep_ms:g})")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="run the cases in N worker processes (a crash, hang or runaway "
                        "allocation becomes an error row); on the CPU they check in parallel "
                        "(default 0: in this process)")
    p.add_argument("--devices", metavar="cuda:0,cuda:1|all",
                   help="one timing worker per GPU, pinned by CUDA_VISIBLE_DEVICES")
    p.add_argument("--case-timeout", type=float, metavar="S",
                   help="seconds a worker may spend on one row before it is killed (default: "
                        f"the suite's case_timeout, else {workers.DEFAULT_CASE_TIMEOUT_S:g})")
    p.add_argument("--memory-limit-gb", type=float, metavar="GB",
                   help="kill a local worker whose resident memory grows past GB")
    p.add_argument("--shard", metavar="K/N",
                   help="run the K-th of N cost-balanced shares of the cases (Slurm arrays, "
                        "CI matrices; join them with `dcnbench merge`)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="ray: send the cases to a Ray cluster as tasks (pip install "
                        "dcnbench[ray])")
    p.add_argument("--address", metavar="ADDR",
                   help="the Ray cluster to join (default: start a local Ray instance)")
    p.set_defaults(handler=cmd_run)

    p = commands.add_parser("merge", help="join shard runs of one suite into one run")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="the shard runs")
    p.add_argument("-o", "--out", type=Path, required=True, metavar="RUN_DIR",
                   help="the merged run directory (must not exist yet)")
    p.set_defaults(handler=cmd_merge)

    p = commands.add_parser("case", help="run one case, optionally saving it as .npz")
    p.add_argument("op", metavar="OP", help="operator name (see `dcnbench list`)")
    p.add_argument("--param", action="extend", nargs="+", default=[], metavar="NAME=VALUE",
                   help="parameter values; the others keep their defaults")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--mode", default="random", help="input mode (see `dcnbench list`)")
    p.add_argument("--impl", metavar="NAME", help="implementation (default: the reference)")
    p.add_argument("--device", **device)
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--backward", action="store_true", help="check the gradients too")
    p.add_argument("--save", type=Path, metavar="FILE.npz",
                   help="save inputs, output (and gradients) in the contract's .npz format")
    p.set_defaults(handler=cmd_case)

    # Its arguments belong to kernels.build_check, which runs as its own program:
    # main() hands over whatever follows "kernels".
    p = commands.add_parser("kernels", add_help=False,
                            help="NVRTC build check of every CUDA source (dcnbench kernels --help)")
    p.set_defaults(handler=cmd_kernels)

    p = commands.add_parser("counters", help="memory traffic of our kernels, counted by the "
                            "emulator, with a modelled floor (docs/counters.md)")
    from harness import counters

    counters.add_arguments(p)
    p.set_defaults(handler=cmd_counters)

    p = commands.add_parser("report", help="build the static HTML report of some runs")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run directories, or folders of them (e.g. results/)")
    p.add_argument("-o", "--out", type=Path, default=Path("site"), metavar="SITE_DIR",
                   help="where to write the site (default: site/)")
    p.add_argument("--case", action="extend", nargs="+", type=Path, default=[],
                   metavar="FILE.npz", help="saved cases (dcnbench case --save) to draw in "
                   "the sampling view (default: one case per deformable operator of the runs)")
    p.set_defaults(handler=cmd_report)

    p = commands.add_parser("compare", help="compare two runs case by case")
    p.add_argument("base", type=Path, metavar="BASE", help="the run directory to compare with")
    p.add_argument("new", type=Path, metavar="NEW", help="the run directory being judged")
    p.add_argument("--fail-above", type=_number(0), metavar="PCT",
                   help="exit 1 when any case is slower by more than PCT percent beyond its noise")
    p.add_argument("--min-effect", type=_number(0), default=2.0, metavar="PCT",
                   help="smallest change called faster or slower (default 2)")
    p.add_argument("--all", action="store_true", help="print every case, not the 40 extremes")
    p.set_defaults(handler=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "kernels":
        args.kernel_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    console = Console()
    try:
        with warnings.catch_warnings():
            # A warning (a damaged row a reader skipped) as one line, like the errors.
            warnings.showwarning = lambda message, *_: console.print(
                f"[yellow]dcnbench {args.command}: warning:[/] {escape(str(message))}",
                highlight=False)
            plugins.load(args.plugin)
            return args.handler(args, console)
    except (ValueError, LookupError, OSError) as exc:
        # Bad input (unknown names, malformed suites, unwritable paths): one clear line.
        console.print(f"[red]dcnbench {args.command}: error:[/] {escape(str(exc))}",
                      highlight=False)
        return EXIT_USAGE
    except KeyboardInterrupt:  # before a sweep started; a sweep handles its own
        return runner.EXIT_INTERRUPTED
