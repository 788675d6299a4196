"""The peers page: operator × implementation × dtype, per device, with three verdicts.

For every implementation other than the float64 references, over every row
of every run in the report:

- **supported**: it ran (ok, fail or xfail rows) — "yes"; only errors — "no"
  with the first error; only skipped rows — "absent" with the reason (a
  package not installed here, a GPU-only peer on a CPU run).
- **passes float64**: every forward and every gradient row passed the check
  against the float64 reference — "yes", else how many of its checked rows
  did not (fail and xfail: a peer's known inaccuracy still misses the contract).
- **speed**: the geometric mean of its ``speedup`` over the operator's
  baseline on the rows that were timed (emulated kernels are never timed).
- **precision**: whether it computes float16 / bfloat16 natively or upcasts, as
  the runs' metadata says (``peers.precision``, written by
  ``harness.operators.peer_packages``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

CHECKED = ("ok", "fail", "xfail")


def table(frame: pd.DataFrame, metadata: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (device, op, impl, dtype) of the non-reference rows, sorted;
    ``metadata`` is each run's metadata by run id."""
    precision: dict[str, dict[str, str]] = {}
    for run in metadata.values():
        for key, dtypes in run.get("peers", {}).get("precision", {}).items():
            precision.setdefault(key, {}).update(dtypes)
    rows = frame[frame["impl_kind"] != "reference"]
    entries = []
    for (device, op, impl, dtype), group in rows.groupby(["device", "op", "impl", "dtype"],
                                                          sort=True):
        statuses = group["status"]
        checked = group[statuses.isin(CHECKED)]
        if len(checked):
            supported = "yes"
        elif (statuses == "error").any():
            supported = "no: " + str(group.loc[statuses == "error", "reason"].iloc[0])[:200]
        else:
            supported = "absent: " + str(group["reason"].iloc[0])[:200]
        missed = int((checked["status"] != "ok").sum())
        passes = ("–" if not len(checked) else "yes" if missed == 0
                  else f"no: {missed} of {len(checked)} rows")
        speedups = [s for s in group.get("speedup", pd.Series(dtype=float)).dropna() if s > 0]
        speed = math.exp(sum(map(math.log, speedups)) / len(speedups)) if speedups else None
        entries.append({"device": device, "op": op, "impl": impl,
                        "kind": group["impl_kind"].iloc[0], "dtype": dtype,
                        "supported": supported, "passes": passes, "speed": speed,
                        "timed_rows": len(speedups), "precision": precision.get(f"{op}/{impl}", {}).get(dtype, "–")})
    return entries


def render(site, frame: pd.DataFrame, metadata: Mapping[str, Mapping[str, Any]]) -> str:
    """Write ``peers.html`` into ``site`` (a ``reports.site.Site``); its path."""
    path = "peers.html"
    site.render(path, "peers.html", title="peers", entries=table(frame, metadata))
    return path
