"""Registered metrics: what a row reports about its timed call.

A metric is one function of a row's context, registered with its name, unit
and which way is better::

    @metric("gbps", "GB/s", better="higher", description="bytes moved per second of device time")
    def gbps(ctx: MetricContext) -> float | None:
        return ctx.bytes / ctx.seconds if ctx.bytes and ctx.seconds else None

It returns a number, or None when the row cannot have one (no byte count, a
CPU row without device memory statistics ...); ``compute`` stores the numbers
in the row's ``metrics`` mapping. ``harness.results.load`` gives every
registered metric a column of that name, and the summary table, the
pytest-benchmark export, the report and ``dcnbench compare`` iterate
``METRICS``. Adding one is one function here (or in a plugin module) and one
test; ``docs/harness.md`` says how.

The context holds the case (operator and parameters), the timing
measurement with every sample, the values the execution mode attached to the
row (``measured``: peak memory here; emulator counters, say, elsewhere), the
run's environment (its metadata: device, copy bandwidth) and the baseline's
stored row of the same case and direction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

from harness.registry import DTYPES, Operator, RegistryError
from harness.timing import Measurement

Better = Literal["lower", "higher"]


@dataclasses.dataclass(frozen=True)
class MetricContext:
    """Everything a metric may read about one timed row."""

    op: Operator
    params: Mapping[str, Any]
    direction: str
    dtype: str
    impl: str
    measurement: Measurement
    measured: Mapping[str, Any]  # values the execution mode attached to the row
    environment: Mapping[str, Any]  # the run's metadata (device, copy_bandwidth_gbps, ...)
    baseline: Mapping[str, Any] | None  # the baseline's stored row, when it was timed
    is_baseline: bool = False  # this row is the baseline of its case and direction

    @property
    def seconds(self) -> float:
        """Device time of one call, in seconds (the median)."""
        return self.measurement.device.median * 1e-3

    @property
    def flops(self) -> float | None:
        fn = self.op.flops if self.direction == "forward" else self.op.backward_flops
        return None if fn is None else float(fn(self.params))

    @property
    def bytes(self) -> float | None:
        fn = self.op.bytes if self.direction == "forward" else self.op.backward_bytes
        return None if fn is None else float(fn(self.params, DTYPES[self.dtype].itemsize))


@dataclasses.dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    better: Better
    description: str
    compute: Callable[[MetricContext], float | None]
    source: str  # the module that registered it


METRICS: dict[str, Metric] = {}


def metric(name: str, unit: str, better: Better = "lower", description: str = ""
           ) -> Callable[[Callable[[MetricContext], float | None]], Callable]:
    """Decorator registering ``fn(ctx) -> float | None`` as the metric ``name``."""
    if better not in ("lower", "higher"):
        raise RegistryError(f"metric {name!r}: better must be 'lower' or 'higher', got {better!r}")

    def register(fn: Callable[[MetricContext], float | None]) -> Callable:
        if name in METRICS:
            raise RegistryError(f"metric {name!r} is registered twice "
                                f"({METRICS[name].source} and {fn.__module__})")
        METRICS[name] = Metric(name, unit, better,
                               description or (fn.__doc__ or "").strip().split("\n")[0],
                               fn, fn.__module__)
        return fn

    return register


def compute(ctx: MetricContext) -> dict[str, float]:
    """Every registered metric the row has a value for."""
    values = {}
    for name, entry in METRICS.items():
        value = entry.compute(ctx)
        if value is not None:
            values[name] = float(value)
    return values


# --- the metrics every row can have ---------------------------------------------------

@metric("time_ms", "ms", "lower")
def time_ms(ctx: MetricContext) -> float:
    """Device time of one call (median): the basis of speedups, roofline and GB/s."""
    return ctx.measurement.device.median


@metric("as_called_ms", "ms", "lower")
def as_called_ms(ctx: MetricContext) -> float | None:
    """Eager latency of one call followed by a synchronisation (GPU rows)."""
    found = ctx.measurement.as_called
    return None if found is None else found.median


@metric("host_overhead_us", "µs", "lower")
def host_overhead_us(ctx: MetricContext) -> float | None:
    """CPU time per call to enqueue the work (GPU rows): what small shapes pay."""
    found = ctx.measurement.host_us
    return None if found is None else found.median


@metric("tflops", "TFLOP/s", "higher")
def tflops(ctx: MetricContext) -> float | None:
    """The operator's FLOP count per second of device time."""
    flops = ctx.flops
    return None if flops is None else flops / ctx.seconds / 1e12


@metric("gbps", "GB/s", "higher")
def gbps(ctx: MetricContext) -> float | None:
    """The operator's minimum bytes moved per second of device time."""
    moved = ctx.bytes
    return None if moved is None else moved / ctx.seconds / 1e9


@metric("roofline_fraction", "", "higher")
def roofline_fraction(ctx: MetricContext) -> float | None:
    """GB/s over the device's measured copy bandwidth."""
    rate, copy = gbps(ctx), ctx.environment.get("copy_bandwidth_gbps")
    return None if rate is None or not copy else rate / copy


@metric("speedup", "×", "higher")
def speedup(ctx: MetricContext) -> float | None:
    """The baseline's device time over this row's (the baseline itself: 1)."""
    if ctx.is_baseline:
        return 1.0
    base = (ctx.baseline or {}).get("metrics", {}).get("time_ms")
    return None if not base else base / ctx.measurement.device.median


@metric("peak_memory_mib", "MiB", "lower")
def peak_memory_mib(ctx: MetricContext) -> float | None:
    """Allocator peak across one call beyond the inputs (GPU rows)."""
    found = ctx.measured.get("peak_memory_bytes")
    return None if found is None else found / 2**20
