"""Running a suite: every case × implementation × direction, one row each.

Rows are appended to the run directory as they finish, by this process alone
(it holds the directory's lock). A failing or crashing implementation becomes
a ``fail`` or ``error`` row and the sweep goes on; with workers
(``harness.workers``: ``workers``, ``devices``, or the Ray executor) so does a
case that kills its process, hangs or runs out of memory. Ctrl-C stops after
writing what finished; ``resume`` skips the rows a run directory already
holds; ``shard`` runs a balanced share of the cases. A row that cannot be
written (a full disk) stops the sweep the same way. At the end a table sums
up pass/fail and speedups.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import socket
from collections.abc import Iterator, Sequence
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

from harness import environment, plugins, registry, workers
from harness.results import RowNotWritten, RunDir, row_key
from harness.suites import Suite, SuiteCase
from harness.summary import print_summary
from harness.timing import TimingConfig, copy_bandwidth_gbps

EXIT_INTERRUPTED = 130
EXIT_NOT_WRITTEN = 74  # sysexits.h's EX_IOERR


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
    workers: int = 0  # 0: every case in this process; N: N worker processes (CPU)
    devices: Sequence[int] = ()  # CUDA: one timing worker per GPU index
    case_timeout: float | None = None  # seconds a worker's row may take (default: the suite's)
    memory_limit_gb: float | None = None  # a worker's resident memory limit
    shard: tuple[int, int] | None = None  # (K, N): the K-th of N balanced shares, from 1
    executor: str = "local"  # or "ray"
    ray_address: str | None = None  # an existing Ray cluster (default: a local instance)

    @property
    def run_seed(self) -> int:
        return self.suite.seed if self.seed is None else self.seed

    @property
    def in_workers(self) -> bool:
        return self.executor == "ray" or self.workers > 0 or bool(self.devices)

    @property
    def timeout(self) -> float:
        if self.case_timeout is not None:
            return self.case_timeout
        return self.suite.case_timeout or workers.DEFAULT_CASE_TIMEOUT_S


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


def case_cost(suite_case: SuiteCase, impls: Sequence[registry.Implementation]) -> float:
    """An estimate of a case's cost that depends on the suite alone (stable across
    machines): its floating-point operations per row, each row counted as at least
    a million (a row's fixed cost)."""
    op, params = suite_case.case.op, suite_case.case.params
    flops = {"forward": op.flops(params),
             "backward": (op.backward_flops or op.flops)(params)}
    return sum(max(flops[d], 1e6) for _ in impls for d in _directions(suite_case))


def shard_of(selected: list[tuple[SuiteCase, list[registry.Implementation]]],
             index: int, count: int) -> list[tuple[SuiteCase, list[registry.Implementation]]]:
    """The ``index``-th (from 1) of ``count`` shares of ``selected``, balanced by
    ``case_cost``: the costliest case first, each to the share with the least cost
    so far (ties: the lowest share, then the case id), so every machine computes
    the same shares. Keeps the suite's order within a share."""
    if not 1 <= index <= count:
        raise ValueError(f"--shard: expected K/N with 1 <= K <= N, got {index}/{count}")
    loads = [0.0] * count
    share = {}
    costs = sorted(((case_cost(sc, impls), sc.case.id) for sc, impls in selected),
                   key=lambda item: (-item[0], item[1]))
    for cost, case_id in costs:
        lightest = min(range(count), key=lambda k: loads[k])
        loads[lightest] += cost
        share[case_id] = lightest + 1
    return [(sc, impls) for sc, impls in selected if share[sc.case.id] == index]


def _check_choices(flag: str, given: Sequence[str], choices: set[str], suite: str) -> None:
    for value in given:
        if value not in choices:
            raise ValueError(f"{flag}: {value!r} is not in suite {suite}; "
                             f"expected one of: {', '.join(sorted(choices))}")


def _directions(suite_case: SuiteCase) -> list[str]:
    return ["forward", "backward"] if suite_case.backward else ["forward"]


def _execution_metadata(options: RunOptions) -> dict:
    return {"executor": options.executor if options.in_workers else "in-process",
            "workers": options.workers, "devices": list(options.devices),
            "case_timeout_s": options.timeout if options.in_workers else None,
            "memory_limit_gb": options.memory_limit_gb, "ray_address": options.ray_address}


def _open_run_dir(run_dir: RunDir, options: RunOptions, selected: list
                  ) -> tuple[dict, list[dict]]:
    """Create the run directory, or reopen it with ``resume``; its metadata and rows."""
    suite = options.suite
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
            "execution": _execution_metadata(options),
            **environment.collect(options.device),
        }
        if options.shard:
            metadata["shard"] = {"index": options.shard[0], "count": options.shard[1],
                                 "cases": {sc.case.id: len(impls) * len(_directions(sc))
                                           for sc, impls in selected}}
        return run_dir.create(metadata), []
    metadata, rows = run_dir.reopen()
    # A run's identity: the suite by name and by content (a file of the same name
    # with other sweeps is another suite), where, with which seed, which shard and how
    # timed; rows made otherwise would be foreign to it.
    shard = metadata.get("shard")
    timing = dataclasses.asdict(options.timing) if options.timing else None
    expected = {"suite": suite.name, "suite sha256": suite.sha256, "device": options.device,
                "seed": options.run_seed, "timing": json.loads(json.dumps(timing)),
                "shard": options.shard}
    found = {"suite": metadata["suite"]["name"], "suite sha256": metadata["suite"].get("sha256"),
             "device": metadata.get("device"), "seed": metadata.get("seed"),
             "timing": metadata.get("timing"),
             "shard": (shard["index"], shard["count"]) if shard else None}
    for key, value in expected.items():
        if found[key] != value:
            raise ValueError(f"--resume: {run_dir.path} was run with {key} {found[key]!r}, "
                             f"this run asks for {value!r}; resume it as it was run, or "
                             "start a new run in another --out")
    git = environment.git_state()
    metadata.setdefault("resumed", []).append({"time": environment.utc_now(), "git": git})
    run_dir.write_metadata(metadata)
    return metadata, rows


def _copy_bandwidth(options: RunOptions, run_dir: RunDir, metadata: dict,
                    console: Console) -> None:
    """The device's copy bandwidth, measured once per run and kept in the metadata
    (the roofline metric reads it there)."""
    if options.timing is not None and metadata.get("copy_bandwidth_gbps") is None:
        with console.status(f"measuring {options.device} copy bandwidth"):
            metadata["copy_bandwidth_gbps"] = copy_bandwidth_gbps(options.device, options.timing)
        run_dir.write_metadata(metadata)


def check_execution(options: RunOptions) -> None:
    """Refuse execution options that contradict each other, naming the flag."""
    if options.workers < 0:
        raise ValueError(f"--workers: expected 0 (in this process) or more, got {options.workers}")
    if options.executor not in ("local", "ray"):
        raise ValueError(f"--executor: expected local or ray, got {options.executor!r}")
    if options.devices and options.device != "cuda":
        raise ValueError(f"--devices: names GPUs; expected --device cuda, got {options.device}")
    if options.device == "cuda" and options.workers > 1 and options.timing is not None:
        raise ValueError(f"--workers {options.workers}: two timing workers on one GPU disturb "
                         "each other's times; expected --devices cuda:0,cuda:1|all (one "
                         "worker per GPU)")
    if options.case_timeout is not None and options.case_timeout <= 0:
        raise ValueError(f"--case-timeout: expected a positive number of seconds, "
                         f"got {options.case_timeout:g}")
    if options.memory_limit_gb is not None:
        if options.memory_limit_gb <= 0:
            raise ValueError(f"--memory-limit-gb: expected a positive size, "
                             f"got {options.memory_limit_gb:g}")
        if not options.in_workers or options.executor == "ray":
            raise ValueError("--memory-limit-gb: limits a local worker; expected --workers N "
                             "or --devices (Ray limits its tasks itself)")
    if options.ray_address is not None and options.executor != "ray":
        raise ValueError("--address: names a Ray cluster; expected --executor ray with it")
    if options.executor == "ray":
        from harness import ray_executor  # here: Ray is an optional extra

        ray_executor.import_ray()  # before the run directory is made


def run_suite(options: RunOptions, console: Console | None = None) -> int:
    """Run the selected cases; returns the exit status (0, 1 on any fail/error, 130 on Ctrl-C)."""
    console = console or Console()
    check_execution(options)
    selected = select(options)
    if options.shard:
        selected = shard_of(selected, *options.shard)
    environment.use_contract_precision()  # before collect(): the metadata records it
    run_dir = RunDir(options.out or default_out_dir(options.suite.name))
    with run_dir.lock():
        return _run_locked(run_dir, selected, options, console)


def _run_locked(run_dir: RunDir, selected: list, options: RunOptions, console: Console) -> int:
    metadata, rows = _open_run_dir(run_dir, options, selected)
    console.print(f"run directory: [bold]{escape(str(run_dir.path))}")
    _copy_bandwidth(options, run_dir, metadata, console)
    done = {row_key(row) for row in rows}
    baselines = {(row["case_id"], row["direction"]): row for row in rows
                 if workers.is_timed_baseline(row)}
    tasks = []
    for suite_case, impls in selected:
        case = suite_case.case
        todo = tuple((impl.name, d) for impl in impls for d in _directions(suite_case)
                     if (case.id, impl.name, d) not in done)
        if todo:
            tasks.append(workers.CaseTask(
                op=case.op.name, params=dict(case.params), dtype=case.dtype, mode=case.mode,
                todo=todo, baselines={d: baselines[(case.id, d)] for d in _directions(suite_case)
                                      if (case.id, d) in baselines}))
    if options.device == "cpu" and options.workers > 1 and options.timing is not None:
        console.print(f"[yellow]--workers {options.workers} on the CPU: the timed rows share "
                      "the cores; their times are not comparable with a run in one process")
    context = workers.WorkerContext(
        device=options.device, seed=options.run_seed, timing=options.timing, metadata=metadata,
        plugins=tuple(plugins.LOADED), counters=options.counters,
        threads=max(1, (os.cpu_count() or 1) // options.workers) if options.workers else None)
    interrupted = False
    not_written: RowNotWritten | None = None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(options.suite.name, total=sum(len(t.todo) for t in tasks))
        try:
            with _executor(options, context) as rows_of:
                for row in rows_of(tasks):
                    rows.append(run_dir.append(row))
                    progress.update(task, description=row.case_id, advance=1)
                    if row.status in ("fail", "error"):
                        # soft_wrap: the command stays on one line, to copy from a CI log
                        console.print(
                            f"[red]{row.status}[/] {escape(row.case_id)} {row.impl} "
                            f"{row.direction}: {escape(row.reason)}\n"
                            f"  reproduce: {escape(row.reproduce)}",
                            highlight=False, soft_wrap=True,
                        )
        except KeyboardInterrupt:
            interrupted = True
        except RowNotWritten as error:
            not_written = error
    print_summary(rows, console)
    console.print(f"results: [bold]{escape(str(run_dir.path))}")
    resume = (f"the {len(rows)} finished rows are saved; run the same command again with "
              f"--resume --out {escape(str(run_dir.path))} to finish the run")
    if not_written is not None:
        console.print(f"[red]stopped: {escape(str(not_written))}[/]; {resume} "
                      "once there is space", highlight=False, soft_wrap=True)
        return EXIT_NOT_WRITTEN
    if interrupted:
        console.print(f"[yellow]interrupted: {resume}", highlight=False, soft_wrap=True)
        return EXIT_INTERRUPTED
    return 1 if any(row["status"] in ("fail", "error") for row in rows) else 0


@contextlib.contextmanager
def _executor(options: RunOptions, context: workers.WorkerContext) -> Iterator:
    """A function from tasks to their rows as they finish: in this process, in local
    workers, or on Ray; leaving the context stops the workers."""
    if options.executor == "ray":
        from harness import ray_executor  # here: Ray is an optional extra

        with ray_executor.RayExecutor(context, options.ray_address, options.timeout) as ray:
            yield ray.rows
    elif options.in_workers:
        slots = workers.local_slots(options.device, options.workers, options.devices)
        limit = None if options.memory_limit_gb is None else int(options.memory_limit_gb * 2**30)
        with workers.WorkerPool(context, slots, options.timeout, limit) as pool:
            yield pool.rows
    else:
        yield lambda tasks: (row for task in tasks for row in workers.case_rows(task, context))
