"""The report's counters page, from a counters document of a small suite."""

from __future__ import annotations

import html
import json

from harness import counters, registry
from harness.cases import make_case
from reports import counters as counters_page
from reports.site import Site


def test_the_page_sets_each_design_and_direction_side_by_side(tmp_path):
    registry.load_all()
    op = registry.get_operator("dcnv3")
    case = make_case(op, {"N": 1, "H": 6, "W": 6}, "float32", "random")
    results = [counters.summarize(case, impl.name, direction,
                                  counters.measure(case, impl, direction, 0), "h200")
               for impl in counters.kernel_implementations("dcnv3")
               for direction in ("forward", "backward")]
    suite = type("Suite", (), {"name": "tiny", "sha256": "0", "seed": 0})
    document = counters.baseline_document(suite, "h200", results)
    (tmp_path / "results" / "counters").mkdir(parents=True)
    (tmp_path / "results" / "counters" / "tiny.json").write_text(json.dumps(document))
    site = Site(tmp_path / "site")
    entry = counters_page.render(site, [tmp_path / "results"])
    assert entry == {"path": "counters.html", "suite": "tiny", "gpu": "h200", "kernels": "8"}  # 4 designs × 2 directions
    page = html.unescape((tmp_path / "site" / "counters.html").read_text())
    for kernel in document["kernels"].values():
        assert f"<code>{kernel['kernel']}</code>" in page
    assert "floors are a model" in page
    chart = counters_page.floor_chart(counters_page._rows(document), "dcnv3")
    assert [trace["name"] for trace in chart["data"]] == [
        "cupy_direct · forward", "cupy_shared_scatter · forward", "cupy_staged · forward",
        "cupy_vectorized · forward", "cupy_direct · backward", "cupy_shared_scatter · backward",
        "cupy_staged · backward", "cupy_vectorized · backward"]
    assert all(trace["y"][0] > 0 for trace in chart["data"])


def test_no_page_without_a_counters_document(tmp_path):
    assert counters_page.render(Site(tmp_path / "site"), [tmp_path]) is None
