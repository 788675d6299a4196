"""Synthetic run histories for the report tests, written by the harness's own writers.

Each synthetic run copies a real run's rows and metadata (so every field is one the
harness writes) and changes only what differs from run to run: the run id, start
time and commit, and the timings (the samples with their summary), scaled per
row by a seeded noise factor and, where asked, a planted slowdown. The metrics
that follow from the time (time_ms, tflops, gbps, roofline_fraction, speedup)
are recomputed from the scaled times as ``harness.metrics`` computes them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
from collections.abc import Callable
from pathlib import Path

from harness import results
from harness.results import Row

ROW_FIELDS = {f.name for f in dataclasses.fields(Row)}


def _scaled(rows: list[dict], factor: Callable[[dict], float]) -> list[dict]:
    out = []
    for row in rows:
        row = dict(row, metrics=dict(row["metrics"]))
        if row["time_median_ms"] is not None:
            f = factor(row)
            for key in ("time_median_ms", "time_iqr_ms", "time_min_ms"):
                row[key] *= f
            if row["samples"]:
                row["samples"] = dict(row["samples"], time_ms=results.encode_samples(
                    results.decode_samples(row["samples"]["time_ms"]) * f))
            median_s = row["time_median_ms"] * 1e-3
            row["metrics"]["time_ms"] = row["time_median_ms"]
            if row["flops"] is not None:
                row["metrics"]["tflops"] = row["flops"] / median_s / 1e12
            if row["bytes"] is not None:
                row["metrics"]["gbps"] = row["bytes"] / median_s / 1e9
        out.append(row)
    baselines = {(r["case_id"], r["direction"]): r["time_median_ms"] for r in out
                 if r["impl_kind"] == "baseline" and r["time_median_ms"] is not None}
    for row in out:
        base = baselines.get((row["case_id"], row["direction"]))
        if row["time_median_ms"] is not None and base is not None:
            row["metrics"]["speedup"] = base / row["time_median_ms"]
    return out


def write_run(source: Path, out: Path, run_id: str, when: dt.datetime, commit: str,
              factor: Callable[[dict], float], edit: Callable[[dict], dict] | None = None
              ) -> Path:
    """A run directory ``out/run_id`` made from the real run ``source``."""
    metadata = results.read_metadata(source)
    rows = _scaled(results.read_rows(source), factor)
    bandwidth = metadata.get("copy_bandwidth_gbps")
    metadata.update(run_id=run_id, time=when.isoformat(timespec="seconds"),
                    git={"commit": commit, "dirty": False})
    metadata.pop("schema_version")
    run = results.RunDir(out / run_id)
    run.create(metadata)
    for row in rows:
        if edit is not None:
            row = edit(row)
        if bandwidth and "gbps" in row["metrics"]:
            row["metrics"]["roofline_fraction"] = row["metrics"]["gbps"] / bandwidth
        run.append(Row(**{k: v for k, v in row.items() if k in ROW_FIELDS}))
    return out / run_id


def history(source: Path, out: Path, runs: int, slow_impl: str | None = None,
            slowdown: float = 1.0, seed: int = 0) -> list[Path]:
    """``runs`` runs a day apart, each row's time within ±3 % of the source's; the last
    run has ``slow_impl``'s times multiplied by ``slowdown``."""
    rng = random.Random(seed)
    start = dt.datetime(2026, 11, 1, 2, 0, tzinfo=dt.UTC)
    paths = []
    for n in range(runs):
        last = n == runs - 1

        def factor(row, last=last):
            planted = slowdown if last and row["impl"] == slow_impl else 1.0
            return planted * (1 + rng.uniform(-0.03, 0.03))

        paths.append(write_run(source, out, f"{20261101 + n}T020000Z-synthetic", start
                               + dt.timedelta(days=n), f"{n:040x}", factor))
    return paths
