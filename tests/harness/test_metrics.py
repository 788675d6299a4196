"""Registered metrics: the shipped ones on known numbers, and a new one reaching every
consumer (rows, results.load, the summary, the export, compare) by registering alone."""

from __future__ import annotations

import io

import pytest
from harness_toy import TOY
from rich.console import Console

from harness import benchmark_export, compare, metrics, registry, results, runner, suites, timing
from harness.metrics import MetricContext
from harness.registry import RegistryError
from harness.summary import print_summary
from harness.timing import Measurement, TimingConfig

FAST = TimingConfig(warmup_ms=0.5, rep_ms=1, min_samples=5)


def context(toy_op, device_ms=2.0, host_us=None, as_called_ms=None, impl="good",
            baseline=None, measured=None, environment=None) -> MetricContext:
    """A context for ``impl`` (``"baseline"`` is the toy's baseline)."""
    def stats(value):
        return None if value is None else timing.summarize([value] * 3, 0.1)
    found = Measurement("cuda-spin", stats(device_ms), stats(host_us), stats(as_called_ms))
    params = toy_op.resolve({"N": 2, "C": 3, "H": 4, "W": 5})
    return MetricContext(op=toy_op, params=params, direction="forward", dtype="float32",
                         impl=impl, measurement=found, measured=measured or {},
                         environment=environment or {}, baseline=baseline,
                         is_baseline=impl == toy_op.baseline)


def test_shipped_metrics_on_known_numbers(toy):
    op = registry.get_operator(TOY)
    elements = 2 * 3 * 4 * 5
    ctx = context(op, device_ms=2.0, host_us=30.0, as_called_ms=2.5,
                  baseline={"metrics": {"time_ms": 3.0}},
                  measured={"peak_memory_bytes": 3 * 2**20},
                  environment={"copy_bandwidth_gbps": 100.0})
    found = metrics.compute(ctx)
    assert found["time_ms"] == 2.0 and found["as_called_ms"] == 2.5
    assert found["host_overhead_us"] == 30.0
    assert found["tflops"] == pytest.approx(3.0 * elements / 2e-3 / 1e12)  # toy: 3 flops each
    gbps = 2.0 * 4 * elements / 2e-3 / 1e9  # toy: read + write, float32
    assert found["gbps"] == pytest.approx(gbps)
    assert found["roofline_fraction"] == pytest.approx(gbps / 100.0)
    assert found["speedup"] == pytest.approx(1.5)
    assert found["peak_memory_mib"] == pytest.approx(3.0)


def test_metrics_without_their_inputs_are_absent_not_zero(toy):
    found = metrics.compute(context(registry.get_operator(TOY)))
    assert not {"host_overhead_us", "as_called_ms", "peak_memory_mib", "speedup",
                "roofline_fraction"} & set(found)
    assert metrics.compute(context(registry.get_operator(TOY), impl="baseline"))["speedup"] == 1.0


def test_a_metric_is_registered_once_with_a_direction():
    with pytest.raises(RegistryError, match="metric 'time_ms' is registered twice"):
        metrics.metric("time_ms", "ms")(lambda ctx: 1.0)
    with pytest.raises(RegistryError, match="better must be 'lower' or 'higher', got 'up'"):
        metrics.metric("x", "", better="up")


@pytest.fixture
def calls_per_second(monkeypatch):
    """A new metric, registered as a plugin or a module of the repository would."""
    monkeypatch.setattr(metrics, "METRICS", dict(metrics.METRICS))

    @metrics.metric("calls_per_s", "1/s", better="higher")
    def calls_per_s(ctx: MetricContext) -> float:
        """Calls per second of device time."""
        return 1.0 / ctx.seconds

    return calls_per_s


def test_a_new_metric_reaches_every_consumer(toy, toy_suite, tmp_path, calls_per_second):
    def run(out):
        options = runner.RunOptions(suite=suites.load(toy_suite), device="cpu", out=out,
                                    impls=["good", "baseline"], dtypes=["float32"], timing=FAST)
        console = Console(file=io.StringIO(), width=400)
        runner.run_suite(options, console)
        return console.file.getvalue()

    printed = run(tmp_path / "a")
    run(tmp_path / "b")
    stored = [r for r in results.read_rows(tmp_path / "a") if r["time_median_ms"]]
    assert stored and all(r["metrics"]["calls_per_s"] == pytest.approx(1e3 / r["time_median_ms"])
                          for r in stored)
    frame = results.load(tmp_path / "a")
    assert "calls_per_s" in frame.columns and frame["calls_per_s"].notna().sum() == len(stored)
    assert "calls_per_s 1/s ↑" in printed  # the summary's metrics table
    exported = benchmark_export.export(tmp_path / "a")["benchmarks"]
    assert all("calls_per_s" in b["extra_info"] for b in exported)
    changes = compare.compare_runs(tmp_path / "a", tmp_path / "b").metric_changes
    assert "calls_per_s" in set(changes["metric"])
    assert set(changes[changes["metric"] == "calls_per_s"]["better"]) == {"higher"}
    console = Console(file=io.StringIO(), width=400)
    print_summary(results.read_rows(tmp_path / "a"), console)
    assert "calls_per_s" in console.file.getvalue()
