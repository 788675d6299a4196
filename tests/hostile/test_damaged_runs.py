"""Damaged run directories: readers name the file and line and skip the line
(never silently), ``--resume`` refuses with the line to repair, and every
reader checks ``schema_version``."""

from __future__ import annotations

import json

import pytest

from harness import results
from harness.results import DamagedRunWarning, Row, RunDir


def _run(path, rows=2):
    run_dir = RunDir(path)
    run_dir.create({"suite": {"name": "s"}})
    for index in range(rows):
        run_dir.append(Row(case_id=f"op/N{index}/float32/random", op="op", impl="good",
                           impl_kind="peer", direction="forward", dtype="float32",
                           mode="random", params={"N": index}, seed=0, device="cpu"))
    return run_dir


DAMAGED_LINES = {
    "garbage": ("not a row at all", "not JSON"),
    "blank": ("", "a blank line"),
    "nul": ("\0\0\0", "a blank line"),
    "empty object": ("{}", "missing case_id, op, impl"),
    "list": ("[1, 2]", "expected a JSON object, got a list"),
    "wrong type": (json.dumps({"case_id": 1, "op": "op", "impl": "i", "impl_kind": "peer",
                               "direction": "forward", "dtype": "float32", "mode": "random",
                               "params": {}, "status": "ok"}), "case_id is a int, expected str"),
    "bad status": (json.dumps({"case_id": "c", "op": "op", "impl": "i", "impl_kind": "peer",
                               "direction": "sideways", "dtype": "float32", "mode": "random",
                               "params": {}, "status": "ok"}), "direction 'sideways'"),
}


@pytest.mark.parametrize("kind", DAMAGED_LINES)
def test_a_damaged_line_is_skipped_with_a_warning_naming_file_and_line(kind, tmp_path):
    run_dir = _run(tmp_path / "run")
    good = run_dir.results_path.read_text().splitlines()
    line, problem = DAMAGED_LINES[kind]
    run_dir.results_path.write_text("\n".join([good[0], line, good[1]]) + "\n")
    with pytest.warns(DamagedRunWarning, match=f"results.jsonl:2: {problem}"):
        frame = results.load(tmp_path)
    assert list(frame["case_id"]) == ["op/N0/float32/random", "op/N1/float32/random"]
    with pytest.raises(ValueError, match=f"results.jsonl:2: {problem}.*repair or delete"):
        run_dir.reopen()


@pytest.mark.parametrize(("metadata", "message"), [
    ("garbage", "metadata.json: not JSON"),
    ("[1, 2]", "metadata.json: expected a JSON object, got a list"),
    ('{"schema_version": 2}', "metadata.json: expected 'suite' to be"),
    ('{"schema_version": 2, "suite": "s"}', "metadata.json: expected 'suite' to be"),
    ('{"schema_version": 99, "suite": {"name": "s"}}',
     "metadata.json: results schema version 99 is unknown; this dcnbench reads versions 1, 2"),
    ('{"schema_version": "2", "suite": {"name": "s"}}', "results schema version '2' is unknown"),
])
def test_damaged_or_foreign_metadata_is_an_error_naming_the_file(metadata, message, tmp_path):
    run_dir = _run(tmp_path / "run")
    run_dir.metadata_path.write_text(metadata)
    with pytest.raises(ValueError, match=message):
        results.load(tmp_path)
    with pytest.raises(ValueError, match=message):
        run_dir.reopen()


def test_a_row_of_an_unknown_schema_version_is_an_error_naming_its_line(tmp_path):
    run_dir = _run(tmp_path / "run")
    rows = [json.loads(line) for line in run_dir.results_path.read_text().splitlines()]
    rows[1]["schema_version"] = 3
    run_dir.results_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"results.jsonl:2: results schema version 3 is unknown"):
        results.load(tmp_path)


def test_the_cli_shows_a_skipped_line_as_one_warning_line(tmp_path, capsys):
    from harness import cli

    base, new = _run(tmp_path / "base"), _run(tmp_path / "new")
    with base.results_path.open("a") as f:
        f.write("garbage\n")
    assert cli.main(["compare", str(base.path), str(new.path)]) == 0
    out = "".join(capsys.readouterr().out.split())  # the console wraps lines, even in words
    assert f"dcnbenchcompare:warning:{base.results_path}:3:notJSON" in out
    assert "lineskipped" in out and "warnings.warn" not in out
