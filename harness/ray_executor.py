"""``--executor ray``: a run's cases as tasks of a Ray cluster.

Each ``CaseTask`` becomes one Ray task (``num_gpus=1`` on CUDA, so Ray pins it
to a GPU of its own; ``num_cpus=1`` for emulated checks on CPUs), a streaming
generator whose rows come back to the driver one by one as they finish; the
driver alone writes them. Ray never retries a task (``max_retries=0``): a task
whose worker dies, or that runs one row past the case timeout (the driver then
cancels it, killing its worker), becomes the ``error`` row of the row it was
running, and the rest of its case goes out as a new task, as with local
workers (``harness.workers``). At most as many tasks are out as the cluster
has GPUs (or CPUs), so a task's clock runs only while it runs.

Ray is an optional extra (``pip install 'dcnbench[ray]'``). Without an
``address`` the driver starts a local Ray instance for the run and stops it
after; with one it joins that cluster (``ray://`` or ``auto``), whose nodes
must have this checkout importable (see docs/execution.md).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

from harness import workers
from harness.results import Row

# How often the driver looks at the clock of its tasks, in seconds.
POLL_S = 0.5
RETIRES = "the worker retires)"
_setup_done = False


def import_ray() -> Any:
    """The ray module, or a ValueError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray: Ray is not installed here; expected it as the "
                         "optional extra: pip install 'dcnbench[ray]' (or pip install ray)"
                         ) from None
    return ray


def _case_task(task: workers.CaseTask, context: workers.WorkerContext) -> Iterator[Row | None]:
    """The Ray task: None once set up (the case's clock starts then: a worker's start-up
    is not the case's), then the case's rows, each yielded as it finishes."""
    global _setup_done
    import ray

    if not _setup_done:  # once per Ray worker process
        workers.worker_setup(context)
        _setup_done = True
    index = name = None
    if context.device == "cuda":
        import torch

        gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU") or [None]
        index = int(gpus[0]) if gpus[0] is not None else None
        name = torch.cuda.get_device_name(0)
    yield None
    for row in workers.case_rows(task, context):
        lost = workers.context_lost(context.device) if row.status == "error" else None
        if lost:
            row.reason += f" (the CUDA context is lost: {lost}; {RETIRES}"
        row.device_index, row.device_name = index, name
        yield row
        if lost:
            os._exit(workers.EXIT_RETIRED)


@dataclasses.dataclass
class _Running:
    task: workers.CaseTask
    received: list[Row] = dataclasses.field(default_factory=list)
    since: float | None = None  # when its row being run started; None: still starting


class RayExecutor:
    """Runs tasks on Ray; use as a context manager (leaving it cancels what still runs,
    and stops the local instance it started)."""

    def __init__(self, context: workers.WorkerContext, address: str | None,
                 case_timeout: float | None):
        self.ray = ray = import_ray()
        self.context, self.case_timeout = context, case_timeout
        self.started = not ray.is_initialized()
        if self.started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        gpu = context.device == "cuda"
        resources = {"num_gpus": 1} if gpu else {"num_cpus": 1}
        self.remote = ray.remote(max_retries=0, num_returns="streaming", **resources)(_case_task)
        slots = int(ray.cluster_resources().get("GPU" if gpu else "CPU", 0))
        if slots < 1:
            raise ValueError(f"--executor ray: the cluster has no {'GPU' if gpu else 'CPU'} "
                             "to run the cases on")
        self.slots = slots
        self.running: dict[Any, _Running] = {}

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for generator in self.running:
            self.ray.cancel(generator, force=True)
        self.running.clear()
        if self.started:
            self.ray.shutdown()

    def rows(self, tasks: Iterable[workers.CaseTask]) -> Iterator[Row]:
        """Every row of ``tasks`` as the cluster finishes them (see the module's doc)."""
        queue = collections.deque(tasks)
        while queue or self.running:
            while queue and len(self.running) < self.slots:
                task = queue.popleft()
                self.running[self.remote.remote(task, self.context)] = _Running(task)
            ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=POLL_S)
            for generator in ready:
                yield from self._next(generator, queue)
            if self.case_timeout is None:
                continue
            now = time.monotonic()
            for generator, state in list(self.running.items()):
                if state.since is not None and now - state.since > self.case_timeout:
                    self.ray.cancel(generator, force=True)
                    yield from self._fail(generator, workers.timeout_reason(self.case_timeout),
                                          queue)

    def _next(self, generator: Any, queue: collections.deque) -> Iterator[Row]:
        state = self.running[generator]
        try:
            row = self.ray.get(next(generator))
        except StopIteration:
            del self.running[generator]
            return
        except self.ray.exceptions.RayError as exc:
            reason = str(exc).strip().splitlines()[0]
            yield from self._fail(generator, f"the Ray worker failed while running this row "
                                             f"({type(exc).__name__}: {reason})", queue)
            return
        state.since = time.monotonic()
        if row is not None:
            state.received.append(row)
            yield row

    def _fail(self, generator: Any, reason: str, queue: collections.deque) -> Iterator[Row]:
        """The error row of what a failed task was running; the rest of its case re-queued."""
        state = self.running.pop(generator)
        rest = workers.after(state.task, state.received)
        if not rest.todo:
            return
        if state.received and state.received[-1].reason.endswith(RETIRES):
            queue.appendleft(rest)  # its last row said why it left
            return
        yield workers.fault_row(rest, self.context, reason)
        if len(rest.todo) > 1:
            queue.appendleft(dataclasses.replace(rest, todo=rest.todo[1:]))
