"""The run page's "Deterministic backward" table, from the rows' ``deterministic`` field."""

import re

from harness import cli, results


def test_run_page_counts_the_bit_reproducible_backward_rows(smoke_run, tmp_path):
    rows = results.load(smoke_run)
    backward = rows[(rows["direction"] == "backward") & (rows["status"] != "skipped")]
    assert len(backward) and backward["deterministic"].notna().all()
    assert cli.main(["report", str(smoke_run), "-o", str(tmp_path / "site")]) == 0
    page = next((tmp_path / "site" / "runs").glob("*.html")).read_text()
    table = page.split("<h2>Deterministic backward</h2>")[1].split("<h2>")[0]
    for (op, impl), group in backward.groupby(["op", "impl"]):
        reproducible = int(group["deterministic"].astype(bool).sum())
        assert re.search(rf"<td>{op}</td><td>{impl}</td><td[^>]*>{reproducible} of {len(group)}<",
                         table), (op, impl)
    ours = backward[backward["impl"] == "cupy"]
    assert len(ours) and ours["deterministic"].astype(bool).all()  # the fixed-point backward
