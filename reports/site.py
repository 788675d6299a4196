"""``dcnbench report``: a static site of result runs that works offline from the file system.

Pages (docs/reports.md): the index of runs, one page per run (status ×
speedup matrix, environment, failures with their reproducing command), one
page per operator of each run (metrics against every swept parameter,
roofline, error against tolerance), a compare page for each run and the
previous run of the same device and suite, a history page per device and
suite, the sampling view of saved cases, and the peers page (``reports.peers``). plotly.js is written once into
``assets/``; figures are embedded as JSON and drawn when they scroll into view.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from harness import compare, metrics, results
from harness.results import DIRECTIONS, STATUSES
from reports import counters, figures, history, peers, sampling

HERE = Path(__file__).parent
STATUS_ORDER = ["error", "fail", "xfail", "ok", "skipped"]  # worst first


@dataclasses.dataclass
class Built:
    index: Path
    pages: list[Path]
    rows: int
    runs: int
    seconds: float


def slug(text: str) -> str:
    """A file name for ``text``, distinct for distinct texts: a text that is not
    already a safe name (``local/X``, ``a b``, ``..``) gets a hash of itself
    appended, so ``local/X`` and ``cpu/X`` (or ``a/b`` and ``a-b``) never share a page."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:80]
    if safe == text and text:
        return text
    return f"{safe or 'x'}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


# Inside <script type="application/json"> the HTML parser looks for "</script" and
# also for "<!--" (after which a "<script" keeps the element open past its end tag):
# JSON strings may spell every character as \uXXXX, so these never appear as such.
_SCRIPT_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                                 "\u2028": "\\u2028", "\u2029": "\\u2029"})


def script_json(value: Any) -> str:
    """``value`` as compact JSON that is safe as a script element's text: no
    ``<``, ``>``, ``&`` or U+2028/2029 in it (each as its \\u escape)."""
    return json.dumps(value, separators=(",", ":")).translate(_SCRIPT_ESCAPES)


class Site:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                                      autoescape=True, trim_blocks=True, lstrip_blocks=True)
        self.env.filters["num"] = _num
        self.pages: list[Path] = []

    def write_assets(self) -> None:
        import plotly.offline

        assets = self.out / "assets"
        assets.mkdir(parents=True, exist_ok=True)
        plotly_js = assets / "plotly.min.js"
        source = plotly.offline.get_plotlyjs()
        if not plotly_js.is_file() or plotly_js.stat().st_size != len(source.encode()):
            plotly_js.write_text(source)
        for name in ("site.js", "site.css"):
            shutil.copyfile(HERE / "static" / name, assets / name)

    def render(self, path: str, template: str, **context: Any) -> None:
        target = self.out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        root = "../" * path.count("/")
        figs = context.pop("figures", {})
        html = self.env.get_template(template).render(
            root=root, figures=figs,
            figure_json={k: script_json(v) for k, v in figs.items()},
            **context)
        target.write_text(html)
        self.pages.append(target)


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


# ---------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
    run_id: str
    metadata: dict[str, Any]
    rows: pd.DataFrame

    @property
    def time(self) -> str:
        return self.metadata.get("time", "")

    @property
    def device_name(self) -> str:
        return history.group_key(self.metadata)[0]

    @property
    def group(self) -> tuple[str, str]:
        return history.group_key(self.metadata)

    @property
    def commit(self) -> str:
        git = self.metadata.get("git") or {}
        commit = (git.get("commit") or "")[:10]
        return commit + (" (dirty)" if git.get("dirty") else "") if commit else "–"

    def counts(self) -> dict[str, int]:
        counted = Counter(self.rows["status"])
        return {s: counted.get(s, 0) for s in STATUSES}


def _runs(frame: pd.DataFrame, metadata: dict[str, dict]) -> list[Run]:
    by_run = dict(tuple(frame.groupby("run_id", sort=False))) if len(frame) else {}
    runs = [Run(run_id, meta, by_run.get(run_id, frame.iloc[0:0]))
            for run_id, meta in metadata.items()]
    return sorted(runs, key=lambda r: (r.time, r.run_id))


def _worst(statuses: Iterable[str]) -> str:
    present = set(statuses)
    return next((s for s in STATUS_ORDER if s in present), "skipped")


def _matrix(rows: pd.DataFrame) -> dict[str, Any]:
    """operator × implementation down, dtype × direction across: worst status, counts and
    the geometric-mean speedup over the baseline."""
    keys = ["op", "impl", "dtype", "direction"]
    counts = rows.groupby(keys)["status"].value_counts().unstack(fill_value=0)
    speedups = rows[rows["speedup"] > 0].assign(log=lambda f: np.log(f["speedup"]))
    geomeans = np.exp(speedups.groupby(keys)["log"].mean())
    kinds = rows.groupby(["op", "impl"])["impl_kind"].first()
    columns = sorted({key[2:] for key in counts.index},
                     key=lambda c: (c[0], DIRECTIONS.index(c[1])))
    cells: dict[tuple, dict[str, Any]] = {}
    for key, line in counts.iterrows():
        present = {s: int(line.get(s, 0)) for s in STATUSES if line.get(s, 0)}
        cells[key] = {"status": _worst(present),
                      "counts": ", ".join(f"{n} {s}" for s, n in present.items()),
                      "speedup": float(geomeans[key]) if key in geomeans.index else None}
    lines = [{"op": op, "impl": impl, "kind": kinds[(op, impl)],
              "cells": [cells.get((op, impl, *column)) for column in columns]}
             for op, impl in kinds.index]
    return {"columns": columns, "lines": lines}


def _execution(meta: dict) -> str:
    """Where the cases ran: in the run's process, in workers, on Ray; shard, merge."""
    execution = meta.get("execution") or {"executor": "in-process"}
    words = [execution["executor"]]
    if execution.get("workers"):
        words.append(f"{execution['workers']} workers")
    if execution.get("devices"):
        words.append("GPUs " + ", ".join(map(str, execution["devices"])))
    if execution.get("case_timeout_s"):
        words.append(f"case timeout {execution['case_timeout_s']:g} s")
    if execution.get("memory_limit_gb"):
        words.append(f"memory limit {execution['memory_limit_gb']:g} GB")
    if meta.get("shard"):
        words.append(f"shard {meta['shard']['index']}/{meta['shard']['count']}")
    if meta.get("merged_from"):
        words.append(f"merged from {len(meta['merged_from'])} runs")
    return ", ".join(words)


def _environment(run: Run) -> list[tuple[str, str]]:
    meta = run.metadata
    rows = run.rows
    versions = meta.get("versions") or {}
    clocks = rows["sm_clock_mhz"].dropna() if "sm_clock_mhz" in rows else pd.Series([])
    temps = rows["gpu_temp_c"].dropna() if "gpu_temp_c" in rows else pd.Series([])
    timers = sorted(set(rows["timer"].dropna())) if "timer" in rows else []
    timing = meta.get("timing")
    bandwidth = meta.get("copy_bandwidth_gbps")
    items = [
        ("GPU", meta.get("gpu") or "none (CPU run)"),
        ("CPU", meta.get("cpu") or "–"),
        ("device asked for", meta.get("device", "–")),
        ("SM clock (MHz, min–max over rows)",
         f"{clocks.min():.0f}–{clocks.max():.0f}" if len(clocks) else "–"),
        ("GPU temperature (°C, min–max)",
         f"{temps.min():.0f}–{temps.max():.0f}" if len(temps) else "–"),
        ("measured copy bandwidth", f"{bandwidth:.1f} GB/s" if bandwidth else "not measured"),
        ("driver", meta.get("driver") or "–"),
        ("CUDA (torch built with)", meta.get("cuda") or "–"),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v)),
        ("timers", ", ".join(timers) or "not timed"),
        ("timing", ", ".join(f"{k}={v}" for k, v in timing.items()) if timing else "off"),
        ("TF32", json.dumps(meta.get("tf32"))),
        ("torch threads", str(meta.get("torch_threads", "–"))),
        ("execution", _execution(meta)),
        ("suite", f"{meta['suite']['name']}: {meta['suite'].get('description', '')}"),
        ("seed", str(meta.get("seed"))),
        ("commit", run.commit),
        ("host", meta.get("host") or "–"),
        ("started", run.time),
        ("command", " ".join(meta.get("argv") or [])),
    ]
    return items


# What the operator pages' figures read.
DRAWN = ["case_id", "impl", "dtype", "direction", "status", "hover", "time_median_ms",
         "time_iqr_ms", "flops", "bytes", "tflops", "gbps", "rel_l2", "tol_rel_l2"]


def _params(rows: pd.DataFrame) -> list[str]:
    return [c for c in rows.columns if c.startswith("params.")]


def _swept_axes(rows: pd.DataFrame) -> list[str]:
    """The parameters that take more than one value among ``rows``."""
    axes = []
    for column in rows.columns:
        if column.startswith("params.") and rows[column].dropna().astype(str).nunique() > 1:
            axes.append(column.removeprefix("params."))
    return axes


def _metric_columns(rows: pd.DataFrame) -> list[metrics.Metric]:
    """The registered metrics some of ``rows`` have, beyond the median time itself: the
    case table shows one column each."""
    return [m for m in metrics.METRICS.values()
            if m.name != "time_ms" and m.name in rows and rows[m.name].notna().any()]


def _case_table(rows: pd.DataFrame) -> list[dict[str, Any]]:
    keep = ["case_id", "impl", "dtype", "direction", "mode", "status", "time_median_ms",
            "time_iqr_ms", *(m.name for m in _metric_columns(rows)), "rel_l2", "tol_rel_l2"]
    table = rows[keep].sort_values(["case_id", "impl", "direction"])
    return table.replace({np.nan: None}).to_dict("records")


# ---------------------------------------------------------------------------- pages


def _determinism(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Per operator and implementation: of the backward rows checked, how many
    gave the same bits twice (``deterministic``; harness/determinism.py)."""
    if "deterministic" not in rows:
        return []
    checked = rows[rows["deterministic"].notna()]
    return [
        {"op": op, "impl": impl, "reproducible": int(group["deterministic"].astype(bool).sum()),
         "checked": len(group)}
        for (op, impl), group in checked.groupby(["op", "impl"], sort=True)
    ]


def _run_page(site: Site, run: Run, previous: Run | None, compare_path: str | None,
              history_path: str | None) -> None:
    rows = run.rows
    failures = rows[rows["status"].isin(["fail", "error"])].sort_values(["op", "case_id"])
    xfails = rows[rows["status"] == "xfail"].sort_values(["op", "case_id"])
    ops = sorted(set(rows["op"]))
    site.render(f"runs/{slug(run.run_id)}.html", "run.html", title=f"run {run.run_id}",
                run=run, counts=run.counts(), matrix=_matrix(rows) if len(rows) else None,
                environment=_environment(run), failures=failures.to_dict("records"),
                xfails=xfails.to_dict("records"), ops=ops, slug=slug, previous=previous,
                determinism=_determinism(rows),
                compare_path=compare_path, history_path=history_path)
    bandwidth = run.metadata.get("copy_bandwidth_gbps")
    for op in ops:
        op_rows = rows[rows["op"] == op]
        op_rows = op_rows.assign(hover=figures.hover(op_rows))[DRAWN + _params(op_rows)]
        op_rows = op_rows.dropna(axis=1, how="all")
        colours = figures.colour_of(sorted(set(op_rows["impl"])))
        figs: dict[str, Any] = {}
        timed = "time_median_ms" in op_rows and op_rows["time_median_ms"].notna().any()
        axes = _swept_axes(op_rows)
        if timed:
            throughput = ("tflops", "TFLOP/s") if "tflops" in op_rows else ("gbps", "GB/s")
            groups = figures.series_groups(op_rows)
            for axis in axes:
                figs[f"latency-{axis}"] = figures.against_axis(
                    op_rows, groups, axis, "time_median_ms", "median time (ms)", colours)
                figs[f"throughput-{axis}"] = figures.against_axis(
                    op_rows, groups, axis, throughput[0], throughput[1], colours)
            if {"tflops", "flops", "bytes"} <= set(op_rows.columns):
                figs["roofline"] = figures.roofline(op_rows, bandwidth, run.metadata.get("gpu"),
                                                    colours)
        if "rel_l2" in op_rows and op_rows["rel_l2"].notna().any():
            figs["errors"] = figures.error_vs_tolerance(op_rows, colours)
        site.render(f"runs/{slug(run.run_id)}/{slug(op)}.html", "operator.html",
                    title=f"{op} · {run.run_id}", run=run, op=op, axes=axes, timed=timed,
                    figures=figs, cases=_case_table(rows[rows["op"] == op]),
                    metric_columns=_metric_columns(rows[rows["op"] == op]),
                    run_path=f"../{slug(run.run_id)}.html")


def _compare_page(site: Site, base: Run, new: Run, path: str) -> None:
    comparison = compare.compare_frames(base.rows, new.rows)
    shown = comparison.cases.drop(columns=["time_samples_ms_base", "time_samples_ms_new",
                                           "metrics_base", "metrics_new"])
    cases = shown.replace({np.nan: None}).to_dict("records")
    counts = Counter(comparison.cases["verdict"])
    figs = {}
    if len(comparison.geomeans):
        figs["geomeans"] = figures.geomean_bars(comparison.geomeans)
    site.render(path, "compare.html", title=f"{new.run_id} against {base.run_id}", base=base,
                new=new, cases=cases, counts={v: counts.get(v, 0) for v in compare.VERDICTS},
                geomeans=comparison.geomeans.to_dict("records"),
                status_changes=comparison.status_changes.to_dict("records"), figures=figs,
                metric_changes=comparison.metric_changes.to_dict("records"),
                slug=slug, min_effect=compare.MIN_EFFECT, alpha=compare.ALPHA)


def _history_page(site: Site, group: tuple[str, str], runs: list[Run], path: str) -> Counter:
    """The history page; returns the number of regressions marked in each run."""
    rows = pd.concat([r.rows for r in runs], ignore_index=True)
    points = history.series(rows, [r.run_id for r in runs])
    run_times = {r.run_id: r.time for r in runs}
    figs = {}
    for op in sorted(set(points["op"])):
        colours = figures.colour_of(sorted(set(points.loc[points["op"] == op, "impl"])))
        figs[f"history-{op}"] = figures.history_lines(points, run_times, op, colours)
    flagged = points[points["regression"]].replace({np.nan: None}).to_dict("records")
    site.render(path, "history.html", title=f"history · {group[0]} · {group[1]}", group=group,
                runs=runs, figures=figs, regressions=flagged, slug=slug, history=history)
    return Counter(r["run_id"] for r in flagged)


def _default_cases(runs: list[Run], folder: Path) -> list[Path]:
    """One saved case per operator with a sampling view: its smallest random-input case
    of the newest run, run by the reference on the CPU with that run's seed."""
    saved = []
    for op in sampling.viewable_operators():
        newest = next((r for r in reversed(runs) if op in set(r.rows["op"])), None)
        if newest is None:
            continue
        rows = newest.rows[(newest.rows["op"] == op) & (newest.rows["dtype"] == "float32")]
        rows = rows[rows["mode"] == "random"] if (rows["mode"] == "random").any() else rows
        if rows.empty:
            continue
        params = rows.drop_duplicates("case_id").dropna(axis=1, how="all")
        # The most taps (a picture of 3×3 samples tells more than one of 3×1), then the
        # smallest tensors.
        numeric = params.filter(like="params.").select_dtypes("number")
        taps = numeric.filter(like="params.kernel_").prod(axis=1)
        order = pd.DataFrame({"taps": -taps, "size": numeric.prod(axis=1)})
        smallest = params.loc[order.sort_values(["taps", "size"]).index[0]]
        values = {c.removeprefix("params."): _python(smallest[c])
                  for c in params.columns if c.startswith("params.")}
        path = folder / f"{slug(op)}.npz"
        try:
            saved.append(sampling.save_case(op, values, smallest["dtype"], smallest["mode"],
                                            int(smallest["seed"]), path))
        except ValueError as exc:  # rows too large (or not a case): the other views still draw
            warnings.warn(f"sampling view of {op} left out: {exc}", stacklevel=2)
    return saved


def _python(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _sampling_pages(site: Site, cases: Sequence[Path]) -> list[dict[str, str]]:
    entries = []
    for path in cases:
        picture = sampling.picture(path)
        page = f"sampling/{slug(Path(path).stem)}.html"
        download = site.out / "sampling" / Path(path).name
        if Path(path).resolve() != download.resolve():
            download.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, download)
        site.render(page, "sampling.html", title=f"sampling · {picture.op}", picture=picture,
                    figures={"sampling": figures.sampling(picture)}, download=download.name)
        entries.append({"op": picture.op, "case_id": picture.case_id, "path": page})
    return entries


# ---------------------------------------------------------------------------- build


def build(run_dirs: Sequence[Path], out: Path, cases: Sequence[Path] = ()) -> Built:
    """Build the site of every run under ``run_dirs`` into ``out``; returns what was built."""
    start = time.perf_counter()
    frame = results.load(list(run_dirs))
    # pandas deep-copies attrs into every slice of a frame: keep the metadata apart. The
    # per-tensor errors (dicts, slow to copy) are not drawn.
    metadata = frame.attrs.pop("metadata")
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("tensors")])
    runs = _runs(frame, metadata)
    site = Site(out)
    site.write_assets()
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    history_paths = {g: f"history/{slug(g[0] + '-' + g[1])}.html"
                     for g, members in groups.items() if len(members) > 1}
    previous_of: dict[str, Run] = {}
    for members in groups.values():
        for before, after in zip(members, members[1:], strict=False):
            previous_of[after.run_id] = before
    compare_paths = {}
    for run in runs:
        before = previous_of.get(run.run_id)
        if before is not None:
            compare_paths[run.run_id] = f"compare/{slug(before.run_id)}--{slug(run.run_id)}.html"
            _compare_page(site, before, run, compare_paths[run.run_id])
    regressions = {g: _history_page(site, g, groups[g], p) for g, p in history_paths.items()}
    for run in runs:
        _run_page(site, run, previous_of.get(run.run_id), compare_paths.get(run.run_id),
                  history_paths.get(run.group))
    case_files = list(cases) or _default_cases(runs, site.out / "sampling")
    sampled = _sampling_pages(site, case_files)
    counted = counters.render(site, run_dirs)
    peers_path = peers.render(site, frame, metadata)
    site.render("index.html", "index.html", title="dcnbench report",
                runs=list(reversed(runs)), slug=slug, compare_paths=compare_paths,
                history_paths=history_paths, regressions=regressions, sampled=sampled,
                statuses=STATUSES, counted=counted, peers_path=peers_path)
    return Built(index=site.out / "index.html", pages=site.pages, rows=len(frame),
                 runs=len(runs), seconds=time.perf_counter() - start)
