"""Export a run as pytest-benchmark JSON, so ``pytest-benchmark compare`` reads our runs.

    python -m harness.benchmark_export RUN_DIR [-o FILE.json]

One benchmark per timed row (case × implementation × direction), named
``<case_id>[<impl>-<direction>]`` and grouped by operator and direction.
``machine_info`` carries the GPU model, driver and CUDA version next to the
host's; ``commit_info`` the run's commit; each benchmark's ``extra_info`` the
row's own fields (errors, status, timer, SM clock) and every registered metric
the row has (``harness.metrics``: device time, host overhead, TFLOP/s, GB/s,
speedup, ...).

``stats`` (in seconds, as pytest-benchmark writes them) are pytest-benchmark's
own statistics (``pytest_benchmark.stats.Stats``) of the row's device-time
samples, which ``data`` carries whole: mean, standard deviation, outliers,
quartiles by its method. Rows of a results schema v1 run kept no samples: for
them the statistics pytest-benchmark would compute from samples are filled so
that its tables read correctly and say nothing false (``mean`` is the median,
``q1``/``q3`` are median ∓ IQR/2, ``max`` is ``q3``, ``stddev`` is IQR / 1.349,
outlier counts 0, no ``data``); compare those on ``min``, ``median`` or ``iqr``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness import results

EXTRA_FIELDS = ("case_id", "op", "impl", "impl_kind", "impl_source", "direction", "dtype",
                "mode", "device", "status", "rel_l2", "max_abs", "tol_rel_l2", "tol_max_abs",
                "timer", "timing_note", "time_median_ms", "time_iqr_ms", "time_min_ms",
                "time_samples", "time_noisy", "rechecked", "sm_clock_mhz", "gpu_temp_c",
                "flops", "bytes")
IQR_PER_STDDEV = 1.349  # the IQR of a normal distribution in standard deviations


def machine_info(metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "node": metadata.get("host"), "processor": metadata.get("cpu"),
        "machine": platform.machine(), "python_implementation": "CPython",
        "python_version": (metadata.get("versions") or {}).get("python"),
        "system": platform.system(), "release": platform.release(),
        "cpu": {"brand_raw": metadata.get("cpu")},
        "gpu": metadata.get("gpu"), "driver": metadata.get("driver"),
        "cuda": metadata.get("cuda"), "device": metadata.get("device"),
        "copy_bandwidth_gbps": metadata.get("copy_bandwidth_gbps"),
        "versions": metadata.get("versions"), "run_id": metadata.get("run_id"),
        "suite": (metadata.get("suite") or {}).get("name"),
    }


def stats(row: dict[str, Any]) -> dict[str, Any]:
    """pytest-benchmark's ``stats`` of a timed row (seconds); see the module docstring."""
    if row.get("samples") and "time_ms" in row["samples"]:
        from pytest_benchmark.stats import Stats  # only the export needs pytest-benchmark

        found = Stats()
        for sample_ms in results.decode_samples(row["samples"]["time_ms"]):
            found.update(float(sample_ms) / 1e3)
        return {**found.as_dict(), "iterations": 1, "data": list(found.data)}
    return _stats_without_samples(row)


def _stats_without_samples(row: dict[str, Any]) -> dict[str, Any]:
    """A v1 row's summary in pytest-benchmark's fields (module docstring)."""
    median, iqr = row["time_median_ms"] / 1e3, row["time_iqr_ms"] / 1e3
    q1, q3 = max(median - iqr / 2, 0.0), median + iqr / 2
    rounds = row["time_samples"]
    return {"min": row["time_min_ms"] / 1e3, "max": q3, "mean": median,
            "stddev": iqr / IQR_PER_STDDEV, "rounds": rounds, "median": median, "iqr": iqr,
            "q1": q1, "q3": q3, "iqr_outliers": 0, "stddev_outliers": 0, "outliers": "0;0",
            "ld15iqr": q1, "hd15iqr": q3, "ops": 1 / median, "total": median * rounds,
            "iterations": 1}


def benchmark(row: dict[str, Any]) -> dict[str, Any]:
    param = f"{row['impl']}-{row['direction']}"
    return {
        "group": f"{row['op']} {row['direction']}",
        "name": f"{row['case_id']}[{param}]",
        "fullname": f"dcnbench::{row['case_id']}[{param}]",
        "params": {"impl": row["impl"], "direction": row["direction"], **row["params"]},
        "param": param,
        "extra_info": {**{k: row.get(k) for k in EXTRA_FIELDS}, **row.get("metrics", {})},
        "options": {"disable_gc": False, "timer": row["timer"], "min_rounds": None,
                    "max_time": None, "min_time": None, "warmup": True},
        "stats": stats(row),
    }


def export(run_dir: Path) -> dict[str, Any]:
    """The pytest-benchmark JSON document of a run's timed rows."""
    metadata = results.read_metadata(run_dir)
    git = metadata.get("git") or {}
    rows = [r for r in results.read_rows(run_dir)
            if r["time_median_ms"] is not None and r["time_median_ms"] > 0]
    return {
        "machine_info": machine_info(metadata),
        "commit_info": {"id": git.get("commit"), "dirty": git.get("dirty"),
                        "time": metadata.get("time"), "project": "dcnbench", "branch": None},
        "benchmarks": [benchmark(r) for r in rows],
        "datetime": metadata.get("time"),
        "version": "5.2.3",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.benchmark_export",
                                     description="Write a run as pytest-benchmark JSON.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("-o", "--out", type=Path, metavar="FILE.json",
                        help="output file (default: standard output)")
    args = parser.parse_args(argv)
    if not (args.run_dir / results.METADATA).is_file():
        parser.error(f"RUN_DIR: {args.run_dir} is not a run directory (no {results.METADATA})")
    text = json.dumps(export(args.run_dir), indent=2, allow_nan=False)
    if args.out is None:
        sys.stdout.write(text + "\n")
    else:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
