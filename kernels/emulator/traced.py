"""The traced modes: ``counters`` (memory traffic per warp-level request) and
``racecheck`` (conflicting accesses of different threads within one launch).

Both run the kernel built by clang with
``-fsanitize-coverage=inline-8bit-counters,trace-loads,trace-stores``: every
load and store of the kernel calls the runtime (``shim/dcn_trace.cpp``) with
its address, and the shim's atomics report themselves. Accesses inside the
launch's array arguments (and, for the racecheck, the block's shared memory)
are attributed to the CUDA thread that makes them.

``counters``: the accesses of a warp's 32 threads are grouped into one request
per (static call site, how many times the thread has executed it) -- SIMT
execution under uniform control flow; an approximation under divergence -- and
each request counts the distinct 32-byte sectors its lanes touch, as ncu's
``l1tex__t_sectors_pipe_lsu_mem_global_op_ld`` does. Collect them with
``with counters.recording() as launches:``; see docs/counters.md.

``racecheck``: raises RaceCheckError naming the kernel, the buffer, the element
and both threads; see docs/emulator.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import threading
from collections.abc import Iterator, Sequence

from .arguments import ArrayArg, Param, pack
from .errors import RaceCheckError

KINDS = ("load", "store", "atomic")
SECTOR_BYTES = 32
_ANALYSIS = {"counters": 1, "racecheck": 2}
_NO_BUFFER = -1

# One traced launch at a time: the runtime keeps one launch's trace.
_launch_lock = threading.Lock()
_recorders: list[list[LaunchCounters]] = []
_recorders_lock = threading.Lock()


class _Region(ctypes.Structure):
    """Mirror of ``dcn::TraceRegion`` in shim/dcn_trace.cpp."""

    _fields_ = [("address", ctypes.c_ulonglong), ("bytes", ctypes.c_ulonglong),
                ("element_bytes", ctypes.c_ulonglong), ("vector_bytes", ctypes.c_ulonglong)]


class _RegionCounts(ctypes.Structure):
    """Mirror of ``dcn::RegionCounts``."""

    _fields_ = [("requests", ctypes.c_ulonglong * 3), ("sectors", ctypes.c_ulonglong * 3),
                ("bytes_requested", ctypes.c_ulonglong * 3),
                ("bytes_useful", ctypes.c_ulonglong * 3),
                ("distinct_read_sectors", ctypes.c_ulonglong),
                ("distinct_written_sectors", ctypes.c_ulonglong)]


class _SharedCounts(ctypes.Structure):
    """Mirror of ``dcn::SharedCounts``."""

    _fields_ = [("requests", ctypes.c_ulonglong * 3), ("wavefronts", ctypes.c_ulonglong * 3)]


class _RaceReport(ctypes.Structure):
    """Mirror of ``dcn::RaceReport``."""

    _fields_ = [("races", ctypes.c_ulonglong), ("region", ctypes.c_int),
                ("element", ctypes.c_ulonglong), ("first_block", ctypes.c_uint),
                ("first_thread", ctypes.c_uint), ("second_block", ctypes.c_uint),
                ("second_thread", ctypes.c_uint), ("first_kind", ctypes.c_int),
                ("second_kind", ctypes.c_int)]


@dataclasses.dataclass(frozen=True)
class AccessCounts:
    """Warp-level requests of one kind (load, store or atomic)."""

    requests: int = 0
    sectors: int = 0  # 32-byte sectors the requests touch, summed over requests
    bytes_requested: int = 0  # bytes the lanes asked for
    bytes_useful: int = 0  # distinct bytes per request (a broadcast counts once)

    @property
    def sectors_per_request(self) -> float:
        return self.sectors / self.requests if self.requests else 0.0

    @property
    def efficiency(self) -> float:
        """Distinct requested bytes over the bytes of the sectors moved (ncu's
        sector utilisation): 1.0 for a coalesced float32 warp, 1/8 for stride 32."""
        return self.bytes_useful / (self.sectors * SECTOR_BYTES) if self.sectors else 0.0

    def __add__(self, other: AccessCounts) -> AccessCounts:
        return AccessCounts(*(a + b for a, b in zip(dataclasses.astuple(self),
                                                     dataclasses.astuple(other), strict=True)))


@dataclasses.dataclass(frozen=True)
class SharedCounts:
    """Warp-level shared-memory requests of one kind and their wavefronts (the most
    distinct 4-byte words one of the 32 banks delivers; a request without bank
    conflicts takes 1)."""

    requests: int = 0
    wavefronts: int = 0

    @property
    def wavefronts_per_request(self) -> float:
        return self.wavefronts / self.requests if self.requests else 0.0


@dataclasses.dataclass(frozen=True)
class BufferCounts:
    """What one launch did to one array argument."""

    name: str
    nbytes: int
    access: dict[str, AccessCounts]  # keyed by KINDS
    distinct_read_sectors: int  # sectors loaded or atomically updated at least once
    distinct_written_sectors: int  # sectors stored or atomically updated at least once


@dataclasses.dataclass(frozen=True)
class LaunchCounters:
    """The counters of one launch in ``counters`` mode."""

    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    buffers: tuple[BufferCounts, ...]
    shared: dict[str, SharedCounts]  # keyed by KINDS

    @property
    def blocks(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def threads(self) -> int:
        return self.blocks * self.block[0] * self.block[1] * self.block[2]

    def total(self, kind: str) -> AccessCounts:
        counts = AccessCounts()
        for buffer in self.buffers:
            counts += buffer.access[kind]
        return counts

    @property
    def dram_bytes(self) -> int:
        """Bytes a perfect cache would move: each sector read once, written once."""
        return SECTOR_BYTES * sum(b.distinct_read_sectors + b.distinct_written_sectors
                                  for b in self.buffers)


@contextlib.contextmanager
def recording() -> Iterator[list[LaunchCounters]]:
    """Collects the LaunchCounters of every ``counters``-mode launch inside the
    ``with`` block (on any thread), in launch order."""
    launches: list[LaunchCounters] = []
    with _recorders_lock:
        _recorders.append(launches)
    try:
        yield launches
    finally:
        with _recorders_lock:
            _recorders.remove(launches)


def launch(mode: str, entry, grid: tuple[int, int, int], block: tuple[int, int, int],
           shared_mem: int, values: Sequence[ArrayArg | bytes], params: Sequence[Param]) -> None:
    """Runs one launch of the traced build of ``entry`` in ``mode`` ("counters" or
    "racecheck"); records its counters or raises RaceCheckError."""
    from .module import execute, runtime  # the module imports this one

    library = runtime("traced")
    # One region per distinct array: an in-place kernel's aliased arguments are one buffer.
    regions: dict[tuple[int, int], Param] = {}
    for param, value in zip(params, values, strict=True):
        if isinstance(value, ArrayArg) and value.address and value.nbytes:
            regions.setdefault((value.address, value.nbytes), param)
    table = (_Region * max(len(regions), 1))(
        *(_Region(address, nbytes, max(1, param.size),
                  param.lanes * param.size if param.lanes > 1 else 0)
          for (address, nbytes), param in regions.items()))
    counts = (_RegionCounts * max(len(regions), 1))()
    shared = _SharedCounts()
    report = _RaceReport()
    with _launch_lock:
        library.dcn_trace_begin(_ANALYSIS[mode], table, len(regions), (ctypes.c_uint * 3)(*grid),
                                (ctypes.c_uint * 3)(*block))
        try:
            execute(entry, grid, block, shared_mem, pack(values))
        finally:
            library.dcn_trace_end(counts, ctypes.byref(shared), ctypes.byref(report))
    described = list(regions.values())
    if mode == "racecheck":
        if report.races:
            raise RaceCheckError(_race_message(entry.name, grid, block, report, described))
        return
    buffers = tuple(
        BufferCounts(param.name, nbytes,
                     {kind: AccessCounts(c.requests[k], c.sectors[k], c.bytes_requested[k],
                                         c.bytes_useful[k]) for k, kind in enumerate(KINDS)},
                     c.distinct_read_sectors, c.distinct_written_sectors)
        for ((_, nbytes), param), c in zip(regions.items(), counts, strict=False))
    result = LaunchCounters(entry.name, grid, block, buffers,
                            {kind: SharedCounts(shared.requests[k], shared.wavefronts[k])
                             for k, kind in enumerate(KINDS)})
    with _recorders_lock:
        for launches in _recorders:
            launches.append(result)


def _unravel(index: int, dims: tuple[int, int, int]) -> tuple[int, int, int]:
    return index % dims[0], (index // dims[0]) % dims[1], index // (dims[0] * dims[1])


def _race_message(kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int],
                  report: _RaceReport, params: Sequence[Param]) -> str:
    verbs = {0: "read", 1: "written", 2: "updated atomically"}
    if report.region == _NO_BUFFER:
        where = f"shared memory, byte offset {report.element}"
        rule = "without a __syncthreads() between them"
    else:
        param = params[report.region]
        where = f"{param.describe()}, element {report.element}"
        rule = ("by different threads without an atomic (and, within one block, without a "
                "__syncthreads() between them)")
    first = (f"{verbs[report.first_kind]} by block {_unravel(report.first_block, grid)} thread "
             f"{_unravel(report.first_thread, block)}")
    second = (f"{verbs[report.second_kind]} by block {_unravel(report.second_block, grid)} "
              f"thread {_unravel(report.second_thread, block)}")
    return (f"kernel '{kernel}': data race on {where}: {first}, then {second}, {rule}; "
            f"{report.races} conflicting access(es) in this launch")


__all__ = ["KINDS", "AccessCounts", "BufferCounts", "LaunchCounters", "SharedCounts", "launch",
           "recording"]
