"""Timing one prepared call: the device's time, the host's, and what a user waits for.

``call`` is an implementation's timed call (``harness.registry``): it takes no
arguments and does only the operator's work. ``measure(call, device, config)``
follows one plan on every device (after triton's ``do_bench``):

1. one call that is never measured: JIT compilation (NVRTC, CuPy's module
   cache), lazy initialisation and allocator growth happen here;
2. warm-up calls, each followed by a synchronisation, until ``warmup_ms`` has
   passed, which also estimates the time of one call;
3. ``rep_ms / estimate`` measured calls, clamped to [``min_samples``,
   ``max_samples``], every sample kept.

On the CPU a sample is ``time.perf_counter_ns`` around one call (method
``cpu-clock``). On a GPU a row gets three measurements (``docs/timing.md``):

- *device time*, the basis of speedups, roofline and GB/s: the GPU's time for
  the call with the host out of the picture. A spin kernel
  (``torch.cuda._sleep``, sized from the measured host time per sample) holds
  the stream while a batch of samples is enqueued, each with its L2 flush and
  its pair of events, so the GPU runs them back to back (nvbench's blocking
  kernel; method ``cuda-spin``). When the host cannot enqueue a batch before
  the spin ends even with a longer spin (the call synchronises, say), the
  call is captured in a CUDA graph and replayed (``cuda-graph``); when it
  cannot be captured either, plain events around eager calls are recorded and
  the row says so (``cuda-events``, with the reason in ``Measurement.note``).
- *host overhead*: CPU microseconds per call to enqueue the work (from a
  synchronised start, the call's own return);
- *as called*: the eager latency of a call followed by a synchronisation.

A result whose IQR exceeds ``noise_threshold`` of its median is flagged noisy.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

CPU_CLOCK, CUDA_SPIN, CUDA_GRAPH, CUDA_EVENTS = "cpu-clock", "cuda-spin", "cuda-graph", "cuda-events"
METHODS = (CPU_CLOCK, CUDA_SPIN, CUDA_GRAPH, CUDA_EVENTS)
# The spin covers this many times the host's measured time for a batch, plus a floor:
# host time varies from call to call, and a spin that ends early lets the GPU idle.
SPIN_MARGIN = 2.0
SPIN_FLOOR_MS = 0.05
SPIN_RETRIES = 3  # each retry doubles the spin
MAX_SPIN_MS = 200.0  # a longer batch is split: the GPU must not spin for seconds
# Host cost per sample beyond the call: the L2 flush's launch and two event records.
SAMPLE_OVERHEAD_MS = 0.02


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_samples: int = 5
    max_samples: int = 10_000
    noise_threshold: float = 0.1  # IQR / median above which a result is noisy
    host_samples: int = 25  # calls measured for host overhead and as-called latency
    # Samples enqueued behind one spin kernel: small enough that the launch queue
    # (about a thousand entries) never fills and stalls the host while the GPU spins.
    batch_size: int = 16
    cuda_graph: bool = False  # device time by graph replay instead of the spin kernel


@dataclasses.dataclass(frozen=True)
class Stats:
    """Every sample of one measurement and its summary (median, IQR, minimum)."""

    samples: tuple[float, ...]
    median: float
    iqr: float
    min: float
    noisy: bool

    @property
    def count(self) -> int:
        return len(self.samples)


def summarize(samples: list[float], noise_threshold: float) -> Stats:
    """Median, IQR (75th minus 25th percentile, linear interpolation), minimum."""
    if not samples:
        raise ValueError("no timing samples")
    if len(samples) == 1:
        q1 = q3 = samples[0]
    else:
        q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    median = statistics.median(samples)
    return Stats(samples=tuple(samples), median=median, iqr=q3 - q1, min=min(samples),
                 noisy=q3 - q1 > noise_threshold * median)


@dataclasses.dataclass(frozen=True)
class Measurement:
    """What ``measure`` found for one call.

    ``device`` in milliseconds (on the CPU the wall-clock time of a call);
    ``host_us`` and ``as_called`` on a GPU only, in microseconds and
    milliseconds. ``output`` is the last timed call's result, for the check
    after timing; ``note`` says why a fallback method timed the row.
    """

    method: str
    device: Stats
    host_us: Stats | None = None
    as_called: Stats | None = None
    output: Any = None
    note: str = ""


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


def time_cpu(call: Callable[[], object], config: TimingConfig) -> Measurement:
    """``call`` timed with ``time.perf_counter_ns`` (monotonic), one sample per call."""
    n = _sample_count(_warm_up(call, lambda: None, config.warmup_ms), config)
    samples, output = [], None
    for _ in range(n):
        start = time.perf_counter_ns()
        output = call()
        samples.append((time.perf_counter_ns() - start) / 1e6)
    return Measurement(CPU_CLOCK, summarize(samples, config.noise_threshold), output=output)


def l2_flush_bytes(device: torch.device) -> int:
    """Twice the L2: zeroing that many bytes leaves nothing of the last call in it."""
    return 2 * torch.cuda.get_device_properties(device).L2_cache_size


def host_samples(call: Callable[[], object], count: int) -> tuple[list[float], list[float]]:
    """(host µs to enqueue, as-called ms) of ``count`` calls, each from an idle GPU."""
    host_us, as_called_ms = [], []
    for _ in range(count):
        torch.cuda.synchronize()
        start = time.perf_counter_ns()
        call()
        enqueued = time.perf_counter_ns()
        torch.cuda.synchronize()
        done = time.perf_counter_ns()
        host_us.append((enqueued - start) / 1e3)
        as_called_ms.append((done - start) / 1e6)
    return host_us, as_called_ms


@functools.cache
def spin_cycles_per_ms(device_index: int) -> float:
    """``torch.cuda._sleep`` cycles per millisecond on this GPU, measured once."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 1_000_000
    torch.cuda._sleep(cycles)  # the first launch pays for loading the kernel
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / start.elapsed_time(end)


def _event_pairs(n: int) -> list[tuple[torch.cuda.Event, torch.cuda.Event]]:
    return [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(n)]


def _spin_batch(call, pairs, flush: torch.Tensor, spin_ms: float, cycles_per_ms: float):
    """Enqueue ``pairs`` samples behind a spin of ``spin_ms``; (whether the host finished
    enqueueing before the spin ended, the last output)."""
    torch.cuda._sleep(int(spin_ms * cycles_per_ms))
    start = time.perf_counter()
    output = None
    for begin, end in pairs:
        flush.zero_()
        begin.record()
        output = call()
        end.record()
    enqueue_ms = (time.perf_counter() - start) * 1e3
    torch.cuda.synchronize()
    return enqueue_ms < spin_ms, output


def spin_samples(call: Callable[[], object], n: int, flush: torch.Tensor,
                 host_ms_per_sample: float, config: TimingConfig) -> tuple[list[float], Any] | None:
    """``n`` device-time samples by the spin method, or None when the host cannot
    keep ahead of the spin even after ``SPIN_RETRIES`` doublings."""
    cycles_per_ms = spin_cycles_per_ms(torch.cuda.current_device())
    per_sample_ms = host_ms_per_sample + SAMPLE_OVERHEAD_MS
    batch = max(1, min(config.batch_size, int(MAX_SPIN_MS / (SPIN_MARGIN * per_sample_ms))))
    samples, output = [], None
    while len(samples) < n:
        pairs = _event_pairs(min(batch, n - len(samples)))
        spin_ms = SPIN_MARGIN * len(pairs) * per_sample_ms + SPIN_FLOOR_MS
        for _ in range(SPIN_RETRIES + 1):
            ahead, output = _spin_batch(call, pairs, flush, spin_ms, cycles_per_ms)
            if ahead:
                break
            spin_ms *= 2
        else:
            return None
        samples += [begin.elapsed_time(end) for begin, end in pairs]
    return samples, output


def capture_graph(call: Callable[[], object]) -> tuple[Callable[[], object], Any]:
    """``call`` captured in a CUDA graph: (the replay, the graph's output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # outside the capture: compilation and allocations must not be recorded
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = call()
    return graph.replay, output


def event_samples(fn: Callable[[], object], n: int, flush: torch.Tensor) -> tuple[list[float], Any]:
    """``n`` samples of events around ``fn`` on the current stream (host time included
    whenever the host is slower than the GPU)."""
    pairs, output = _event_pairs(n), None
    for begin, end in pairs:
        flush.zero_()
        begin.record()
        output = fn()
        end.record()
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) for begin, end in pairs], output


def time_cuda(call: Callable[[], object], config: TimingConfig) -> Measurement:
    """Device time, host overhead and as-called latency of ``call`` (module docstring)."""
    device = torch.device("cuda", torch.cuda.current_device())
    per_call_ms = _warm_up(call, torch.cuda.synchronize, config.warmup_ms)
    host_us, as_called_ms = host_samples(call, config.host_samples)
    host = summarize(host_us, config.noise_threshold)
    as_called = summarize(as_called_ms, config.noise_threshold)
    n = _sample_count(per_call_ms, config)
    flush = torch.empty(l2_flush_bytes(device), dtype=torch.int8, device=device)
    method, note, found = CUDA_SPIN, "", None
    if not config.cuda_graph:
        found = spin_samples(call, n, flush, host.median / 1e3, config)
        if found is None:
            note = (f"the host could not enqueue a batch before the spin ended "
                    f"({SPIN_RETRIES} doublings): the call synchronises or its host time varies")
    if found is None:
        try:
            replay, graph_output = capture_graph(call)
        except Exception as exc:  # not capturable: eager events, and the row says so
            method = CUDA_EVENTS
            note = "; ".join(filter(None, [note, f"not capturable in a CUDA graph: {exc}"]))
            found = event_samples(call, n, flush)
        else:
            method = CUDA_GRAPH
            samples, _ = event_samples(replay, n, flush)
            found = (samples, graph_output)
    samples, output = found
    return Measurement(method, summarize(samples, config.noise_threshold), host, as_called,
                       output, note)


def measure(call: Callable[[], object], device: str, config: TimingConfig) -> Measurement:
    """Time ``call`` on ``device`` ("cpu" or "cuda")."""
    return time_cuda(call, config) if device == "cuda" else time_cpu(call, config)


def peak_memory_bytes(call: Callable[[], object], device: str) -> int | None:
    """Bytes the allocator held at the peak of one call beyond what it held before
    (the inputs): outputs and workspace. None where not measurable (the CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    output = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del output
    return peak


# Large enough to stream from DRAM on every device we run on (H200's L2 is
# 60 MiB; server CPUs have up to a few hundred MiB of L3).
COPY_BYTES = {"cuda": 1 << 30, "cpu": 1 << 29}


def copy_bandwidth_gbps(device: str, config: TimingConfig) -> float:
    """Measured copy bandwidth of ``device``: bytes read plus written per second, in GB/s."""
    nbytes = COPY_BYTES[device]
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    found = measure(lambda: dst.copy_(src), device, dataclasses.replace(config, cuda_graph=False))
    return 2 * nbytes / (found.device.median * 1e-3) / 1e9
