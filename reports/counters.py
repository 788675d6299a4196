"""The counters page: our kernel designs side by side in the traffic the
emulator's counters mode counts (docs/counters.md), from the counters documents
under the report's folders (``results/counters/*.json``, written by
``dcnbench counters --suite … --update``).

For each operator: a table of every kernel of every case, implementation and
direction (sectors per request, efficiency, atomic sectors, DRAM bytes against
the operator's ideal bytes, the modelled floor and what bounds it) and a chart of
the modelled floors, direct against vectorized, forward against backward. The
floors are a model, and the page says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from reports import figures

PAGE = "counters.html"
KINDS = ("load", "store", "atomic")


def find_documents(folders: Iterable[Path]) -> list[Path]:
    """Every counters document (``counters/*.json``) under ``folders``."""
    found = set()
    for folder in folders:
        folder = Path(folder)
        if folder.is_dir():
            found.update(folder.glob("**/counters/*.json"))
    return sorted(found)


def _rows(document: dict[str, Any]) -> list[dict[str, Any]]:
    cases = document.get("cases", {})
    rows = []
    for kernel in document["kernels"].values():
        case = cases.get(f"{kernel['case_id']} {kernel['impl']} {kernel['direction']}", {})
        requests, sectors = kernel["requests"], kernel["sectors_by_kind"]
        useful = sum(kernel["bytes_useful"].values())
        rows.append({
            **{f"{kind}_per_request": sectors[kind] / requests[kind] if requests[kind] else None
               for kind in KINDS},
            "op": kernel["op"], "case": kernel["case_id"].split("/", 1)[-1],
            "case_id": kernel["case_id"], "dtype": kernel["dtype"], "impl": kernel["impl"],
            "direction": kernel["direction"], "kernel": kernel["kernel"],
            "launches": kernel["launches"],
            "efficiency": useful / (32 * kernel["sectors"]) if kernel["sectors"] else None,
            "atomic_sectors": kernel["atomic_sectors"], "dram_mb": kernel["dram_bytes"] / 1e6,
            "shared_per_request": (kernel["shared_wavefronts"] / kernel["shared_requests"]
                                   if kernel.get("shared_requests") else None),
            "ideal_mb": case["ideal_bytes"] / 1e6 if case.get("ideal_bytes") else None,
            "floor_us": kernel["floor_s"] * 1e6, "bound": kernel["bound"],
            "roofline": case.get("roofline_fraction"),
        })
    return sorted(rows, key=lambda r: (r["op"], r["case"], r["dtype"], r["direction"],
                                       r["impl"], r["kernel"]))


def floor_chart(rows: Sequence[dict[str, Any]], op: str) -> dict[str, Any]:
    """Modelled floor (µs) of each case × dtype, one bar per implementation × direction
    (the kernels of one direction summed)."""
    cases = sorted({(r["case"], r["dtype"]) for r in rows})
    designs = sorted({(r["impl"], r["direction"]) for r in rows},
                     key=lambda d: (d[1] != "forward", d[0]))
    colours = figures.colour_of([f"{impl} · {direction}" for impl, direction in designs])
    data = []
    for impl, direction in designs:
        name = f"{impl} · {direction}"
        floors = [sum(r["floor_us"] for r in rows if (r["case"], r["dtype"]) == case
                      and (r["impl"], r["direction"]) == (impl, direction)) or None
                  for case in cases]
        data.append({"type": "bar", "name": name, "x": [f"{c[:38]} · {d}" for c, d in cases],
                     "y": floors, "marker": {"color": colours[name]},
                     "hovertemplate": "%{x}<br>%{y:.3g} µs (modelled)<extra>" + name
                                      + "</extra>"})
    layout = {"title": {"text": f"{op}: modelled floor per design (a model, not a measurement)"},
              "barmode": "group", "height": 420, "margin": {"b": 160, "t": 60},
              "yaxis": {"title": {"text": "modelled floor (µs)"}, "type": "log"},
              "xaxis": {"tickangle": -30, "automargin": True},
              "legend": {"orientation": "h", "y": 1.12}}
    return {"data": data, "layout": layout}


def render(site, folders: Iterable[Path]) -> dict[str, str] | None:
    """Writes the counters page of the newest document found; returns the index's
    entry for it, or None when there is none."""
    documents = find_documents(folders)
    if not documents:
        return None
    path = max(documents, key=lambda p: p.stat().st_mtime)
    document = json.loads(path.read_text())
    rows = _rows(document)
    ops = sorted({r["op"] for r in rows})
    site.render(PAGE, "counters.html", title="kernel counters (emulated; floors modelled)",
                document=document, source=path.as_posix(), ops=ops,
                rows_of={op: [r for r in rows if r["op"] == op] for op in ops},
                figures={op: floor_chart([r for r in rows if r["op"] == op], op) for op in ops})
    return {"path": PAGE, "suite": document["suite"], "gpu": document["gpu"],
            "kernels": str(len(document["kernels"]))}
