"""Timing one call: a monotonic clock on the CPU, CUDA events on a GPU.

Both timers follow the same plan (after triton's ``do_bench``):

1. one call that is never measured: JIT compilation (NVRTC, CuPy's module
   cache), lazy initialisation and allocator growth happen here;
2. warm-up calls until ``warmup_ms`` has passed, which also estimates the
   time of one call;
3. ``rep_ms / estimate`` measured calls, clamped to
   [``min_samples``, ``max_samples``], each timed on its own.

The result is the median, the inter-quartile range and the number of samples;
a result whose IQR exceeds ``noise_threshold`` of its median is flagged noisy.
On CUDA every measured call starts with a cold L2 (a buffer twice the L2's size
is zeroed between calls, outside the timed region), and the events are
recorded on the current stream, the one the implementations launch on.
Optionally the call is captured once in a CUDA graph and the graph replayed,
which leaves launch overhead out.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_samples: int = 5
    max_samples: int = 10_000
    noise_threshold: float = 0.1  # IQR / median above which a result is noisy
    cuda_graph: bool = False


@dataclasses.dataclass(frozen=True)
class Stats:
    median_ms: float
    iqr_ms: float
    min_ms: float
    samples: int
    noisy: bool
    timer: str  # "cpu-clock", "cuda-events" or "cuda-graph"


def summarize(samples_ms: list[float], noise_threshold: float, timer: str) -> Stats:
    """Median, IQR (75th minus 25th percentile, linear interpolation) and count."""
    if not samples_ms:
        raise ValueError("no timing samples")
    if len(samples_ms) == 1:
        q1 = q3 = samples_ms[0]
    else:
        q1, _, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    median = statistics.median(samples_ms)
    iqr = q3 - q1
    return Stats(
        median_ms=median,
        iqr_ms=iqr,
        min_ms=min(samples_ms),
        samples=len(samples_ms),
        noisy=iqr > noise_threshold * median,
        timer=timer,
    )


def _warm_up(fn: Callable[[], object], sync: Callable[[], None], warmup_ms: float) -> float:
    """Steps 1 and 2 of the plan; returns the estimated milliseconds per call."""
    fn()
    sync()
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        sync()
        calls += 1
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if elapsed_ms >= warmup_ms:
            return elapsed_ms / calls


def _sample_count(per_call_ms: float, config: TimingConfig) -> int:
    wanted = int(config.rep_ms / max(per_call_ms, 1e-6))
    return min(max(wanted, config.min_samples), config.max_samples)


def time_cpu(fn: Callable[[], object], config: TimingConfig) -> Stats:
    """Time ``fn`` with ``time.perf_counter_ns`` (monotonic), one sample per call."""
    n = _sample_count(_warm_up(fn, lambda: None, config.warmup_ms), config)
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return summarize(samples, config.noise_threshold, "cpu-clock")


def l2_flush_bytes(device: torch.device) -> int:
    """Twice the L2: zeroing that many bytes leaves nothing of the last call in it."""
    return 2 * torch.cuda.get_device_properties(device).L2_cache_size


def _capture_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured in a CUDA graph; the returned callable replays it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # outside the capture: compilation and allocations must not be recorded
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_cuda(fn: Callable[[], object], config: TimingConfig) -> Stats:
    """Time ``fn`` with CUDA events on the current stream, cold L2 for each sample."""
    device = torch.device("cuda", torch.cuda.current_device())
    if config.cuda_graph:
        fn = _capture_graph(fn)
    n = _sample_count(_warm_up(fn, torch.cuda.synchronize, config.warmup_ms), config)
    flush = torch.empty(l2_flush_bytes(device), dtype=torch.int8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    stream = torch.cuda.current_stream()
    for start, end in zip(starts, ends, strict=True):
        flush.zero_()
        start.record(stream)
        fn()
        end.record(stream)
    torch.cuda.synchronize()
    samples = [start.elapsed_time(end) for start, end in zip(starts, ends, strict=True)]
    timer = "cuda-graph" if config.cuda_graph else "cuda-events"
    return summarize(samples, config.noise_threshold, timer)


def time_call(fn: Callable[[], object], device: str, config: TimingConfig) -> Stats:
    """Time ``fn`` on ``device`` ("cpu" or "cuda")."""
    return time_cuda(fn, config) if device == "cuda" else time_cpu(fn, config)


# Large enough to stream from DRAM on every device we run on (H200's L2 is
# 60 MiB; server CPUs have up to a few hundred MiB of L3).
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 29}


def copy_bandwidth_gbps(device: str, config: TimingConfig) -> float:
    """Measured copy bandwidth of ``device``: bytes read plus written per second, in GB/s."""
    nbytes = COPY_BYTES[device]
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    stats = time_call(lambda: dst.copy_(src), device,
                      dataclasses.replace(config, cuda_graph=False))
    return 2 * nbytes / (stats.median_ms * 1e-3) / 1e9
