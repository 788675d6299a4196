"""Two runs case by case: time ratios with their noise, verdicts, geometric means.

Used by ``dcnbench compare BASE NEW`` (a terminal table and an exit status CI can
gate on) and by the report's compare page. Needs pandas and rich only, so it
runs on a GPU box without the report's dependencies.

The rule (docs/reports.md):

- ``ratio`` = new median / base median (above 1: slower);
- ``noise`` = relative half-IQRs added in quadrature,
  √((iqr_base / 2·median_base)² + (iqr_new / 2·median_new)²);
- ``slower`` / ``faster`` when |ratio − 1| exceeds both 2 · noise and the
  minimum effect (default 2 %); ``same`` when it exceeds neither and
  2 · noise is below the minimum effect (the measurement could have seen a
  change of that size); ``unclear`` otherwise: the timings are too noisy to
  say.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness import results

KEY = ["case_id", "impl", "direction"]
VERDICTS = ("slower", "faster", "same", "unclear")
VERDICT_STYLE = {"slower": "bold red", "faster": "green", "same": "dim", "unclear": "yellow"}
MIN_EFFECT = 0.02


@dataclasses.dataclass
class Comparison:
    base: str  # run ids
    new: str
    cases: pd.DataFrame  # one row per case × impl × direction timed in both runs
    status_changes: pd.DataFrame  # rows whose status differs between the runs
    geomeans: pd.DataFrame  # op, impl, direction, speedup (base / new), cases


def verdicts(ratio: pd.Series, noise: pd.Series, min_effect: float = MIN_EFFECT) -> pd.Series:
    """The verdict of each ratio given its noise (see the module's docstring)."""
    change = (ratio - 1).abs()
    confident = (change > 2 * noise) & (change > min_effect)
    verdict = np.where(
        confident, np.where(ratio > 1, "slower", "faster"),
        np.where((change <= min_effect) & (2 * noise <= min_effect), "same", "unclear"))
    return pd.Series(verdict, index=ratio.index, dtype=object)


def compare_frames(base: pd.DataFrame, new: pd.DataFrame, min_effect: float = MIN_EFFECT
                   ) -> Comparison:
    """Compare two runs' rows (``harness.results.load`` frames of one run each)."""
    columns = [*KEY, "op", "dtype", "mode", "status", "time_median_ms", "time_iqr_ms",
               "reproduce"]
    joined = base[columns].merge(new[columns], on=[*KEY, "op", "dtype", "mode"],
                                 suffixes=("_base", "_new"))
    changed = joined[joined["status_base"] != joined["status_new"]]
    timed = joined.dropna(subset=["time_median_ms_base", "time_median_ms_new"]).copy()
    timed = timed[(timed["time_median_ms_base"] > 0) & (timed["time_median_ms_new"] > 0)]
    timed["ratio"] = timed["time_median_ms_new"] / timed["time_median_ms_base"]
    timed["noise"] = np.hypot(timed["time_iqr_ms_base"] / (2 * timed["time_median_ms_base"]),
                              timed["time_iqr_ms_new"] / (2 * timed["time_median_ms_new"]))
    timed["change_pct"] = (timed["ratio"] - 1) * 100
    timed["verdict"] = verdicts(timed["ratio"], timed["noise"], min_effect)
    timed = timed.sort_values("ratio", ascending=False, ignore_index=True)
    geomeans = (timed.assign(log_speedup=-np.log(timed["ratio"]))
                .groupby(["op", "impl", "direction"], as_index=False)
                .agg(log_speedup=("log_speedup", "mean"), cases=("ratio", "size")))
    geomeans["speedup"] = np.exp(geomeans.pop("log_speedup"))
    base_id = base["run_id"].iloc[0] if len(base) else ""
    new_id = new["run_id"].iloc[0] if len(new) else ""
    return Comparison(base_id, new_id, timed, changed.reset_index(drop=True), geomeans)


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
                  caption="ratio = new / base median time; noise = half-IQRs in quadrature",
                  caption_justify="left")
    for header in ("case", "impl", "direction", "base ms", "new ms", "change", "noise",
                   "verdict"):
        table.add_column(header, overflow="fold",
                         justify="right" if header.endswith(("ms", "change", "noise"))
                         else "left")
    shown = cases if limit is None or len(cases) <= limit else pd.concat(
        [cases.head(limit // 2), cases.tail(limit - limit // 2)])
    for row in shown.itertuples():
        style = VERDICT_STYLE[row.verdict]
        table.add_row(escape(row.case_id), row.impl, row.direction,
                      f"{row.time_median_ms_base:.4g}", f"{row.time_median_ms_new:.4g}",
                      f"{row.change_pct:+.1f}%", f"±{100 * row.noise:.1f}%",
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
    counts = cases["verdict"].value_counts()
    console.print("  ".join(f"[{VERDICT_STYLE[v]}]{counts.get(v, 0)} {v}[/]" for v in VERDICTS))

