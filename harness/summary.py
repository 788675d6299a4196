"""The end-of-run tables: pass/fail and speedups per operator × implementation × dtype,
then the geometric mean of every registered metric (``harness.metrics``) the rows have."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.table import Table

from harness import metrics, registry
from harness.results import DIRECTIONS, STATUSES

STATUS_STYLE = {"ok": "green", "fail": "bold red", "xfail": "yellow", "error": "bold magenta",
                "skipped": "dim"}


def _status_cell(counts: Counter) -> str:
    parts = [f"[{STATUS_STYLE[s]}]{counts[s]} {s}[/]" for s in STATUSES if counts[s]]
    return " ".join(parts) or "[dim]-[/]"


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _speedup_cell(speedups: list[float]) -> str:
    return f"{geometric_mean(speedups):#.3g}×" if speedups else "[dim]-[/]"


def summary_table(rows: Iterable[dict[str, Any]]) -> Table:
    """One line per operator × implementation × dtype: statuses per direction and the
    geometric mean of the speedups over the operator's baseline."""
    counts: dict[tuple, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    speedups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        key = (row["op"], row["impl"], row["dtype"])
        counts[key][row["direction"]][row["status"]] += 1
        speedup = (row.get("metrics") or {}).get("speedup")
        if speedup:
            speedups[key][row["direction"]].append(speedup)
    baselines = ", ".join(f"{op} → {registry.get_operator(op).baseline}"
                          for op in sorted({key[0] for key in counts}))
    table = Table(title="dcnbench results", title_justify="left", caption_justify="left",
                  caption=f"speedup: geometric mean of baseline time / time ({baselines})")
    for header in ("operator", "implementation", "dtype"):
        table.add_column(header)
    for direction in DIRECTIONS:
        table.add_column(direction)
    for direction in DIRECTIONS:
        table.add_column(f"{direction} speedup", justify="right")
    for key in sorted(counts):
        table.add_row(
            *key,
            *(_status_cell(counts[key][d]) for d in DIRECTIONS),
            *(_speedup_cell(speedups[key][d]) for d in DIRECTIONS),
        )
    return table


def metrics_table(rows: Iterable[dict[str, Any]]) -> Table | None:
    """Per operator × implementation × dtype × direction, the geometric mean of each
    registered metric over the rows that have it; None when no row has any."""
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for name, value in (row.get("metrics") or {}).items():
            if name in metrics.METRICS and value and value > 0:
                values[(row["op"], row["impl"], row["dtype"], row["direction"])][name].append(value)
    shown = [m for m in metrics.METRICS.values() if any(m.name in v for v in values.values())]
    if not shown:
        return None
    table = Table(title="metrics (geometric means)", title_justify="left",
                  caption="↑ higher is better, ↓ lower is better", caption_justify="left")
    for header in ("operator", "implementation", "dtype", "direction"):
        table.add_column(header)
    for entry in shown:
        arrow = "↑" if entry.better == "higher" else "↓"
        table.add_column(f"{entry.name} {entry.unit} {arrow}".replace("  ", " "), justify="right")
    for key in sorted(values):
        table.add_row(*key, *(f"{geometric_mean(values[key][m.name]):#.3g}"
                              if values[key][m.name] else "[dim]-[/]" for m in shown))
    return table


def print_summary(rows: list[dict[str, Any]], console: Console) -> None:
    console.print(summary_table(rows))
    if (table := metrics_table(rows)) is not None:
        console.print(table)
    totals = Counter(row["status"] for row in rows)
    console.print("  ".join(f"[{STATUS_STYLE[s]}]{totals[s]} {s}[/]" for s in STATUSES))
