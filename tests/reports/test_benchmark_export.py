"""pytest-benchmark JSON export, read back by pytest-benchmark itself, and the pytest entry."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from harness import benchmark_export, results

ROOT = Path(__file__).resolve().parents[2]


def test_export_is_read_by_pytest_benchmark_compare(smoke_run, slow_history, tmp_path):
    rows = [r for r in results.read_rows(smoke_run) if r["time_median_ms"]]
    document = benchmark_export.export(smoke_run)
    assert len(document["benchmarks"]) == len(rows)
    first, row = document["benchmarks"][0], rows[0]
    samples_s = [float(s) / 1e3 for s in results.decode_samples(row["samples"]["time_ms"])]
    assert first["stats"]["data"] == samples_s  # every sample, as taken
    assert first["stats"]["rounds"] == row["time_samples"] == len(samples_s)
    assert first["stats"]["median"] == pytest.approx(row["time_median_ms"] / 1e3, rel=1e-6)
    assert first["stats"]["min"] == pytest.approx(row["time_min_ms"] / 1e3, rel=1e-6)
    assert first["stats"]["mean"] == pytest.approx(statistics.fmean(samples_s))
    assert first["stats"]["stddev"] == pytest.approx(statistics.stdev(samples_s))
    assert first["extra_info"]["rel_l2"] == row["rel_l2"]
    assert first["extra_info"]["timer"] == "cpu-clock"
    assert first["extra_info"]["time_ms"] == row["metrics"]["time_ms"]
    assert document["machine_info"]["gpu"] is None  # a CPU run
    assert document["machine_info"]["cpu"]["brand_raw"] == results.read_metadata(smoke_run)["cpu"]
    base, new = tmp_path / "0001_base.json", tmp_path / "0002_new.json"
    assert benchmark_export.main([str(slow_history[-2]), "-o", str(base)]) == 0
    assert benchmark_export.main([str(slow_history[-1]), "-o", str(new)]) == 0
    shown = subprocess.run(
        [sys.executable, "-m", "pytest_benchmark", "compare", str(base), str(new),
         "--columns=min,median,iqr,rounds", "--group-by=name"],
        capture_output=True, text=True, check=True).stdout
    assert first["name"] in shown


def test_a_v1_run_exports_its_summary_without_inventing_samples():
    committed = ROOT / "results/cpu/20261128T174700Z-smoke"
    row = next(r for r in results.read_rows(committed) if r["time_median_ms"])
    found = benchmark_export.stats(row)
    assert "data" not in found and found["median"] == row["time_median_ms"] / 1e3
    assert found["rounds"] == row["time_samples"]


def test_pytest_entry_times_with_the_harness_timer(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks",
         "--benchmark-only", "--dcn-op", "conv2d", "--dcn-impl", "pytorch",
         "--dcn-dtype", "float32", "--dcn-rep-ms", "2", f"--benchmark-json={out}"],
        cwd=ROOT, check=True, capture_output=True)
    benchmarks = json.loads(out.read_text())["benchmarks"]
    assert len(benchmarks) == 4  # two shapes, forward and backward
    for bench in benchmarks:
        assert bench["extra_info"]["timer"] == "cpu-clock"
        assert bench["extra_info"]["status"] == "ok"
        assert bench["stats"]["rounds"] >= 5  # the harness's minimum sample count
        # pytest-benchmark's statistics of the harness's samples (replayed by its timer):
        # the same median as the row's, not pytest-benchmark's own clock.
        assert bench["stats"]["median"] * 1e3 == pytest.approx(
            bench["extra_info"]["time_ms"], rel=1e-5)
