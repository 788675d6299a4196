"""Running a suite: every case × implementation × direction, one row each.

Rows are appended to the run directory as they finish. A failing or crashing
implementation becomes a ``fail`` or ``error`` row and the sweep goes on;
Ctrl-C stops after writing what finished; ``resume`` skips the rows a run
directory already holds. At the end a table sums up pass/fail and speedups.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import socket
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from harness import environment, execution, plugins, registry
from harness.results import RunDir, row_key
from harness.suites import Suite, SuiteCase
from harness.summary import print_summary
from harness.timing import TimingConfig, copy_bandwidth_gbps

EXIT_INTERRUPTED = 130


@dataclasses.dataclass(frozen=True)
class RunOptions:
    suite: Suite
    device: str = "cpu"
    ops: Sequence[str] = ()  # empty: every operator of the suite
    impls: Sequence[str] = ()  # empty: every implementation the suite names
    dtypes: Sequence[str] = ()  # empty: every dtype of the suite
    out: Path | None = None  # default: results/local/<UTC time>-<host>-<suite>
    resume: bool = False
    seed: int | None = None  # default: the suite's
    timing: TimingConfig | None = TimingConfig()  # None: check only
    counters: bool = False  # emulated kernels in counters mode, rows keep the counters

    @property
    def run_seed(self) -> int:
        return self.suite.seed if self.seed is None else self.seed


def default_out_dir(suite: str) -> Path:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path("results") / "local" / f"{stamp}-{socket.gethostname()}-{suite}"


def select(options: RunOptions) -> list[tuple[SuiteCase, list[registry.Implementation]]]:
    """The suite's cases and implementations that ``--op/--impl/--dtype`` keep.

    Each filter value must name something the suite has; implementations come
    baseline first, so the others' speedups are known when their rows are written.
    """
    suite = options.suite
    _check_choices("--op", options.ops, {sc.case.op.name for sc in suite.cases}, suite.name)
    _check_choices("--impl", options.impls, {i for sc in suite.cases for i in sc.impls}, suite.name)
    _check_choices("--dtype", options.dtypes, {sc.case.dtype for sc in suite.cases}, suite.name)
    selected = []
    for suite_case in suite.cases:
        op = suite_case.case.op
        if options.ops and op.name not in options.ops:
            continue
        if options.dtypes and suite_case.case.dtype not in options.dtypes:
            continue
        names = [n for n in suite_case.impls if not options.impls or n in options.impls]
        names.sort(key=lambda name: name != op.baseline)
        if names:
            selected.append((suite_case, [registry.get_implementation(op.name, n) for n in names]))
    return selected


def _check_choices(flag: str, given: Sequence[str], choices: set[str], suite: str) -> None:
    for value in given:
        if value not in choices:
            raise ValueError(f"{flag}: {value!r} is not in suite {suite}; "
                             f"expected one of: {', '.join(sorted(choices))}")


def _directions(suite_case: SuiteCase) -> list[str]:
    return ["forward", "backward"] if suite_case.backward else ["forward"]


def _open_run_dir(options: RunOptions) -> tuple[RunDir, dict, list[dict]]:
    """Create the run directory, or reopen it with ``resume``; its metadata and rows."""
    suite = options.suite
    run_dir = RunDir(options.out or default_out_dir(suite.name))
    if not options.resume:
        metadata = {
            "run_id": run_dir.path.name,
            "suite": {"name": suite.name, "path": str(suite.path),
                      "sha256": suite.sha256, "description": suite.description},
            "device": options.device,
            "seed": options.run_seed,
            "selection": {"ops": list(options.ops), "impls": list(options.impls),
                          "dtypes": list(options.dtypes)},
            "timing": dataclasses.asdict(options.timing) if options.timing else None,
            "plugins": dict(plugins.LOADED),
            "counters": options.counters,
            **environment.collect(options.device),
        }
        return run_dir, run_dir.create(metadata), []
    metadata, rows = run_dir.reopen()
    # A run's identity: the suite by name and by content (a file of the same name
    # with other sweeps is another suite), where, with which seed and how timed;
    # rows made otherwise would be foreign to it.
    timing = dataclasses.asdict(options.timing) if options.timing else None
    expected = {"suite": suite.name, "suite sha256": suite.sha256, "device": options.device,
                "seed": options.run_seed, "timing": json.loads(json.dumps(timing))}
    found = {"suite": metadata["suite"]["name"], "suite sha256": metadata["suite"].get("sha256"),
             "device": metadata.get("device"), "seed": metadata.get("seed"),
             "timing": metadata.get("timing")}
    for key, value in expected.items():
        if found[key] != value:
            raise ValueError(f"--resume: {run_dir.path} was run with {key} {found[key]!r}, "
                             f"this run asks for {value!r}; resume it as it was run, or "
                             "start a new run in another --out")
    git = environment.git_state()
    metadata.setdefault("resumed", []).append({"time": environment.utc_now(), "git": git})
    run_dir.write_metadata(metadata)
    return run_dir, metadata, rows


def _copy_bandwidth(options: RunOptions, run_dir: RunDir, metadata: dict,
                    console: Console) -> None:
    """The device's copy bandwidth, measured once per run and kept in the metadata
    (the roofline metric reads it there)."""
    if options.timing is not None and metadata.get("copy_bandwidth_gbps") is None:
        with console.status(f"measuring {options.device} copy bandwidth"):
            metadata["copy_bandwidth_gbps"] = copy_bandwidth_gbps(options.device, options.timing)
        run_dir.write_metadata(metadata)


def run_suite(options: RunOptions, console: Console | None = None) -> int:
    """Run the selected cases; returns the exit status (0, 1 on any fail/error, 130 on Ctrl-C)."""
    console = console or Console()
    selected = select(options)
    environment.use_contract_precision()  # before collect(): the metadata records it
    run_dir, metadata, rows = _open_run_dir(options)
    console.print(f"run directory: [bold]{escape(str(run_dir.path))}")
    _copy_bandwidth(options, run_dir, metadata, console)
    done = {row_key(row) for row in rows}
    baselines: dict[tuple[str, str], dict] = {}
    for row in rows:
        _note_baseline(baselines, row)
    pending = [
        (suite_case, [(impl, d) for impl in impls for d in _directions(suite_case)
                      if (suite_case.case.id, impl.name, d) not in done])
        for suite_case, impls in selected
    ]
    pending = [(suite_case, todo) for suite_case, todo in pending if todo]
    interrupted = False
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(options.suite.name, total=sum(len(todo) for _, todo in pending))
        try:
            for suite_case, todo in pending:
                progress.update(task, description=suite_case.case.id)
                for row in _run_case(suite_case, todo, options, metadata, baselines):
                    stored = run_dir.append(row)
                    rows.append(stored)
                    _note_baseline(baselines, stored)
                    if row.status in ("fail", "error"):
                        # soft_wrap: the command stays on one line, to copy from a CI log
                        console.print(
                            f"[red]{row.status}[/] {escape(row.case_id)} {row.impl} "
                            f"{row.direction}: {escape(row.reason)}\n"
                            f"  reproduce: {escape(row.reproduce)}",
                            highlight=False, soft_wrap=True,
                        )
                    progress.advance(task)
        except KeyboardInterrupt:
            interrupted = True
    print_summary(rows, console)
    console.print(f"results: [bold]{escape(str(run_dir.path))}")
    if interrupted:
        console.print(f"[yellow]interrupted: the finished rows are saved; add "
                      f"--resume --out {escape(str(run_dir.path))} to finish the run")
        return EXIT_INTERRUPTED
    return 1 if any(row["status"] in ("fail", "error") for row in rows) else 0


def _note_baseline(baselines: dict[tuple[str, str], dict], row: dict) -> None:
    """Keep the baseline's timed row of a (case, direction): the others' metrics
    (speedup) read it."""
    if row["impl"] == registry.get_operator(row["op"]).baseline and row["time_median_ms"]:
        baselines[(row["case_id"], row["direction"])] = row


def _run_case(suite_case: SuiteCase, todo: list[tuple[registry.Implementation, str]],
              options: RunOptions, metadata: dict, baselines: dict[tuple[str, str], dict]):
    """Yield the rows of one case, one (implementation, direction) at a time."""
    case = suite_case.case
    runs_backward = any(d == "backward" for _, d in todo) and execution.wants_backward(case) is None
    try:
        case_run = execution.prepare(case, options.device, options.run_seed, runs_backward)
    except Exception as exc:  # bad inputs or a failing reference: every row of the case says so
        yield from execution.unprepared_rows(case, todo, options.device, options.run_seed, exc)
        return
    for impl, direction in todo:
        row, _ = execution.run(case_run, impl, direction, options.timing, metadata,
                               baselines.get((case.id, direction)), counters=options.counters)
        yield row

