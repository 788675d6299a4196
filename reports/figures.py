"""Plotly figures as plain dicts (``{"data": [...], "layout": {...}}``).

Built by hand rather than through ``plotly.graph_objects``, whose validation
costs milliseconds per trace: a site of thousands of rows has hundreds of
figures. Pages embed them as JSON and ``static/site.js`` draws each one when it
scrolls into view. Every function takes result rows (a DataFrame in the
schema of docs/results-schema.md) and knows no operator by name.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from harness.results import DIRECTIONS

STATUS_COLOURS = {"ok": "#2e7d32", "fail": "#c62828", "xfail": "#f9a825", "error": "#6a1b9a",
                  "skipped": "#9e9e9e"}
# Tableau 10: one colour per implementation, stable across the pages of a site.
PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
           "#ff9da7", "#9c755f", "#bab0ac"]
# Peak arithmetic throughput (TFLOP/s, dense) from the vendors' datasheets, for the
# roofline's flat roof: float32 on the CUDA cores (the contract forbids TF32), half
# types on the tensor cores. Devices missing here get the bandwidth roof only.
PEAK_TFLOPS = {
    "H200": {"float32": 67.0, "tf32": 494.7, "float16": 989.5, "bfloat16": 989.5},
    "H100 80GB HBM3": {"float32": 67.0, "tf32": 494.7, "float16": 989.5, "bfloat16": 989.5},
    "A100": {"float32": 19.5, "tf32": 156.0, "float16": 312.0, "bfloat16": 312.0},
}


def peak_tflops(gpu: str | None, precision: str) -> float | None:
    for name, peaks in PEAK_TFLOPS.items():
        if gpu and name in gpu:
            return peaks.get(precision)
    return None


def precision(rows: pd.DataFrame) -> pd.Series:
    """The arithmetic of each row's products, whose peak is its roof: the dtype, or
    "tf32" for a float32 case that allows TF32 tensor cores (a case parameter,
    docs/ops-semantics.md), which would otherwise sit far above float32's roof."""
    if "params.allow_tf32" not in rows:
        return rows["dtype"]
    tf32 = rows["params.allow_tf32"].astype("boolean").fillna(False).astype(bool)
    return rows["dtype"].mask(tf32 & (rows["dtype"] == "float32"), "tf32")


def colour_of(names: list[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted(names))}


def values(series: pd.Series) -> list:
    """JSON-safe list: NaN and None become null."""
    return [None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v
            for v in series.tolist()]


def hover(rows: pd.DataFrame) -> list[str]:
    """The full case of each row, for the hover box (the pages add it as a ``hover``
    column once, and every figure reads it)."""
    def timing(median: float, iqr: float) -> str:
        return f"{median:.4g} ms ± {iqr:.2g} (IQR)" if pd.notna(median) else "not timed"

    return [f"<b>{impl}</b> · {direction} · {status}<br>{case_id}<br>{timing(median, iqr)}"
            for impl, direction, status, case_id, median, iqr in zip(
                rows["impl"], rows["direction"], rows["status"], rows["case_id"],
                rows["time_median_ms"], rows["time_iqr_ms"], strict=True)]


def _side_by_side(title: str, xtitle: str, ytitle: str, log_x=False, log_y=False,
                  directions=DIRECTIONS) -> dict[str, Any]:
    """A layout with one panel per direction, forward left, backward right."""
    layout: dict[str, Any] = {
        "title": {"text": title}, "height": 380, "margin": {"t": 60, "b": 50, "l": 60, "r": 20},
        "hovermode": "closest", "legend": {"orientation": "h", "y": -0.2},
        "annotations": [],
    }
    width = 1 / len(directions)
    for n, direction in enumerate(directions):
        suffix = "" if n == 0 else str(n + 1)
        layout[f"xaxis{suffix}"] = {"domain": [n * width + 0.04, (n + 1) * width - 0.04],
                                    "title": {"text": xtitle}, "anchor": f"y{suffix}",
                                    **({"type": "log"} if log_x else {})}
        layout[f"yaxis{suffix}"] = {"title": {"text": ytitle if n == 0 else ""},
                                    "anchor": f"x{suffix}", **({"type": "log"} if log_y else {})}
        layout["annotations"].append({
            "text": direction, "showarrow": False, "xref": "paper", "yref": "paper",
            "x": (n + 0.5) * width, "y": 1.06, "font": {"size": 13}})
    return layout


def _axes(n: int) -> dict[str, str]:
    suffix = "" if n == 0 else str(n + 1)
    return {"xaxis": f"x{suffix}", "yaxis": f"y{suffix}"}


def series_groups(rows: pd.DataFrame) -> dict[tuple[str, str, str], np.ndarray]:
    """Positions of ``rows`` by (direction, implementation, dtype): one marker series
    each. Computed once per page and shared by its ``against_axis`` figures."""
    return rows.groupby(["direction", "impl", "dtype"], sort=True).indices


def against_axis(rows: pd.DataFrame, groups: dict[tuple[str, str, str], np.ndarray],
                 axis: str, metric: str, label: str, colours: dict[str, str]) -> dict[str, Any]:
    """``metric`` of every timed case against parameter ``axis``, forward | backward: one
    marker per case and one line through the geometric mean at each value, per
    implementation and dtype. ``rows`` has a ``hover`` column (``hover(rows)``);
    ``groups`` is ``series_groups(rows)``."""
    # numpy rather than pandas inside the loops: a site draws thousands of these.
    x_all = rows[f"params.{axis}"].to_numpy()
    if x_all.dtype == bool or x_all.dtype == object:
        x_all = x_all.astype(str)
    y_all = rows[metric].to_numpy(dtype=float, na_value=np.nan)
    hover_all = rows["hover"].to_numpy()
    timed = {key: index[y_all[index] > 0] for key, index in groups.items()}
    timed = {key: index for key, index in timed.items() if len(index)}
    directions = [d for d in DIRECTIONS if any(key[0] == d for key in timed)]
    data = []
    for (direction, impl, dtype), index in timed.items():
        n = directions.index(direction)
        name = f"{impl} · {dtype}"
        x, y = x_all[index], y_all[index]
        data.append({"type": "scattergl" if len(index) > 500 else "scatter",
                     "mode": "markers", "name": name, "legendgroup": name,
                     "showlegend": False, "x": x.tolist(), "y": y.tolist(),
                     "text": hover_all[index].tolist(),
                     "hovertemplate": "%{text}<extra></extra>",
                     "marker": {"color": colours[impl], "size": 6, "opacity": 0.45},
                     **_axes(n)})
        points, inverse = np.unique(x, return_inverse=True)
        means = np.exp(np.bincount(inverse, np.log(y)) / np.bincount(inverse))
        data.append({"type": "scatter", "mode": "lines+markers", "name": name,
                     "legendgroup": name, "showlegend": n == 0,
                     "x": points.tolist(), "y": means.tolist(),
                     "hovertemplate": f"{name}<br>{axis}=%{{x}}<br>geometric mean "
                                      f"%{{y:.4g}}<extra></extra>",
                     "line": {"color": colours[impl],
                              "dash": "solid" if dtype == "float32" else "dot"},
                     **_axes(n)})
    layout = _side_by_side(f"{label} against {axis}", axis, label, log_y=True,
                           directions=directions)
    return {"data": data, "layout": layout}


def roofline(rows: pd.DataFrame, bandwidth_gbps: float | None, gpu: str | None,
             colours: dict[str, str]) -> dict[str, Any]:
    """Achieved TFLOP/s against arithmetic intensity (FLOP per byte), forward | backward,
    under the roofs: the measured copy bandwidth and the device's peak for each dtype."""
    timed = rows.dropna(subset=["tflops", "flops", "bytes"])
    timed = timed[(timed["tflops"] > 0) & (timed["bytes"] > 0)]
    timed = timed.assign(precision=precision(timed))
    directions = [d for d in DIRECTIONS if d in set(timed["direction"])]
    data = []
    intensity_all = timed["flops"] / timed["bytes"]
    lo, hi = intensity_all.min() / 2, intensity_all.max() * 2
    for n, direction in enumerate(directions):
        block_dir = timed[timed["direction"] == direction]
        for (impl, kind), block in block_dir.groupby(["impl", "precision"]):
            data.append({"type": "scatter", "mode": "markers", "name": f"{impl} · {kind}",
                         "legendgroup": f"{impl} · {kind}", "showlegend": n == 0,
                         "x": values(block["flops"] / block["bytes"]),
                         "y": values(block["tflops"]), "text": block["hover"].tolist(),
                         "hovertemplate": "%{text}<br>%{x:.3g} FLOP/B, %{y:.3g} TFLOP/s"
                                          "<extra></extra>",
                         "marker": {"color": colours[impl], "size": 7,
                                    "symbol": "circle" if kind == "float32" else "diamond"},
                         **_axes(n)})
        roofs: dict[str, tuple[list[float], str]] = {}  # label: (heights, dash)
        xs = list(np.geomspace(lo, hi, 40))
        for kind in sorted(set(block_dir["precision"])):
            if not bandwidth_gbps:
                continue
            peak = peak_tflops(gpu, kind)
            label = f"roof: {bandwidth_gbps:.0f} GB/s" + (f", {peak:g} TFLOP/s {kind}"
                                                          if peak else "")
            roofs[label] = ([min(x * bandwidth_gbps / 1e3, peak or math.inf) for x in xs],
                            "solid" if kind == "float32" else "dash")
        for label, (ys, dash) in roofs.items():
            data.append({"type": "scatter", "mode": "lines", "name": label,
                         "legendgroup": label, "showlegend": n == 0, "x": xs, "y": ys,
                         "hovertemplate": f"{label}<extra></extra>",
                         "line": {"color": "#444", "width": 1, "dash": dash}, **_axes(n)})
    layout = _side_by_side("roofline: achieved TFLOP/s against arithmetic intensity",
                           "FLOP per byte (fewest bytes)", "TFLOP/s", log_x=True, log_y=True,
                           directions=directions)
    return {"data": data, "layout": layout}


ZERO_ERROR = 1e-18  # where an exact result goes on a log scale


def error_vs_tolerance(rows: pd.DataFrame, colours: dict[str, str]) -> dict[str, Any]:
    """rel_l2 against its tolerance, log-log, forward | backward; the diagonal is the
    bound (below it: within tolerance)."""
    checked = rows.dropna(subset=["rel_l2", "tol_rel_l2"])
    directions = [d for d in DIRECTIONS if d in set(checked["direction"])]
    data = []
    tolerances = checked["tol_rel_l2"][checked["tol_rel_l2"] > 0]
    lo = tolerances.min() / 3 if len(tolerances) else 1e-8
    hi = tolerances.max() * 3 if len(tolerances) else 1
    for n, direction in enumerate(directions):
        for impl, block in checked[checked["direction"] == direction].groupby("impl"):
            # Many rows share a tolerance: spread the implementations apart a little.
            jitter = 1.15 ** (sorted(colours).index(impl) - (len(colours) - 1) / 2)
            data.append({"type": "scatter", "mode": "markers", "name": impl,
                         "legendgroup": impl, "showlegend": n == 0,
                         "x": values(block["tol_rel_l2"] * jitter),
                         "y": values(block["rel_l2"].clip(lower=ZERO_ERROR)),
                         "text": block["hover"].tolist(),
                         "hovertemplate": "%{text}<br>rel_l2 %{y:.3g}<extra></extra>",
                         "marker": {"color": [STATUS_COLOURS[s] for s in block["status"]],
                                    "line": {"color": colours[impl], "width": 2}, "size": 8},
                         **_axes(n)})
        data.append({"type": "scatter", "mode": "lines", "name": "tolerance",
                     "showlegend": n == 0, "x": [lo, hi], "y": [lo, hi],
                     "line": {"color": "#c62828", "dash": "dash"}, "hoverinfo": "skip",
                     **_axes(n)})
    layout = _side_by_side("error against tolerance (marker: status, ring: implementation)",
                           "tolerance (rel_l2)", "rel_l2", log_x=True, log_y=True,
                           directions=directions)
    return {"data": data, "layout": layout}


def geomean_bars(geomeans: pd.DataFrame) -> dict[str, Any]:
    """Geometric-mean speedup (base time / new time) per operator × implementation."""
    data = []
    for n, direction in enumerate(DIRECTIONS):
        block = geomeans[geomeans["direction"] == direction]
        if block.empty:
            continue
        labels = (block["op"] + " · " + block["impl"]).tolist()
        data.append({"type": "bar", "orientation": "h", "name": direction, "y": labels,
                     "x": values(block["speedup"] - 1), "base": 1,
                     "text": [f"{v:.3f}×" for v in block["speedup"]], "textposition": "auto",
                     "hovertemplate": "%{y}: %{text}<extra>" + direction + "</extra>",
                     "marker": {"color": PALETTE[n]}})
    height = 120 + 24 * max(1, len(geomeans))
    layout = {"title": {"text": "geometric-mean speedup, base time / new time"},
              "barmode": "group", "height": height, "margin": {"l": 260, "t": 50},
              "xaxis": {"title": {"text": "speedup (1 = unchanged)"}},
              "yaxis": {"automargin": True}}
    return {"data": data, "layout": layout}


def history_lines(points: pd.DataFrame, run_times: dict[str, str], op: str,
                  colours: dict[str, str]) -> dict[str, Any]:
    """Time index per run for each implementation × direction of ``op``; regressions
    marked with a red cross."""
    data = []
    mine = points[points["op"] == op]
    for (impl, direction), block in mine.groupby(["impl", "direction"]):
        name = f"{impl} · {direction}"
        x = [run_times[r] for r in block["run_id"]]
        text = [f"{name}<br>run {r}<br>time index {t:.3f} over {c} cases"
                + (f"<br>sign test p = {p:.2g}, ratio {q:.3f}" if p is not None
                   and not math.isnan(p) else "")
                for r, t, c, p, q in zip(block["run_id"], block["time_index"], block["cases"],
                                         block["p_value"], block["ratio"], strict=True)]
        data.append({"type": "scatter", "mode": "lines+markers", "name": name, "x": x,
                     "y": values(block["time_index"]), "text": text,
                     "hovertemplate": "%{text}<extra></extra>",
                     "line": {"color": colours[impl],
                              "dash": "solid" if direction == "forward" else "dot"}})
        bad = block[block["regression"]]
        if len(bad):
            data.append({"type": "scatter", "mode": "markers", "name": f"regression: {name}",
                         "x": [run_times[r] for r in bad["run_id"]],
                         "y": values(bad["time_index"]),
                         "hovertemplate": "regression<extra></extra>",
                         "marker": {"symbol": "x", "size": 14, "color": "#c62828"}})
    layout = {"title": {"text": f"{op}: time index per run (1 = the case's usual time)"},
              "height": 360, "margin": {"t": 50}, "hovermode": "closest",
              "yaxis": {"title": {"text": "geometric mean of time / usual time"}},
              "xaxis": {"title": {"text": "run start (UTC)"}}}
    return {"data": data, "layout": layout}


def sampling(picture) -> dict[str, Any]:
    """The input heat map, the regular grid and the deformed sample points of one output
    location, with arrows from each tap's regular position to where it samples."""
    heat = picture.heat
    data = [{"type": "heatmap", "z": heat.tolist(), "colorscale": "Greys", "showscale": True,
             "colorbar": {"title": {"text": "input"}}, "name": "input",
             "hovertemplate": "input[y=%{y}, x=%{x}] = %{z:.3g}<extra></extra>"}]
    regular, deformed = picture.regular, picture.deformed
    data.append({"type": "scatter", "mode": "markers", "name": "regular grid",
                 "x": regular[:, 1].tolist(), "y": regular[:, 0].tolist(),
                 "text": picture.labels, "hovertemplate": "%{text}<br>y=%{y}, x=%{x}"
                                                          "<extra>regular</extra>",
                 "marker": {"symbol": "square-open", "size": 12, "color": "#1565c0",
                            "line": {"width": 2}}})
    weight = picture.weight
    size = (6 + 14 * np.clip(weight, 0, 1)).tolist() if weight is not None else 11
    weight_text = ([f"{t}<br>mask {w:.3f}" for t, w in zip(picture.labels, weight, strict=True)]
                   if weight is not None else picture.labels)
    data.append({"type": "scatter", "mode": "markers", "name": "deformed samples",
                 "x": deformed[:, 1].tolist(), "y": deformed[:, 0].tolist(),
                 "text": weight_text, "hovertemplate": "%{text}<br>y=%{y:.3f}, x=%{x:.3f}"
                                                       "<extra>deformed</extra>",
                 "marker": {"symbol": "circle", "size": size, "color": "#e65100",
                            "line": {"color": "white", "width": 1}}})
    xs, ys = [], []
    for (y0, x0), (y1, x1) in zip(regular.tolist(), deformed.tolist(), strict=True):
        xs += [x0, x1, None]
        ys += [y0, y1, None]
    data.append({"type": "scatter", "mode": "lines", "name": "offset", "x": xs, "y": ys,
                 "hoverinfo": "skip", "line": {"color": "#e65100", "width": 1}})
    height, width = heat.shape
    layout = {"title": {"text": f"{picture.op}: {picture.title}"}, "height": 560,
              "xaxis": {"title": {"text": "x"}, "range": [-1.5, width + 0.5],
                        "constrain": "domain"},
              "yaxis": {"title": {"text": "y"}, "range": [height + 0.5, -1.5],
                        "scaleanchor": "x"},
              "legend": {"orientation": "h", "y": -0.15}, "margin": {"t": 60}}
    return {"data": data, "layout": layout}
