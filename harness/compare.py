"""Two runs case by case: rank tests on the samples, effect sizes, verdicts, geometric means.

Used by ``dcnbench compare BASE NEW`` (a terminal table and an exit status CI can
gate on) and by the report's compare page. Needs pandas, scipy and rich only, so it
runs on a GPU box without the report's dependencies.

The rule (docs/reports.md), per case timed in both runs, on device time:

- ``ratio`` = new median / base median (above 1: slower);
- ``p_value``: two-sided Mann–Whitney U test of the two runs' samples (scipy):
  how likely samples this far apart are when both runs draw from one distribution;
- ``slower`` / ``faster`` when p < ``ALPHA`` *and* the effect is large: the
  medians differ by more than the minimum effect (default 2 %) and by more than
  twice the larger of the two IQRs;
- ``same`` when |ratio − 1| is within the minimum effect and twice the larger
  IQR is too (the measurement could have seen a change of that size);
- ``unclear`` otherwise: the timings are too noisy, or too few, to say.

Rows without samples (results schema v1) have no rank test: their verdicts
rest on the effect size alone, and ``p_value`` is NaN.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from scipy.stats import mannwhitneyu

from harness import metrics as metric_registry
from harness import results

KEY = ["case_id", "impl", "direction"]
VERDICTS = ("slower", "faster", "same", "unclear")
VERDICT_STYLE = {"slower": "bold red", "faster": "green", "same": "dim", "unclear": "yellow"}
MIN_EFFECT = 0.02
ALPHA = 0.01


@dataclasses.dataclass
class Comparison:
    base: str  # run ids
    new: str
    cases: pd.DataFrame  # one row per case × impl × direction timed in both runs
    status_changes: pd.DataFrame  # rows whose status differs between the runs
    geomeans: pd.DataFrame  # op, impl, direction, speedup (base / new), cases
    metric_changes: pd.DataFrame  # op, impl, direction, metric, unit, better, ratio (new / base)


def rank_test(base: np.ndarray | None, new: np.ndarray | None) -> float:
    """Two-sided Mann–Whitney U p-value of two sample sets; NaN without samples."""
    if base is None or new is None or len(base) < 2 or len(new) < 2:
        return float("nan")
    return float(mannwhitneyu(base, new, alternative="two-sided").pvalue)


def verdict(median_base: float, median_new: float, iqr_base: float, iqr_new: float,
            p_value: float, min_effect: float = MIN_EFFECT, alpha: float = ALPHA) -> str:
    """The verdict of one case (see the module's docstring)."""
    change = abs(median_new - median_base)
    spread = 2 * max(iqr_base, iqr_new)
    large = change > min_effect * median_base and change > spread
    significant = np.isnan(p_value) or p_value < alpha
    if large and significant:
        return "slower" if median_new > median_base else "faster"
    if change <= min_effect * median_base and spread <= min_effect * median_base:
        return "same"
    return "unclear"


def _time_samples(frame: pd.DataFrame) -> list[np.ndarray | None]:
    return [None if s is None or "time_ms" not in s else s["time_ms"] for s in frame["samples"]]


def compare_frames(base: pd.DataFrame, new: pd.DataFrame, min_effect: float = MIN_EFFECT
                   ) -> Comparison:
    """Compare two runs' rows (``harness.results.load`` frames of one run each)."""
    columns = [*KEY, "op", "dtype", "mode", "status", "time_median_ms", "time_iqr_ms",
               "reproduce", "metrics"]
    base, new = base.assign(time_samples_ms=_time_samples(base)), new.assign(
        time_samples_ms=_time_samples(new))
    joined = base[[*columns, "time_samples_ms"]].merge(
        new[[*columns, "time_samples_ms"]], on=[*KEY, "op", "dtype", "mode"],
        suffixes=("_base", "_new"))
    changed = joined[joined["status_base"] != joined["status_new"]]
    timed = joined.dropna(subset=["time_median_ms_base", "time_median_ms_new"]).copy()
    timed = timed[(timed["time_median_ms_base"] > 0) & (timed["time_median_ms_new"] > 0)]
    timed["ratio"] = timed["time_median_ms_new"] / timed["time_median_ms_base"]
    timed["p_value"] = [rank_test(b, n) for b, n in zip(
        timed["time_samples_ms_base"], timed["time_samples_ms_new"], strict=True)]
    timed["spread_pct"] = 200 * np.maximum(timed["time_iqr_ms_base"], timed["time_iqr_ms_new"]
                                           ) / timed["time_median_ms_base"]
    timed["change_pct"] = (timed["ratio"] - 1) * 100
    timed["verdict"] = [
        verdict(r.time_median_ms_base, r.time_median_ms_new, r.time_iqr_ms_base,
                r.time_iqr_ms_new, r.p_value, min_effect)
        for r in timed.itertuples()] if len(timed) else pd.Series(dtype=object)
    timed = timed.sort_values("ratio", ascending=False, ignore_index=True)
    geomeans = (timed.assign(log_speedup=-np.log(timed["ratio"]))
                .groupby(["op", "impl", "direction"], as_index=False)
                .agg(log_speedup=("log_speedup", "mean"), cases=("ratio", "size")))
    geomeans["speedup"] = np.exp(geomeans.pop("log_speedup"))
    base_id = base["run_id"].iloc[0] if len(base) else ""
    new_id = new["run_id"].iloc[0] if len(new) else ""
    return Comparison(base_id, new_id, timed, changed.reset_index(drop=True), geomeans,
                      metric_changes(timed))


def metric_changes(timed: pd.DataFrame) -> pd.DataFrame:
    """Per operator × implementation × direction and registered metric present in both
    runs, the geometric mean of new / base."""
    records = []
    for row in timed.itertuples():
        for name, entry in metric_registry.METRICS.items():
            old, now = row.metrics_base.get(name), row.metrics_new.get(name)
            if old and now and old > 0 and now > 0:
                records.append({"op": row.op, "impl": row.impl, "direction": row.direction,
                                "metric": name, "unit": entry.unit, "better": entry.better,
                                "log_ratio": np.log(now / old)})
    columns = ["op", "impl", "direction", "metric", "unit", "better"]
    if not records:
        return pd.DataFrame(columns=[*columns, "ratio", "cases"])
    means = (pd.DataFrame(records).groupby(columns, as_index=False, sort=False)
             .agg(log_ratio=("log_ratio", "mean"), cases=("log_ratio", "size")))
    means["ratio"] = np.exp(means.pop("log_ratio"))
    return means


def compare_runs(base_dir: Path, new_dir: Path, min_effect: float = MIN_EFFECT) -> Comparison:
    return compare_frames(_one_run(base_dir), _one_run(new_dir), min_effect)


def _one_run(path: Path) -> pd.DataFrame:
    if not (Path(path) / results.METADATA).is_file():
        raise FileNotFoundError(f"{path}: not a run directory (no {results.METADATA})")
    return results.load(path)


def regressions(comparison: Comparison, fail_above_pct: float) -> pd.DataFrame:
    """Cases slower, with confidence, by more than ``fail_above_pct`` percent."""
    cases = comparison.cases
    return cases[(cases["verdict"] == "slower") & (cases["change_pct"] > fail_above_pct)]


def print_comparison(comparison: Comparison, console: Console, limit: int | None = 40) -> None:
    """The case table (slowest changes first, ``limit`` lines at most), the status
    changes and the geometric means."""
    cases = comparison.cases
    table = Table(title=f"{comparison.new} against {comparison.base}", title_justify="left",
                  caption="change of the median device time; spread = 2 × the larger IQR; "
                          "p = Mann–Whitney U on the samples",
                  caption_justify="left")
    for header in ("case", "impl", "direction", "base ms", "new ms", "change", "spread", "p",
                   "verdict"):
        table.add_column(header, overflow="fold",
                         justify="right" if header.endswith(("ms", "change", "spread", "p"))
                         else "left")
    shown = cases if limit is None or len(cases) <= limit else pd.concat(
        [cases.head(limit // 2), cases.tail(limit - limit // 2)])
    for row in shown.itertuples():
        style = VERDICT_STYLE[row.verdict]
        table.add_row(escape(row.case_id), row.impl, row.direction,
                      f"{row.time_median_ms_base:.4g}", f"{row.time_median_ms_new:.4g}",
                      f"{row.change_pct:+.1f}%", f"±{row.spread_pct:.1f}%",
                      "-" if np.isnan(row.p_value) else f"{row.p_value:.2g}",
                      f"[{style}]{row.verdict}[/]")
    if len(shown) < len(cases):
        table.caption += f"; {len(cases) - len(shown)} cases in the middle left out"
    console.print(table)
    if len(comparison.status_changes):
        changes = Table(title="status changes", title_justify="left")
        for header in ("case", "impl", "direction", "base", "new"):
            changes.add_column(header)
        for row in comparison.status_changes.itertuples():
            changes.add_row(escape(row.case_id), row.impl, row.direction, row.status_base,
                            row.status_new)
        console.print(changes)
    means = Table(title="geometric-mean speedup (base time / new time)", title_justify="left")
    for header in ("operator", "impl", "direction", "cases", "speedup"):
        means.add_column(header, justify="right" if header in ("cases", "speedup") else "left")
    for row in comparison.geomeans.itertuples():
        means.add_row(row.op, row.impl, row.direction, str(row.cases), f"{row.speedup:.3f}×")
    console.print(means)
    if len(comparison.metric_changes):
        metrics = Table(title="metrics: geometric mean of new / base", title_justify="left")
        for header in ("operator", "impl", "direction", "metric", "better", "cases", "new / base"):
            metrics.add_column(header, justify="right" if header in ("cases", "new / base")
                               else "left")
        for row in comparison.metric_changes.itertuples():
            metrics.add_row(row.op, row.impl, row.direction,
                            f"{row.metric} ({row.unit})" if row.unit else row.metric,
                            row.better, str(row.cases), f"{row.ratio:.3f}")
        console.print(metrics)
    counts = cases["verdict"].value_counts()
    console.print("  ".join(f"[{VERDICT_STYLE[v]}]{counts.get(v, 0)} {v}[/]" for v in VERDICTS))

