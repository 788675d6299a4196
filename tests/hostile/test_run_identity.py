"""Run identity: runs whose directories share a name stay distinct runs, in
``load`` and in the report, and page names never collide."""

from __future__ import annotations

import shutil
from pathlib import Path

from harness import results
from reports import site as site_builder

COMMITTED_RUN = Path(__file__).resolve().parents[2] / "results/cpu/20261128T174700Z-smoke"


def _same_named_runs(root: Path, rows: int = 12) -> None:
    """root/local/X and root/cpu/X: the README's commit workflow."""
    lines = (COMMITTED_RUN / results.RESULTS).read_text().splitlines(keepends=True)
    for device in ("local", "cpu"):
        run = root / device / "X"
        run.mkdir(parents=True)
        shutil.copy(COMMITTED_RUN / results.METADATA, run / results.METADATA)
        (run / results.RESULTS).write_text("".join(lines[:rows]))


def test_runs_sharing_a_name_load_as_two_runs(tmp_path):
    _same_named_runs(tmp_path)
    frame = results.load(tmp_path)
    assert frame.groupby("run_id").size().to_dict() == {"cpu/X": 12, "local/X": 12}
    assert set(frame.attrs["metadata"]) == {"cpu/X", "local/X"}
    # Passed by name, each run is its own; passed twice, one run once.
    given = results.load([tmp_path / "local" / "X", tmp_path / "cpu" / "X", tmp_path / "cpu" / "X"])
    assert set(given["run_id"]) == {(tmp_path / "local" / "X").as_posix(),
                                    (tmp_path / "cpu" / "X").as_posix()}
    assert len(given) == 24


def test_the_report_draws_each_same_named_run_on_its_own_page(tmp_path):
    _same_named_runs(tmp_path / "results")
    built = site_builder.build([tmp_path / "results"], tmp_path / "site")
    assert (built.runs, built.rows) == (2, 24)
    run_pages = {p.name for p in (tmp_path / "site" / "runs").glob("*.html")}
    assert len(run_pages) == 2


def test_slugs_of_distinct_names_are_distinct_file_names():
    names = ["local/X", "cpu/X", "local-X", "a b", "a  b", "a/b", "a-b", "", "-", ".", "..",
             "../../etc", "x" * 200, "x" * 201, "ünïcode", "unicode", "<script>", "CON"]
    slugs = [site_builder.slug(n) for n in names]
    assert len(set(slugs)) == len(names), dict(zip(names, slugs, strict=True))
    for s in slugs:
        assert s and len(s) <= 100 and "/" not in s and s not in (".", "..") and not s.startswith(".")
    assert site_builder.slug("20261128T174700Z-smoke") == "20261128T174700Z-smoke"  # safe: kept


def test_each_new_run_gets_a_unique_id_in_its_metadata(tmp_path):
    first = results.RunDir(tmp_path / "a").create({"suite": {"name": "s"}})
    second = results.RunDir(tmp_path / "b").create({"suite": {"name": "s"}})
    assert len(first["run_uuid"]) == 32 and first["run_uuid"] != second["run_uuid"]
