"""Injected strings through the report: figure JSON is safe as a script
element's text, an injected case id or implementation name neither runs nor
stops the charts drawing (headless Chromium), and the sampling view refuses a
case too large to re-run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness import results
from reports import sampling
from reports import site as site_builder

COMMITTED_RUN = Path(__file__).resolve().parents[2] / "results/cpu/20261128T174700Z-smoke"
INJECTED = [
    "<!--<script>window.__pwned = 1</script>",
    "</script><script>window.__pwned = 2</script>",
    "<img src=x onerror='window.__pwned = 3'>",
    "&lt;&amp;\u2028\u2029",
]


def test_figure_json_has_no_character_the_html_parser_acts_on():
    figure = {"data": [{"text": INJECTED, "name": "a\u2028b"}], "layout": {"title": "<&>"}}
    text = site_builder.script_json(figure)
    assert not set(text) & set("<>&\u2028\u2029")
    assert json.loads(text) == figure


@pytest.fixture
def injected_site(tmp_path):
    run = tmp_path / "runs" / "injected"
    run.mkdir(parents=True)
    shutil.copy(COMMITTED_RUN / results.METADATA, run / results.METADATA)
    rows = [json.loads(line) for line in
            (COMMITTED_RUN / results.RESULTS).read_text().splitlines()[8:20]]  # deform_conv2d
    for n, row in enumerate(rows):
        if row["impl"] == "torchvision":
            row["impl"] = INJECTED[n % len(INJECTED)]
        row["case_id"] += INJECTED[n % len(INJECTED)]
    (run / results.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return site_builder.build([run], tmp_path / "site")


def test_injected_names_neither_run_nor_stop_the_charts(injected_site, browser):
    operator_page = next(p for p in injected_site.pages if p.name == "deform_conv2d.html")
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: problems.append(f"dialog: {d.message}"))
    page.goto(operator_page.as_uri())
    page.evaluate("window.dcnRenderAll()")
    page.wait_for_function("Array.from(document.querySelectorAll('.chart'))"
                           ".every(d => d.dataset.rendered === 'done')", timeout=30_000)
    charts = page.evaluate("Array.from(document.querySelectorAll('.chart')).map(d => "
                           "(d.data || []).reduce((n, t) => n + (t.x || []).length, 0))")
    assert charts and all(points > 0 for points in charts)
    names = page.evaluate("Array.from(document.querySelectorAll('.chart'))"
                          ".flatMap(d => (d.data || []).map(t => t.name))")
    assert INJECTED[0] in names  # the name arrives as it was, as text
    assert page.evaluate("window.__pwned") is None
    assert INJECTED[1] in page.inner_text("body")
    assert not problems


def test_the_sampling_view_refuses_a_case_too_large_to_re_run(tmp_path):
    huge = {"N": 4096, "C_in": 4096, "C_out": 4096, "H": 4096, "W": 4096}
    with pytest.raises(ValueError, match=r"moves .* bytes; the sampling view takes cases up to"):
        sampling.save_case("deform_conv2d", huge, "float32", "random", 0, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_a_report_whose_rows_are_too_large_to_re_run_leaves_out_that_view(tmp_path):
    run = tmp_path / "runs" / "huge"
    run.mkdir(parents=True)
    shutil.copy(COMMITTED_RUN / results.METADATA, run / results.METADATA)
    rows = [json.loads(line) for line in
            (COMMITTED_RUN / results.RESULTS).read_text().splitlines()[8:20]]  # deform_conv2d
    for row in rows:  # a hostile row: 5.5·10^16 bytes, were it re-run
        row["params"].update(N=4096, C_in=4096, H=4096, W=4096)
    (run / results.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="sampling view of deform_conv2d left out: case "
                                         "deform_conv2d/.* moves .* bytes"):
        built = site_builder.build([run], tmp_path / "site")
    assert not any("sampling/" in p.as_posix() for p in built.pages)
    assert any(p.name == "deform_conv2d.html" for p in built.pages)
