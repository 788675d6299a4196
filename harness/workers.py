"""Cases in worker processes: a fault in one case never ends the run.

A run hands its cases to an executor as ``CaseTask``s (a case by name and
parameters, the (implementation, direction) rows still to do); the executor
runs each task's rows in a worker and streams them back, and the parent alone
writes them. A worker that dies (a signal, ``os._exit``), runs one row past the
case timeout, or grows past the memory limit is killed and replaced: the row it
was running becomes an ``error`` row saying what happened, and the rest of its
case goes to the next worker. ``WorkerPool`` runs workers on this host (spawned,
never forked: a forked child would inherit a CUDA context); ``harness.ray_executor``
sends the same tasks to a Ray cluster.

Workers are started with ``spawn`` and ignore SIGINT: Ctrl-C reaches the parent
alone, which kills them and keeps every finished row. On Linux a worker also
dies with its parent (``PR_SET_PDEATHSIG``), so kill -9 of the parent leaves
no worker running on.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from harness import environment, execution, plugins, registry
from harness.cases import Case
from harness.results import Row
from harness.timing import TimingConfig

DEFAULT_CASE_TIMEOUT_S = 600.0
# How often a busy worker's resident memory is read against the limit.
MEMORY_POLL_S = 0.2
# A worker whose CUDA context is lost (a sticky error) says so and exits with this.
EXIT_RETIRED = 3


@dataclasses.dataclass(frozen=True)
class CaseTask:
    """One case's rows still to do, as plain data a worker process can receive."""

    op: str
    params: Mapping[str, Any]  # resolved: every parameter of the operator
    dtype: str
    mode: str
    todo: tuple[tuple[str, str], ...]  # (implementation, direction), baseline first
    baselines: Mapping[str, Mapping[str, Any]]  # direction -> the baseline's stored row

    @property
    def case_id(self) -> str:
        return self.case().id

    def case(self) -> Case:
        return Case(registry.get_operator(self.op), dict(self.params), self.dtype, self.mode)


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    """What every task of a run shares: where and how its rows run."""

    device: str
    seed: int
    timing: TimingConfig | None
    metadata: Mapping[str, Any]  # the run's metadata: the metrics read it
    plugins: tuple[str, ...] = ()  # modules the parent loaded, imported by each worker
    threads: int | None = None  # torch threads of a worker (None: torch's default)
    counters: bool = False  # emulated kernels in counters mode, rows keep the counters


def is_timed_baseline(row: Row | Mapping[str, Any]) -> bool:
    """Whether ``row`` is its operator's baseline and was timed (the others' speedup
    reads it)."""
    fields = row if isinstance(row, Mapping) else dataclasses.asdict(row)
    return (fields["impl"] == registry.get_operator(fields["op"]).baseline
            and bool(fields["time_median_ms"]))


def case_rows(task: CaseTask, context: WorkerContext) -> Iterator[Row]:
    """Run a task's rows one at a time (in this process), yielding each as it finishes."""
    case = task.case()
    todo = [(registry.get_implementation(task.op, impl), d) for impl, d in task.todo]
    baselines = dict(task.baselines)
    runs_backward = (any(d == "backward" for _, d in todo)
                     and execution.wants_backward(case) is None)
    try:
        case_run = execution.prepare(case, context.device, context.seed, runs_backward)
    except Exception as exc:  # bad inputs or a failing reference: every row of the case says so
        yield from execution.unprepared_rows(case, todo, context.device, context.seed, exc)
        return
    for impl, direction in todo:
        row, _ = execution.run(case_run, impl, direction, context.timing, context.metadata,
                               baselines.get(direction), counters=context.counters)
        if is_timed_baseline(row):
            baselines[direction] = dataclasses.asdict(row)
        yield row


def fault_row(task: CaseTask, context: WorkerContext, reason: str) -> Row:
    """The ``error`` row of the task's first row to do, whose worker failed with ``reason``."""
    impl, direction = task.todo[0]
    row = execution.start_row(task.case(), registry.get_implementation(task.op, impl),
                              direction, context.device, context.seed)
    row.status, row.reason = "error", reason
    return row


def after(task: CaseTask, rows: Sequence[Row]) -> CaseTask:
    """``task`` without the rows already received (and their timed baseline noted)."""
    baselines = dict(task.baselines)
    for row in rows:
        if is_timed_baseline(row):
            baselines[row.direction] = dataclasses.asdict(row)
    return dataclasses.replace(task, todo=task.todo[len(rows):], baselines=baselines)


def death_reason(exitcode: int | None) -> str:
    """What a worker's exit status says about its death."""
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        what = signal.strsignal(-exitcode) or name
        return f"the worker died of {name} ({what.lower()}) while running this row"
    return f"the worker exited with status {exitcode} while running this row"


def timeout_reason(seconds: float) -> str:
    return f"timed out after {seconds:g} s: the worker was killed"


def memory_reason(resident: int, limit: int) -> str:
    return (f"the worker exceeded the memory limit ({resident / 2**30:.2f} GiB resident, "
            f"limit {limit / 2**30:.2f} GiB): it was killed")


def context_lost(device: str) -> str | None:
    """Why this process's CUDA context is unusable (a sticky error: an illegal address,
    a launch failure), or None when it still works or there is none."""
    if device != "cuda":
        return None
    import torch

    try:
        torch.cuda.synchronize()
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return None


def resident_bytes(pid: int) -> int | None:
    """A process's resident memory (Linux ``/proc``), or None when it cannot be read."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (kill -9 included)."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def worker_setup(context: WorkerContext) -> None:
    """What a worker does before its first task: the parent's plugins, its precision
    settings, its share of the cores."""
    plugins.load(context.plugins, route="the run's parent process")
    environment.use_contract_precision()
    if context.threads is not None:
        import torch

        torch.set_num_threads(context.threads)


def _worker_main(conn: multiprocessing.connection.Connection, context: WorkerContext,
                 env: Mapping[str, str]) -> None:
    """A worker: receive tasks, send back ("row", row) per row and ("done",) per task."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    os.environ.update(env)  # CUDA_VISIBLE_DEVICES, before anything initialises CUDA
    worker_setup(context)
    name = None
    if context.device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
    conn.send(("ready", name))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        for row in case_rows(task, context):
            lost = context_lost(context.device) if row.status == "error" else None
            if lost:
                row.reason += f" (the CUDA context is lost: {lost}; the worker retires)"
            conn.send(("row", row))
            if lost:
                conn.close()
                os._exit(EXIT_RETIRED)
        conn.send(("done",))


@dataclasses.dataclass
class Slot:
    """Where one worker runs: its index in the pool, its environment, its device."""

    index: int
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    device_index: int | None = None  # the GPU's index on the host, when pinned to one


class _Worker:
    def __init__(self, slot: Slot, context: WorkerContext):
        self.slot = slot
        spawn = multiprocessing.get_context("spawn")
        self.conn, child = spawn.Pipe()
        self.process = spawn.Process(target=_worker_main, args=(child, context, slot.env),
                                     name=f"dcnbench-worker-{slot.index}", daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.device_name: str | None = None
        self.task: CaseTask | None = None
        self.received: list[Row] = []
        self.since = 0.0  # when the row being run started

    def assign(self, task: CaseTask) -> None:
        self.task, self.received, self.since = task, [], time.monotonic()
        self.conn.send(task)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


class WorkerPool:
    """Worker processes on this host, one per slot; ``rows`` runs tasks on them.

    Use as a context manager: leaving it (Ctrl-C included) kills every worker.
    """

    def __init__(self, context: WorkerContext, slots: Sequence[Slot],
                 case_timeout: float | None = DEFAULT_CASE_TIMEOUT_S,
                 memory_limit: int | None = None):
        if not slots:
            raise ValueError("WorkerPool: expected at least one slot, got none")
        if case_timeout is not None and case_timeout <= 0:
            raise ValueError(f"case_timeout: expected a positive number of seconds, "
                             f"got {case_timeout}")
        if memory_limit is not None and resident_bytes(os.getpid()) is None:
            raise ValueError("memory limit: this system has no /proc/<pid>/statm to read a "
                             "worker's memory from; run without a memory limit")
        self.context, self.case_timeout, self.memory_limit = context, case_timeout, memory_limit
        self.workers = [_Worker(slot, context) for slot in slots]

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for worker in self.workers:
            worker.kill()

    def rows(self, tasks: Iterable[CaseTask]) -> Iterator[Row]:
        """Every row of ``tasks``, as the workers finish them; a worker's fault becomes
        the error row of the row it was running, and the rest of its case goes on."""
        queue = collections.deque(tasks)
        while queue or any(w.task is not None for w in self.workers):
            for worker in self.workers:
                if worker.ready and worker.task is None and queue:
                    worker.assign(queue.popleft())
            waiting = [w for w in self.workers if w.task is not None or not w.ready]
            multiprocessing.connection.wait(
                [w.conn for w in waiting] + [w.process.sentinel for w in waiting],
                timeout=self._poll_interval())
            for index, worker in enumerate(self.workers):
                fault = yield from self._drain(worker)
                if fault is not None:
                    if not worker.ready:
                        raise RuntimeError(f"worker {worker.slot.index} could not start (exit "
                                           f"status {worker.process.exitcode}); see its "
                                           "traceback above")
                    yield from self._fail(worker, fault, queue)
                    self.workers[index] = _Worker(worker.slot, self.context)

    def _poll_interval(self) -> float | None:
        if self.memory_limit is not None:
            return MEMORY_POLL_S
        if self.case_timeout is None:
            return None
        started = [w.since for w in self.workers if w.task is not None]
        if not started:
            return None
        return max(0.0, min(started) + self.case_timeout - time.monotonic()) + 0.01

    def _drain(self, worker: _Worker):
        """Yield the rows a worker sent; the reason it failed (and must be replaced),
        or None."""
        try:
            while worker.conn.poll():
                message = worker.conn.recv()
                if message[0] == "ready":
                    worker.ready, worker.device_name = True, message[1]
                elif message[0] == "row":
                    row = self._stamp(worker, message[1])
                    worker.received.append(row)
                    worker.since = time.monotonic()
                    yield row
                else:  # done
                    worker.task = None
        except (EOFError, OSError):
            pass  # it died mid-message: its exit status says why
        if not worker.process.is_alive():
            worker.process.join()
            return death_reason(worker.process.exitcode)
        if worker.task is None:
            return None
        if self.memory_limit is not None:  # first: a row over both limits is over this one
            resident = resident_bytes(worker.process.pid) or 0
            if resident > self.memory_limit:
                return memory_reason(resident, self.memory_limit)
        if (self.case_timeout is not None
                and time.monotonic() - worker.since > self.case_timeout):
            return timeout_reason(self.case_timeout)
        return None

    def _stamp(self, worker: _Worker, row: Row) -> Row:
        row.device_index, row.device_name = worker.slot.device_index, worker.device_name
        return row

    def _fail(self, worker: _Worker, reason: str, queue: collections.deque) -> Iterator[Row]:
        """Kill a failed worker; the error row of what it was running, the rest re-queued."""
        worker.kill()
        task, worker.task = worker.task, None
        if task is None:
            return
        rest = after(task, worker.received)
        if not rest.todo:  # it died after its last row (a retiring worker)
            return
        if worker.process.exitcode == EXIT_RETIRED:  # the row saying so was its last
            queue.appendleft(rest)
            return
        yield self._stamp(worker, fault_row(rest, self.context, reason))
        if len(rest.todo) > 1:
            queue.appendleft(dataclasses.replace(rest, todo=rest.todo[1:]))


def local_slots(device: str, workers: int, devices: Sequence[int]) -> list[Slot]:
    """The pool's slots: one per GPU of ``devices`` (pinned by CUDA_VISIBLE_DEVICES),
    or ``workers`` CPU workers."""
    if device == "cuda":
        return [Slot(i, {"CUDA_VISIBLE_DEVICES": str(gpu)}, gpu)
                for i, gpu in enumerate(devices)]
    return [Slot(i) for i in range(workers)]
