"""``scripts/gpu-check.sh``: its plan fits the call, its dry run passes here, and
its steps behave at their limits (harness/gpu_check.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from harness import gpu_check, suites

ROOT = Path(__file__).resolve().parents[2]
PLAN = {step.name: step for step in gpu_check.steps(Path("/work-dir"))}


@pytest.mark.slow
def test_the_dry_run_passes_here():
    """Every program the steps need that a CPU machine has, every dcnbench run's
    suite / implementations / dtypes, and pytest's options and GPU tests."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    result = subprocess.run(["bash", "scripts/gpu-check.sh", "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "PATH": path},
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dry run: every step can start" in result.stdout
    for name in PLAN:
        assert f"\n{name} " in "\n" + result.stdout


@pytest.mark.parametrize(("args", "why"), [
    (["run", "--suite", "smok"], "smok"),
    (["run", "--suite", "smoke", "--impl", "cuda"], "--impl: 'cuda' is not in suite smoke"),
    (["run", "--suite", "rfcn-dpsroi", "--dtype", "float64"], "--dtype: 'float64'"),
    (["run", "--suite", "smoke", "--timing-off"], "does not accept"),
])
def test_the_dry_run_finds_a_step_that_would_not_run(args, why):
    assert why in gpu_check.check_harness_run(args)


def test_the_dry_run_accepts_every_dcnbench_step_of_the_plan():
    for step in PLAN.values():
        args = gpu_check._harness_arguments(step.argv)
        if args is not None:
            assert gpu_check.check_harness_run(args) is None, step.name


def test_the_plan_fits_the_call():
    assert sum(step.limit_s for step in PLAN.values()) <= gpu_check.BUDGET_S - 15
    assert gpu_check.BUDGET_S <= 7 * 60  # the call allows 8 minutes


def test_a_first_run_reports_every_gpu_test_failure_and_a_junit_xml():
    argv = PLAN["gpu-tests"].argv
    assert "-x" not in argv and "--exitfirst" not in argv
    assert "--maxfail=50" in argv
    assert "--junitxml=/work-dir/gpu-tests.xml" in argv


def test_torch_compile_has_a_step_of_its_own():
    with_compile = [name for name, step in PLAN.items() if "torch_compile" in step.argv]
    assert with_compile == ["torch-compile"]
    for name, step in PLAN.items():
        if "--suite" in step.argv and name != "torch-compile":
            suite = suites.load(step.argv[step.argv.index("--suite") + 1])
            impls = set(step.argv[step.argv.index("--impl") + 1:]) if "--impl" in step.argv else {
                i for case in suite.cases for i in case.impls}
            assert "torch_compile" not in impls, name


def test_internimage_is_timed_on_one_case_per_stage():
    suite = suites.load("internimage-stages")
    stages = {(c.case.op.name, c.case.params["H"]) for c in suite.cases}
    assert len(suite.cases) == len(stages) == 3 * 4
    assert {h for _, h in stages} == {56, 28, 14, 7}


def test_the_sanitizers_and_ncu_cover_every_kernel_of_ours(tmp_path):
    """Their cases, run through the CUDA branch (the CuPy stand-in), launch every
    kernel of ours, and pass."""
    from harness import cli
    from kernels.emulator import cupy_shim

    for name in ("memcheck", "racecheck"):
        assert PLAN[name].argv[:3] == ("compute-sanitizer", "--tool", name)
    def probe(step: str) -> list[str]:
        args = gpu_check._harness_arguments(PLAN[step].argv)
        del args[args.index("--out"):args.index("--out") + 2]
        return args

    args = probe("ncu")
    assert args == probe("memcheck") == probe("racecheck")
    args[args.index("cuda")] = "cpu"
    args += ["--out", str(tmp_path / "probe")]
    with cupy_shim.emulated_gpu() as gpu:
        assert cli.main(args) == 0
    launched = {launch.kernel.split("<")[0] for launch in gpu.launches}
    assert launched == set(gpu_check.our_kernel_names())
    ncu = PLAN["ncu"].argv
    kernels = ncu[ncu.index("--kernel-name") + 1]
    assert all(name in kernels for name in (
        "dcnv3_direct_forward", "dcnv3_vectorized_backward", "deform_im2col", "deform_col2im",
        "deform_roi_pool_forward", "deform_psroi_pool_backward"))
    metrics = ncu[ncu.index("--metrics") + 1].split(",")
    assert "sm__warps_active.avg.pct_of_peak_sustained_active" in metrics
    assert {m for m in metrics if "global_op" in m} == {
        f"l1tex__t_{what}_pipe_lsu_mem_global_op_{op}.sum"
        for what in ("requests", "sectors") for op in ("ld", "st", "red", "atom")}


@pytest.fixture
def quick_limits(monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 1)


def python_step(name: str, limit_s: int, code: str, **kwargs) -> gpu_check.Step:
    return gpu_check.Step(name, limit_s, (sys.executable, "-c", code), **kwargs)


SLEEPER = """
import sys, time
print("started", flush=True)
try:
    time.sleep(60)
except KeyboardInterrupt:
    print("interrupted: finished rows kept", flush=True)
    sys.exit(130)
"""


def test_a_step_past_its_limit_is_interrupted_and_keeps_its_output(quick_limits, tmp_path):
    outcome = gpu_check.run_step(python_step("sleeper", 3, SLEEPER), tmp_path, 1e12)
    assert outcome["status"] == "cut"
    assert outcome["seconds"] < 3.5
    assert "interrupted: finished rows kept" in (tmp_path / "sleeper.log").read_text()


def test_a_step_never_outlasts_the_whole_budget(quick_limits, tmp_path):
    import time
    outcome = gpu_check.run_step(python_step("sleeper", 60, SLEEPER), tmp_path,
                                 time.monotonic() + 3)
    assert outcome["status"] == "cut" and outcome["seconds"] < 3.5
    late = gpu_check.run_step(python_step("late", 60, "pass"), tmp_path, time.monotonic())
    assert late["status"] == "skipped" and "out of budget" in late["reason"]


def test_an_unsupported_device_skips_the_sanitizer_instead_of_failing_it(tmp_path):
    code = ('print("========= Error: Device not supported. Please refer to the docs");'
            "raise SystemExit(1)")
    step = python_step("memcheck", 20, code, unsupported=gpu_check.SANITIZER_UNSUPPORTED)
    outcome = gpu_check.run_step(step, tmp_path, 1e12)
    assert outcome["status"] == "skipped"
    assert "Device not supported" in outcome["reason"]
    failing = python_step("memcheck", 20, 'print("========= ERROR SUMMARY: 3 errors");'
                          "raise SystemExit(86)", unsupported=gpu_check.SANITIZER_UNSUPPORTED)
    assert gpu_check.run_step(failing, tmp_path, 1e12)["status"] == "failed"


def test_a_missing_program_skips_its_step(tmp_path):
    step = gpu_check.Step("ncu", 20, ("ncu-that-is-not-installed", "--version"))
    outcome = gpu_check.run_step(step, tmp_path, 1e12)
    assert outcome["status"] == "skipped" and "not on the PATH" in outcome["reason"]


def test_everything_comes_back_in_one_tarball(quick_limits, tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_CHECK_COMMIT", "0123abc")
    monkeypatch.setattr(gpu_check, "steps", lambda work: [
        python_step("writes", 20, f"open({str(work / 'rows.jsonl')!r}, 'w').write('row')"),
        python_step("fails", 20, "raise SystemExit(1)"),
    ])
    assert gpu_check.run(tmp_path / "out") == 0
    (tarball,) = (tmp_path / "out").glob("*.tar.gz")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [tarball.name, tarball.name.removesuffix(".tar.gz") + "-steps.txt"])
    with tarfile.open(tarball) as tar:
        names = {Path(n).name for n in tar.getnames()}
        steps_json = next(n for n in tar.getnames() if n.endswith("steps.json"))
        outcomes = json.load(tar.extractfile(steps_json))
        commit = tar.extractfile(next(n for n in tar.getnames() if n.endswith("commit.txt")))
        assert commit.read().decode().strip() == "0123abc"
    assert {"rows.jsonl", "writes.log", "fails.log", "nvidia-smi.csv", "steps.txt"} <= names
    assert [(o["step"], o["status"], o["exit_code"]) for o in outcomes] == [
        ("writes", "ok", 0), ("fails", "failed", 1)]


def test_the_peers_are_built_before_the_suites_that_use_them_and_skipped_when_not_carried(tmp_path):
    names = list(PLAN)
    assert names.index("peer-builds") < min(names.index("smoke"), names.index("msda-l4"))
    step = PLAN["peer-builds"]
    assert step.needs == gpu_check.WHEELS
    missing = dataclasses.replace(step, needs=tmp_path / "absent")
    outcome = gpu_check.run_step(missing, tmp_path, time.monotonic() + 60)
    assert outcome["status"] == "skipped" and "is not here" in outcome["reason"]


def test_the_peer_step_installs_carried_wheels_and_records_each_build(tmp_path):
    """A carried wheel lands in the site every later step imports from; peer-builds.json
    says what installed, how, and in how many seconds."""
    from harness import peer_builds

    wheels = tmp_path / "whl"
    wheels.mkdir()
    dist = "fakepeer-1.0.dist-info"
    files = {"fakepeer/__init__.py": "VERSION = '1.0'\n",
             f"{dist}/METADATA": "Metadata-Version: 2.1\nName: fakepeer\nVersion: 1.0\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(wheels / "fakepeer-1.0-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        wheel.writestr(f"{dist}/RECORD", "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n")
    site = tmp_path / "site"
    assert peer_builds.install(wheels, site, tmp_path) == 0
    assert (site / "fakepeer" / "__init__.py").is_file()
    [outcome] = json.loads((tmp_path / "peer-builds.json").read_text())
    assert outcome["status"] == "ok" and outcome["kind"] == "wheels" and outcome["seconds"] >= 0
