import dataclasses
import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from harness_toy import CORRECT_IMPLS, TOY, TOY_SUITE, toy_math
from rich.console import Console

from harness import execution, registry, results, runner, suites, timing
from harness.timing import TimingConfig

FAST = TimingConfig(warmup_ms=0.5, rep_ms=1, min_samples=3)
IMPLS = 12  # registered by harness_toy
CASES = 4  # C in (2, 3) × modes (random, zeros)


@pytest.fixture(autouse=True)
def small_copy(monkeypatch):
    monkeypatch.setitem(timing.COPY_BYTES, "cpu", 1 << 20)


def run(suite_path, out, console_file=None, **options):
    console = Console(file=console_file or io.StringIO(), width=300)
    options.setdefault("timing", FAST)
    opts = runner.RunOptions(suite=suites.load(suite_path), device="cpu", out=out, **options)
    return runner.run_suite(opts, console)


def by(rows, impl, direction="forward", mode="random"):
    return [r for r in rows if r["impl"] == impl and r["direction"] == direction
            and r["mode"] == mode]


def test_sweep_records_every_implementation_and_goes_on(toy, toy_suite, tmp_path):
    out = io.StringIO()
    status = run(toy_suite, tmp_path / "run", console_file=out)
    rows = results.read_rows(tmp_path / "run")
    assert status == 1  # planted failures
    assert len(rows) == CASES * IMPLS * 2
    assert len({results.row_key(r) for r in rows}) == len(rows)

    for impl in CORRECT_IMPLS:
        assert {r["status"] for r in by(rows, impl)} == {"ok"}, impl
        assert {r["status"] for r in by(rows, impl, "backward")} == {"ok"}, impl
    assert {r["status"] for r in rows if r["mode"] == "zeros" and r["direction"] == "backward"} == {
        "skipped"}
    assert by(rows, "good", "backward", "zeros")[0]["reason"].startswith("mode 'zeros' puts samples")

    wrong = by(rows, "wrong")[0]
    assert wrong["status"] == "fail" and wrong["reason"].startswith("output: rel_l2 0.01")
    assert wrong["rel_l2"] == pytest.approx(0.01, rel=1e-3) and wrong["tol_rel_l2"] == 1e-6
    assert wrong["reproduce"] in out.getvalue().replace("\n", "")
    wrong_grads = by(rows, "wrong", "backward")[0]
    assert set(wrong_grads["tensors"]) == {"grad_input", "grad_weight", "grad_bias"}
    assert wrong_grads["worst_tensor"] in wrong_grads["tensors"]
    assert all(f"{name}: rel_l2 0.01" in wrong_grads["reason"] for name in wrong_grads["tensors"])

    for planted in ("nan", "unwritten"):
        row = by(rows, planted)[0]
        assert (row["status"], row["nonfinite"], row["rel_l2"]) == ("fail", 1, None), planted
    assert by(rows, "unwritten", "backward")[0]["reason"] == "toy_scale/unwritten has no backward"

    crash = by(rows, "crash")[0]
    assert crash["status"] == "error" and crash["reason"] == "RuntimeError: boom"
    assert "raise RuntimeError(\"boom\")" in crash["traceback"]
    assert {r["status"] for r in by(rows, "missing")} == {"skipped"}
    assert by(rows, "missing")[0]["reason"] == "needs the frobnicator"
    assert by(rows, "forward_only", "backward")[0]["reason"] == (
        "toy_scale/forward_only has no backward")

    cached = by(rows, "cached")[0]  # right on its checked call, stale on its timed ones
    assert cached["status"] == "fail" and cached["rechecked"] is False
    assert cached["reason"].startswith("after timing, the last timed call's output: output:")

    emulated = by(rows, "emulated")[0]
    assert emulated["device"] == "emulated" and emulated["time_median_ms"] is None
    assert emulated["timing_skipped"] == execution.EMULATED_NOT_TIMED


def test_rows_carry_timing_and_derived_metrics(toy, toy_suite, tmp_path):
    run(toy_suite, tmp_path / "run")
    rows = results.read_rows(tmp_path / "run")
    metadata = results.read_metadata(tmp_path / "run")
    bandwidth = metadata["copy_bandwidth_gbps"]
    assert bandwidth > 0
    for direction in ("forward", "backward"):
        good = by(rows, "good", direction)[0]
        base = by(rows, "baseline", direction)[0]
        assert good["timer"] == "cpu-clock" and good["time_samples"] >= 3
        assert good["time_median_ms"] > 0 and good["time_iqr_ms"] >= 0
        seconds = good["time_median_ms"] * 1e-3
        size = 2 * good["params"]["C"] * 4 * 5
        assert good["flops"] == (3.0 if direction == "forward" else 6.0) * size
        metrics = good["metrics"]
        assert metrics["time_ms"] == good["time_median_ms"]
        assert metrics["tflops"] == pytest.approx(good["flops"] / seconds / 1e12)
        assert metrics["gbps"] == pytest.approx(good["bytes"] / seconds / 1e9)
        assert metrics["roofline_fraction"] == pytest.approx(metrics["gbps"] / bandwidth)
        assert base["metrics"]["speedup"] == 1.0
        assert metrics["speedup"] == pytest.approx(base["time_median_ms"] / good["time_median_ms"])
        # GPU-only metrics are absent on the CPU, not zero.
        assert not {"host_overhead_us", "as_called_ms", "peak_memory_mib"} & set(metrics)
        assert good["sm_clock_mhz"] is None  # NVML only on CUDA
        samples = results.decode_samples(good["samples"]["time_ms"])
        assert len(samples) == good["time_samples"] and set(good["samples"]) == {"time_ms"}
        assert float(np.median(samples)) == pytest.approx(good["time_median_ms"], rel=1e-6)
        assert good["rechecked"] is True


def test_correctness_runs_are_poisoned_and_timing_runs_are_not(toy, toy_suite, tmp_path):
    run(toy_suite, tmp_path / "run", impls=["good"])
    poisoned = toy.poisoned["good"]
    assert True in poisoned and False in poisoned


def test_metadata_describes_the_run(toy, toy_suite, tmp_path):
    run(toy_suite, tmp_path / "run", seed=11)
    meta = results.read_metadata(tmp_path / "run")
    assert meta["schema_version"] == results.SCHEMA_VERSION
    assert meta["suite"]["name"] == "toy" and len(meta["suite"]["sha256"]) == 64
    assert (meta["device"], meta["seed"]) == ("cpu", 11)
    assert meta["tf32"] == {"matmul": False, "cudnn": False}
    for key in ("time", "host", "git", "cpu", "gpu", "driver", "cuda", "versions"):
        assert key in meta, key
    assert set(meta["versions"]) >= {"torch", "torchvision", "cupy", "numpy", "python"}
    assert {r["seed"] for r in results.read_rows(tmp_path / "run")} == {11}
    doc = (Path(__file__).resolve().parents[2] / "docs" / "results-schema.md").read_text()
    for key in meta:
        assert f"| `{key}` |" in doc, f"docs/results-schema.md does not document metadata {key}"


def test_exit_status_is_zero_when_every_check_passes(toy, toy_suite, tmp_path):
    assert run(toy_suite, tmp_path / "run", impls=["good", "baseline", "missing"]) == 0


def test_selection_orders_the_baseline_first_and_rejects_unknown_names(toy, toy_suite):
    suite = suites.load(toy_suite)
    options = runner.RunOptions(suite=suite, impls=["good", "baseline"], dtypes=["float32"])
    selected = runner.select(options)
    assert len(selected) == CASES
    assert all([i.name for i in impls] == ["baseline", "good"] for _, impls in selected)
    for field, flag in (("ops", "--op"), ("impls", "--impl"), ("dtypes", "--dtype")):
        bad = dataclasses.replace(options, **{field: ["nope"]})
        with pytest.raises(ValueError, match=f"{flag}: 'nope' is not in suite toy; expected one of"):
            runner.select(bad)


def test_a_case_whose_inputs_fail_records_errors_and_the_sweep_goes_on(toy, toy_suite, tmp_path):
    op = registry.get_operator(TOY)

    def make_inputs(params, dtype, device, generator, mode):
        if params["C"] == 3:
            raise ValueError("cannot draw C=3")
        return op.make_inputs(params, dtype, device, generator, mode)

    registry.OPERATORS[TOY] = dataclasses.replace(op, make_inputs=make_inputs)
    assert run(toy_suite, tmp_path / "run", impls=["good", "missing"]) == 1
    rows = results.read_rows(tmp_path / "run")
    broken = [r for r in rows if r["params"]["C"] == 3 and r["impl"] == "good"
              and not (r["mode"] == "zeros" and r["direction"] == "backward")]
    assert {r["status"] for r in broken} == {"error"}
    assert broken[0]["reason"] == "preparing the case: ValueError: cannot draw C=3"
    assert {r["status"] for r in rows if r["params"]["C"] == 2 and r["impl"] == "good"} <= {
        "ok", "skipped"}
    assert {r["status"] for r in rows if r["impl"] == "missing"} == {"skipped"}


def test_interrupted_run_keeps_finished_rows_and_resume_completes_it(toy, toy_suite, tmp_path,
                                                                      monkeypatch):
    real_run = execution.run
    calls = []

    def interrupt_at_seventh(*args, **kwargs):
        calls.append(args[1].name)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(execution, "run", interrupt_at_seventh)
    out = io.StringIO()
    assert run(toy_suite, tmp_path / "run", console_file=out) == runner.EXIT_INTERRUPTED
    assert "interrupted" in out.getvalue() and "dcnbench results" in out.getvalue()
    finished = results.read_rows(tmp_path / "run")
    assert len(finished) == 6

    monkeypatch.setattr(execution, "run", real_run)
    with pytest.raises(FileExistsError, match="already holds a run; pass --resume"):
        run(toy_suite, tmp_path / "run")
    counted = []
    monkeypatch.setattr(execution, "run", lambda *a, **k: counted.append(1) or real_run(*a, **k))
    assert run(toy_suite, tmp_path / "run", resume=True) == 1
    rows = results.read_rows(tmp_path / "run")
    assert len(rows) == CASES * IMPLS * 2
    assert len(counted) == len(rows) - 6  # finished rows were not run again
    assert rows[:6] == finished
    assert len({results.row_key(r) for r in rows}) == len(rows)
    assert len(results.read_metadata(tmp_path / "run")["resumed"]) == 1


def test_resume_cuts_off_a_row_whose_write_was_interrupted(toy, toy_suite, tmp_path):
    run(toy_suite, tmp_path / "run", impls=["good"])
    path = tmp_path / "run" / results.RESULTS
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:25])  # the last row, cut short
    assert len(results.read_rows(tmp_path / "run")) == len(lines) - 1
    assert run(toy_suite, tmp_path / "run", impls=["good"], resume=True) == 0
    assert [json.loads(line) for line in path.read_text().splitlines()][-1]["impl"] == "good"
    assert len(results.read_rows(tmp_path / "run")) == len(lines)


class _DiskFullAfter:
    """``Path.open`` for a disk that fills up after ``rows`` rows of results.jsonl: the
    next row's write gets half its bytes onto the disk, then ENOSPC, as write(2) does."""

    def __init__(self, rows: int):
        self.rows, self.real_open = rows, Path.open

    def __call__(self, path, mode="r", *args, **kwargs):
        f = self.real_open(path, mode, *args, **kwargs)
        if path.name != results.RESULTS or "a" not in mode:
            return f
        if self.rows == 0:
            real_write = f.write

            def write(data):
                if len(data) > 1:
                    return real_write(data[:len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            f.write = write
        self.rows -= 1
        return f


def test_a_full_disk_stops_the_run_keeping_every_written_row_and_says_how_to_resume(
        toy, toy_suite, tmp_path, monkeypatch):
    out = io.StringIO()
    disk = _DiskFullAfter(rows=5)
    with monkeypatch.context() as patched:
        patched.setattr(Path, "open", lambda path, *a, **k: disk(path, *a, **k))
        assert run(toy_suite, tmp_path / "run", console_file=out) == runner.EXIT_NOT_WRITTEN
    printed = out.getvalue()
    assert "No space left on device" in printed and "dcnbench results" in printed
    assert f"the 5 finished rows are saved; run the same command again with --resume --out " \
           f"{tmp_path / 'run'}" in printed
    # The half-written sixth row was taken back: the file is whole, resume needs no repair.
    text = (tmp_path / "run" / results.RESULTS).read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 5
    written = results.read_rows(tmp_path / "run")
    assert run(toy_suite, tmp_path / "run", resume=True) == 1  # the toy's wrong impls fail
    rows = results.read_rows(tmp_path / "run")
    assert rows[:5] == written and len(rows) == CASES * IMPLS * 2
    assert len({results.row_key(r) for r in rows}) == len(rows)


def test_resume_refuses_another_seed_or_suite(toy, toy_suite, write_suite, tmp_path):
    run(toy_suite, tmp_path / "run", impls=["good"])
    with pytest.raises(ValueError, match="was run with seed 0, this run asks for 1"):
        run(toy_suite, tmp_path / "run", impls=["good"], resume=True, seed=1)
    other = write_suite('description = "x"\n[[sweep]]\nop = "toy_scale"\n', name="other")
    with pytest.raises(ValueError, match="was run with suite 'toy', this run asks for 'other'"):
        run(other, tmp_path / "run", resume=True)


def test_resume_refuses_another_file_of_the_same_name_or_other_timing(toy, toy_suite,
                                                                      write_suite, tmp_path):
    run(toy_suite, tmp_path / "run", impls=["good"])
    rows = len(results.read_rows(tmp_path / "run"))
    run(toy_suite, tmp_path / "untimed", impls=["good"], timing=None)
    with pytest.raises(ValueError, match=r"was run with timing None, this run asks for \{"):
        run(toy_suite, tmp_path / "untimed", impls=["good"], resume=True)
    with pytest.raises(ValueError, match="was run with timing .* this run asks for None"):
        run(toy_suite, tmp_path / "run", impls=["good"], resume=True, timing=None)
    slower = dataclasses.replace(FAST, rep_ms=2)
    with pytest.raises(ValueError, match="'rep_ms': 1,.* this run asks for .*'rep_ms': 2,"):
        run(toy_suite, tmp_path / "run", impls=["good"], resume=True, timing=slower)
    # Another file named toy.toml: the same name, other sweeps.
    write_suite(TOY_SUITE.replace("C = [2, 3]", "C = [4]"), name="toy")
    with pytest.raises(ValueError, match="was run with suite sha256 '[0-9a-f]{64}', this run "
                                         "asks for '[0-9a-f]{64}'"):
        run(toy_suite, tmp_path / "run", impls=["good"], resume=True)
    assert len(results.read_rows(tmp_path / "run")) == rows  # nothing foreign appended


def test_no_timing_checks_only(toy, toy_suite, tmp_path):
    assert run(toy_suite, tmp_path / "run", impls=["good"], timing=None) == 0
    rows = results.read_rows(tmp_path / "run")
    assert {r["timing_skipped"] for r in rows if r["status"] == "ok"} == {execution.TIMING_OFF}
    assert "copy_bandwidth_gbps" not in results.read_metadata(tmp_path / "run")


def test_a_reference_that_returns_nan_is_an_error_not_a_pass(toy, toy_suite, tmp_path):
    reference = registry.get_implementation(TOY, "reference")

    def broken(inputs, params):
        call = reference.prepare(inputs, params)
        return lambda: call() * float("nan")

    registry.IMPLEMENTATIONS[(TOY, "reference")] = dataclasses.replace(reference, prepare=broken)
    assert run(toy_suite, tmp_path / "run", impls=["good"], dtypes=["float32"]) == 1
    rows = results.read_rows(tmp_path / "run")
    ran = [r for r in rows if r["status"] != "skipped"]
    assert ran and {r["status"] for r in ran} == {"error"}
    assert ran[0]["reason"].startswith(
        "preparing the case: ValueError: the reference's output has 80 non-finite values")


def test_a_known_inaccurate_peer_is_xfail_but_its_nan_still_fails(toy, toy_suite, tmp_path):
    half = {"float32": "computes in half precision"}

    @registry.implementation(TOY, "sloppy", kind="peer", known_inaccurate=half)
    def sloppy(inputs, params):
        """1% off: outside the float32 bound, declared known-inaccurate."""
        return lambda: toy_math(inputs, params) * 1.01

    assert run(toy_suite, tmp_path / "xfail", impls=["sloppy"], dtypes=["float32"]) == 0
    row = by(results.read_rows(tmp_path / "xfail"), "sloppy")[0]
    assert row["status"] == "xfail" and row["rel_l2"] == pytest.approx(0.01, rel=1e-3)
    assert row["reason"].startswith("known inaccuracy (computes in half precision): output:")

    @registry.implementation(TOY, "sloppy_nan", kind="peer", known_inaccurate=half)
    def sloppy_nan(inputs, params):
        """Declared known-inaccurate, but a NaN is never excused."""
        return lambda: toy_math(inputs, params) * float("nan")

    assert run(toy_suite, tmp_path / "nan", impls=["sloppy_nan"], dtypes=["float32"]) == 1
    assert {r["status"] for r in by(results.read_rows(tmp_path / "nan"), "sloppy_nan")} == {"fail"}


def test_smoke_slice_runs_the_real_operators(tmp_path):
    # Harness and operators together: one smoke case, every implementation, both directions.
    options = runner.RunOptions(suite=suites.load("smoke"), device="cpu", out=tmp_path / "run",
                                ops=["modulated_deform_conv2d"], dtypes=["bfloat16"], timing=None)
    runner.run_suite(options, Console(file=io.StringIO()))
    rows = {(r["impl"], r["direction"]): r for r in results.read_rows(tmp_path / "run")}
    assert set(rows) >= {(impl, d) for impl in ("reference", "torchvision", "cupy")
                         for d in ("forward", "backward")}  # at least these: plugins add more
    assert {rows["reference", d]["status"] for d in ("forward", "backward")} == {"ok"}
    assert set(rows["reference", "backward"]["tensors"]) == {
        "grad_input", "grad_offset", "grad_mask", "grad_weight", "grad_bias"}
    assert rows["torchvision", "forward"]["status"] == "skipped"
    assert "does not take bfloat16" in rows["torchvision", "forward"]["reason"]
    assert {rows["cupy", d]["device"] for d in ("forward", "backward")} == {"emulated"}


def test_the_output_dtype_rule_is_the_operators(toy, toy_suite, tmp_path):
    """An operator that wants float64 gradients says so on its declaration; the check
    then calls a float32 gradient an error (wrong dtype), not a pass."""
    op = registry.OPERATORS[TOY]
    registry.OPERATORS[TOY] = dataclasses.replace(
        op, output_dtype=lambda tensor, dtype: "float64" if tensor.startswith("grad_") else dtype)
    run(toy_suite, tmp_path / "run", impls=["good"], timing=None)
    rows = results.read_rows(tmp_path / "run")
    assert {r["status"] for r in by(rows, "good")} == {"ok"}
    backward = by(rows, "good", "backward")[0]
    assert backward["status"] == "error"
    assert "has dtype torch.float32, expected torch.float64" in backward["reason"]
