"""Every page of a built site in headless Chromium: no console errors, every chart drawn
with data, every link resolving. A screenshot of each page type goes to
test-artifacts/screenshots/.

The ``browser`` fixture (tests/conftest.py) needs Debian's chromium (/usr/bin/chromium;
.ci/run installs it) and the playwright package (never its browser download). Without
them the tests skip, except under CI (CI=true), where they fail.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"


def _page_type(path: str) -> str:
    if path == "index.html":
        return "index"
    if path.startswith("runs/"):
        return "operator" if path.count("/") == 2 else "run"
    return path.split("/")[0].removesuffix(".html")  # compare, history, sampling, peers


def test_every_page_renders(site, browser):
    out = site.index.parent
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
    SCREENSHOTS.mkdir(parents=True)
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    shot: set[str] = set()
    for html in sorted(site.pages):
        name = html.relative_to(out).as_posix()
        page.goto(html.as_uri())
        page.evaluate("window.dcnRenderAll()")
        page.wait_for_function(
            "Array.from(document.querySelectorAll('.chart'))"
            ".every(d => d.dataset.rendered === 'done')", timeout=30_000)
        charts = page.evaluate(
            "Array.from(document.querySelectorAll('.chart')).map(d => ({id: d.id, "
            "points: (d.data || []).reduce((n, t) => n + ((t.x || t.z || []).length), 0), "
            "svg: d.querySelectorAll('.main-svg').length}))")
        for chart in charts:
            assert chart["points"] > 0 and chart["svg"] > 0, f"{name}: {chart['id']} is empty"
        links = page.evaluate("Array.from(document.querySelectorAll('a[href]'))"
                              ".map(a => a.href)")
        for link in links:
            url = urlparse(link)
            assert url.scheme == "file", f"{name}: link leaves the site: {link}"
            assert Path(unquote(url.path)).is_file(), f"{name}: broken link {link}"
            if url.fragment:
                target = page if Path(unquote(url.path)) == html else None
                if target is not None:
                    assert page.locator(f"#{url.fragment}").count() == 1, link
        assert not problems, f"{name}: {problems}"
        kind = _page_type(name)
        if kind not in shot:
            shot.add(kind)
            page.screenshot(path=str(SCREENSHOTS / f"{kind}.png"), full_page=kind != "operator")
    assert shot == {"index", "run", "operator", "compare", "history", "sampling", "peers"}


def test_tables_sort_on_click(site, browser):
    compare_page = next(p for p in site.pages if "compare/" in p.as_posix())
    page = browser.new_page()
    page.goto(compare_page.as_uri())
    header = page.locator("table.sortable").last.locator("th", has_text="change %")
    header.click()
    header.click()  # descending
    changes = page.evaluate(
        "Array.from(document.querySelectorAll('table.sortable:last-of-type tbody tr'))"
        ".map(r => parseFloat(r.cells[5].dataset.sort))")
    assert changes == sorted(changes, reverse=True)
    assert len(changes) > 1
