import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from harness import results
from harness.results import Row, RunDir


def row(case_id="op/N1/float32/random", impl="good", direction="forward", **fields):
    return Row(case_id=case_id, op="op", impl=impl, impl_kind="peer", direction=direction,
               dtype="float32", mode="random", params={"N": 1, "bias": True}, seed=0,
               device="cpu", **fields)


def test_rows_are_appended_one_json_line_each_and_non_finite_numbers_become_null(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    stored_meta = run_dir.create({"suite": {"name": "s"}})
    assert stored_meta["schema_version"] == results.SCHEMA_VERSION
    stored = run_dir.append(row(rel_l2=float("nan"), max_abs=float("inf"),
                                tensors={"output": {"rel_l2": float("nan")}}))
    run_dir.append(row(direction="backward", rel_l2=0.5))
    lines = (tmp_path / "run" / results.RESULTS).read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])  # strict JSON: no NaN literals
    assert first == stored
    assert (first["rel_l2"], first["max_abs"], first["tensors"]) == (None, None, {"output": {"rel_l2": None}})
    assert first["schema_version"] == results.SCHEMA_VERSION and first["finished_at"]
    assert results.read_rows(tmp_path / "run")[1]["rel_l2"] == 0.5


def test_reopen_cuts_a_half_written_row_and_checks_the_schema(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.create({"suite": {"name": "s"}})
    run_dir.append(row())
    with run_dir.results_path.open("a") as f:
        f.write('{"case_id": "op/N1/flo')
    metadata, rows = run_dir.reopen()
    assert len(rows) == 1 and metadata["schema_version"] == results.SCHEMA_VERSION
    assert run_dir.results_path.read_text().endswith("}\n")
    run_dir.write_metadata({**metadata, "schema_version": 1})  # readable, not resumable
    with pytest.raises(ValueError, match=f"results schema version 1, expected {results.SCHEMA_VERSION}; start a new run"):
        run_dir.reopen()
    with pytest.raises(FileNotFoundError, match="no metadata.json; expected a run directory"):
        RunDir(tmp_path / "nothing").reopen()


def test_load_returns_a_dataframe_of_one_or_several_runs(tmp_path):
    for name, impls in (("run-a", ["good", "fast"]), ("run-b", ["good"])):
        run_dir = RunDir(tmp_path / "runs" / name)
        run_dir.create({"suite": {"name": name}})
        for impl in impls:
            run_dir.append(row(impl=impl, time_median_ms=1.5))
    one = results.load(tmp_path / "runs" / "run-a")
    assert isinstance(one, pd.DataFrame) and len(one) == 2
    assert list(one["impl"]) == ["good", "fast"]
    assert (one["params.N"] == 1).all() and (one["run_id"] == "run-a").all()
    assert one.attrs["metadata"]["run-a"]["suite"]["name"] == "run-a"
    both = results.load(tmp_path / "runs")
    assert sorted(both["run_id"]) == ["run-a", "run-a", "run-b"]
    listed = results.load([tmp_path / "runs" / "run-a", str(tmp_path / "runs" / "run-b")])
    assert len(listed) == 3 and set(listed.attrs["metadata"]) == {"run-a", "run-b"}
    nested = RunDir(tmp_path / "runs" / "local" / "run-c")  # as results/local/<run>
    nested.create({"suite": {"name": "run-c"}})
    nested.append(row(impl="deep"))
    assert sorted(set(results.load(tmp_path / "runs")["run_id"])) == ["local/run-c", "run-a", "run-b"]


def test_load_of_an_empty_run_has_the_schema_columns(tmp_path):
    RunDir(tmp_path / "run").create({"suite": {"name": "s"}})
    frame = results.load(tmp_path / "run")
    assert frame.empty and {"run_id", "case_id", "status", "time_median_ms"} <= set(frame.columns)
    with pytest.raises(FileNotFoundError, match="neither a run directory nor a folder of run"):
        results.load(tmp_path / "run" / "missing")


def test_schema_document_lists_every_row_field():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "results-schema.md").read_text()
    for field in [f.name for f in dataclasses.fields(Row)]:
        assert f"`{field}`" in doc, f"docs/results-schema.md does not document {field}"


COMMITTED_V1_RUN = Path(__file__).resolve().parents[2] / "results/cpu/20261128T174700Z-smoke"


def test_the_committed_v1_run_loads_as_v2():
    raw = [json.loads(line) for line in (COMMITTED_V1_RUN / results.RESULTS).read_text().splitlines()]
    assert {r["schema_version"] for r in raw} == {1}  # the file on disk stays as written
    frame = results.load(COMMITTED_V1_RUN)
    assert len(frame) == len(raw) and set(frame["schema_version"]) == {results.SCHEMA_VERSION}
    timed = [r for r in raw if r["time_median_ms"]]
    assert timed, "the committed run has timed rows"
    loaded = frame.set_index(["case_id", "impl", "direction"])
    for old in timed:
        new = loaded.loc[(old["case_id"], old["impl"], old["direction"])]
        assert new["time_ms"] == old["time_median_ms"]
        for name in results.V1_METRIC_COLUMNS:  # moved into metrics, same values
            assert new["metrics"].get(name) == old[name]
            if old[name] is not None:
                assert new[name] == old[name]
        assert new["samples"] is None and new["rechecked"] is None
    assert all(name not in frame for name in ("metrics.speedup", "samples.time_ms"))


def test_an_unknown_schema_version_is_an_error_naming_it():
    with pytest.raises(ValueError, match="results schema version 7 is unknown; this dcnbench reads versions 1, 2"):
        results.migrate_row({"schema_version": 7})


def test_samples_round_trip_as_float32_and_load_decodes_them(tmp_path):
    samples = [0.125, 1.5, 3.0e-3, 12.75]
    encoded = results.encode_samples(samples)
    assert results.decode_samples(encoded).tolist() == pytest.approx(samples, rel=1e-7)
    assert len(encoded) <= 4 * len(samples) * 4 // 3 + 4  # base64 of 4 bytes a sample
    run_dir = RunDir(tmp_path / "run")
    run_dir.create({"suite": {"name": "s"}})
    run_dir.append(row(samples={"time_ms": encoded}, metrics={"time_ms": 1.0, "speedup": 2.0}))
    frame = results.load(tmp_path / "run")
    assert frame["samples"][0]["time_ms"].dtype.name == "float32"
    assert frame["samples"][0]["time_ms"].tolist() == pytest.approx(samples, rel=1e-7)
    assert (frame["speedup"][0], frame["time_ms"][0]) == (2.0, 1.0)
    assert pd.isna(frame["gbps"][0])  # a registered metric the row lacks: a NaN column
