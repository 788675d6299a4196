"""The site's pages and what they say (the browser tests check that they render)."""

import datetime as dt
import html
import re
from pathlib import Path

from conftest import SLOW_IMPL

from harness import cli


def _page(site, pattern: str) -> Path:
    matches = [p for p in site.pages if re.search(pattern, p.as_posix())]
    assert matches, f"no page matching {pattern}"
    return matches[0]


def test_every_page_type_is_built(site, smoke_run, slow_history):
    out = site.index.parent
    names = {p.relative_to(out).as_posix() for p in site.pages}
    assert "index.html" in names
    for run in [smoke_run, *slow_history]:
        assert f"runs/{run.name}.html" in names
        for op in ("conv2d", "deform_conv2d", "modulated_deform_conv2d"):
            assert f"runs/{run.name}/{op}.html" in names
    assert sum(n.startswith("compare/") for n in names) == len(slow_history)  # each vs previous
    assert sum(n.startswith("history/") for n in names) == 1
    assert {"sampling/deform_conv2d.html", "sampling/modulated_deform_conv2d.html"} <= names
    assert site.runs == 1 + len(slow_history)


def test_pages_show_every_registered_metric_the_rows_have(site, smoke_run):
    from harness import metrics, results

    frame = results.load(smoke_run)
    had = {m for m in metrics.METRICS if m != "time_ms" and frame[m].notna().any()}
    assert {"speedup", "tflops", "gbps", "roofline_fraction"} <= had  # a CPU run's metrics
    page = (site.index.parent / f"runs/{smoke_run.name}/deform_conv2d.html").read_text()
    header = page.split("<thead>")[-1].split("</thead>")[0]
    for name in had:
        unit = metrics.METRICS[name].unit
        assert f">{name} ({unit})<" in header if unit else f">{name}<" in header, name
    compare = _page(site, "compare/").read_text()
    assert "<h2>Metrics</h2>" in compare and ">tflops (TFLOP/s)<" in compare


def test_offline_plotly_written_once(site):
    out = site.index.parent
    assert [p.name for p in out.rglob("plotly*.js")] == ["plotly.min.js"]
    for page in site.pages:
        html = page.read_text()
        assert not re.search(r"""(src|href)=["']https?:""", html), page


def test_index_lists_every_run(site, smoke_run, slow_history):
    index = site.index.read_text()
    for run in [smoke_run, *slow_history]:
        assert f'href="runs/{run.name}.html"' in index


def test_compare_page_shows_the_planted_slowdown(site, slow_history):
    page = _page(site, f"compare/.*--{slow_history[-1].name}").read_text()
    table = page.split("<h2>Case by case</h2>")[1]
    rows = [re.search(r'^<td><code>[^<]*</code></td><td>(\w+)</td>.*?data-sort="([^"]+)">.*'
                      r'<td class="v-(\w+)">', row).groups() for row in table.split("<tr>")[2:]]
    assert rows
    # Beyond the synthetic runs' ±3 % noise, only the planted slowdown reads slower.
    slow = {impl for impl, change, verdict in rows if verdict == "slower" and float(change) > 10}
    assert slow == {SLOW_IMPL}


def test_history_page_marks_the_regression(site, slow_history):
    page = _page(site, "history/").read_text()
    regressions = page.split("<h2>Regressions</h2>")[1].split("<h2>")[0]
    assert slow_history[-1].name in regressions
    assert SLOW_IMPL in regressions
    assert slow_history[-2].name not in regressions


def test_run_page_shows_failures_with_their_command(smoke_run, tmp_path):
    from reports_synthetic import write_run

    error = "RuntimeError: CUDA error: an illegal memory access was encountered"

    def break_one(row):
        if row["impl"] == "torchvision" and row["direction"] == "forward" and not broken:
            broken.append(row)
            return {**row, "status": "error", "reason": error, "traceback": "Traceback ...",
                    "metrics": {}, "samples": None,
                    **dict.fromkeys(("rel_l2", "max_abs", "time_median_ms", "time_iqr_ms",
                                     "time_min_ms"))}
        return row

    broken: list[dict] = []
    run = write_run(smoke_run, tmp_path / "runs", "broken", dt.datetime(2026, 11, 2, tzinfo=dt.UTC),
                    "f" * 40, lambda row: 1.0, edit=break_one)
    assert cli.main(["report", str(run), "-o", str(tmp_path / "site")]) == 0
    page = (tmp_path / "site" / "runs" / "broken.html").read_text()
    failures = page.split("<h2>Failures</h2>")[1].split("<h2>")[0]
    assert broken[0]["case_id"] in failures and "illegal memory access" in failures
    assert html.escape(broken[0]["reproduce"]) in failures
    assert broken[0]["reproduce"].startswith("dcnbench case ")
    assert 'class="cell bg-error"' in page
