"""Time series of runs of the same device and suite, and the regression test.

A run's point for an operator × implementation × direction is its *time
index*: the geometric mean, over the cases it timed, of the case's median time
divided by that case's median over every stored run of the series (1 = as
usual; 1.2 = 20 % slower than usual).

A run is marked a regression for an operator × implementation × direction
(docs/reports.md) when, against the previous ``WINDOW`` runs (at least
``MIN_PREVIOUS``):

1. each case's ratio r = this run's median / the median of the previous runs'
   medians is formed; ratios within ±``TIE`` of 1 are ties and dropped;
2. a one-sided exact sign test says more cases got slower than chance would
   give (P(Binomial(n, ½) ≥ slower) < ``ALPHA``; no assumption on the shape of
   the timing noise, and cases count once each however noisy);
3. the geometric mean of r is at least 1 + ``MIN_EFFECT`` (a significant but
   tiny change is not a regression).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

WINDOW = 5
MIN_PREVIOUS = 3
TIE = 0.01
ALPHA = 0.01
MIN_EFFECT = 0.05
SERIES = ["op", "impl", "direction"]


def group_key(metadata: dict) -> tuple[str, str]:
    """Which runs form one history: the same device (GPU name, or CPU model) and suite."""
    device = metadata.get("gpu") or metadata.get("cpu") or metadata.get("device") or "unknown"
    return device, metadata["suite"]["name"]


def sign_test_p(slower: int, n: int) -> float:
    """One-sided exact sign test: P(Binomial(n, ½) ≥ slower)."""
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(slower, n + 1)) / 2**n


def series(rows: pd.DataFrame, run_order: list[str]) -> pd.DataFrame:
    """One row per run × operator × implementation × direction: the time index, the cases
    behind it, and the regression test against the previous runs.

    ``rows``: timed result rows of the runs of one history; ``run_order``: their run ids,
    oldest first.
    """
    timed = rows.dropna(subset=["time_median_ms"])
    timed = timed[timed["time_median_ms"] > 0]
    wide = timed.pivot_table(index=[*SERIES, "case_id"], columns="run_id",
                             values="time_median_ms", aggfunc="first")
    wide = wide[[r for r in run_order if r in wide.columns]]
    usual = wide.median(axis=1)
    log_index = np.log(wide.div(usual, axis=0))
    out = []
    for key, block in log_index.groupby(level=list(range(len(SERIES)))):
        runs = block.columns
        for position, run_id in enumerate(runs):
            values = block[run_id].dropna()
            if values.empty:
                continue
            point = dict(zip(SERIES, key, strict=True))
            point.update(run_id=run_id, time_index=float(np.exp(values.mean())),
                         cases=int(len(values)), regression=False, p_value=None,
                         ratio=None)
            previous = wide.loc[block.index, runs[max(0, position - WINDOW):position]]
            if previous.shape[1] >= MIN_PREVIOUS:
                point.update(_test(wide.loc[block.index, run_id], previous))
            out.append(point)
    columns = [*SERIES, "run_id", "time_index", "cases", "regression", "p_value", "ratio"]
    return pd.DataFrame(out, columns=columns)


def _test(current: pd.Series, previous: pd.DataFrame) -> dict:
    ratio = (current / previous.median(axis=1)).dropna()
    if ratio.empty:
        return {}
    untied = ratio[(ratio - 1).abs() > TIE]
    p_value = sign_test_p(int((untied > 1).sum()), len(untied))
    geomean = float(np.exp(np.log(ratio).mean()))
    return {"p_value": p_value, "ratio": geomean,
            "regression": bool(p_value < ALPHA and geomean >= 1 + MIN_EFFECT)}
