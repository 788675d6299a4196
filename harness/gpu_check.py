"""The GPU check: one call on a lent GPU machine, well inside its 8 minutes.

``bash scripts/gpu-check.sh`` from a plain checkout, with only the packages of
the GPU image (Python 3.12, torch, cupy, torchvision, triton, numpy, pandas,
rich, pytest, nvidia-ml-py; ncu and compute-sanitizer; no network). The steps
(:func:`steps`), each with its own limit, all of them within ``BUDGET_S``:

- the GPU tests, every failure reported (``--maxfail`` 50, not ``-x``: on a
  first run one tolerance miss must not hide the rest), with a junit XML;
- the suites on CUDA with short timing windows; InternImage as one case per
  stage (``internimage-stages``), ``torch_compile`` in a step of its own (its
  cold compiles take 20-60 s a graph);
- the peer packages carried in ``.whl/`` (``scripts/fetch-peers.sh``):
  deformops' wheel installed, torch-ms-deform-attn's and DCNv4's sdists built
  for this GPU (``harness.peer_builds``; skipped when nothing was carried),
  then the ``msda-l4`` suite with every implementation, peers included; every
  later step has the peers' folder on its ``PYTHONPATH``;
- ``compute-sanitizer`` memcheck and racecheck over every kernel of ours on
  small shapes in every input mode (the ``gpu-probe`` suite; skipped, not
  failed, where the sanitizer reports the device unsupported);
- ``ncu`` reading ``NCU_METRICS`` (global-memory sectors and requests of
  loads, stores and atomics, DRAM bytes, achieved occupancy) for those same
  cases into ``ncu.csv``, to calibrate the counter model against hardware.

A step past its limit gets SIGINT (the runner keeps every finished row, pytest
writes its junit XML), then SIGKILL ``GRACE_S`` later. Everything lands in one
tarball, ``$OUT/gpu-check-<UTC time>.tar.gz`` (``results/local/`` without
``$OUT``), beside ``gpu-check-<time>-steps.txt``: the steps' logs,
``steps.json`` (each step's status, exit code and seconds), ``commit.txt``
(``$GPU_CHECK_COMMIT``, else ``git rev-parse HEAD``), ``nvidia-smi.csv``,
``gpu-tests.xml``, each suite's run directory and ``ncu.csv``. Unpack it under
``results/<gpu-name>/`` (results/README.md).

``--dry-run`` prints the steps and checks, without a GPU, that each can start:
that every program is on the PATH (a missing ncu or compute-sanitizer is
reported: its step would be skipped), that each ``dcnbench run`` names a suite,
implementations and dtypes that select cases, and that pytest collects the GPU
tests with these options. CI runs it (``tests/gpu_path/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The whole script, steps and packing, in seconds: 7 of the call's 8 minutes.
BUDGET_S = 420
GRACE_S = 5  # between a step's SIGINT and its SIGKILL, inside its limit
MIN_STEP_S = 10  # a step with less time left than this is skipped
# The peer packages, carried by the device call (git-ignored), and where the
# peer step installs them inside the check's work directory.
WHEELS = ROOT / ".whl"
PEER_SITE = "peers-site"
PY = sys.executable
TIMING = ("--warmup-ms", "5", "--rep-ms", "20")  # short windows: the script must fit one call
OUR_KERNELS = ("--impl", "cupy", "cupy_direct", "cupy_vectorized", "cupy_staged",
               "cupy_shared_scatter", "cupy_channels_fastest", "cupy_implicit_gemm",
               "cupy_samples_fastest")
# The cases the sanitizers and ncu see: every kernel of ours, every input mode.
PROBE = ("--suite", "gpu-probe", *OUR_KERNELS, "--no-timing")
NCU_METRICS = (
    "gpu__time_duration.sum",
    "sm__warps_active.avg.pct_of_peak_sustained_active",  # achieved occupancy
    "l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_st.sum",
    "l1tex__t_sectors_pipe_lsu_mem_global_op_st.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_red.sum",  # atomics whose result is unused
    "l1tex__t_sectors_pipe_lsu_mem_global_op_red.sum",
    "l1tex__t_requests_pipe_lsu_mem_global_op_atom.sum",  # atomics returning a value
    "l1tex__t_sectors_pipe_lsu_mem_global_op_atom.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "launch__registers_per_thread",
)
NCU_LAUNCH_COUNT = 150  # kernels profiled at most: bounds the step's time
# Lines by which the sanitizer and ncu say this machine cannot run them.
SANITIZER_UNSUPPORTED = r"^=+ .*(not supported|unsupported)"
NCU_UNSUPPORTED = r"^==(ERROR|WARNING)==.*(ERR_NVGPUCTRPERM|not supported|unsupported)"


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    limit_s: int
    argv: tuple[str, ...]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # A regex for a line of the log that means "cannot run on this machine": the
    # step is then skipped, not failed.
    unsupported: str | None = None
    needs: Path | None = None  # a path that must exist, else the step is skipped


def our_kernel_names() -> list[str]:
    """The base names of every kernel of ours (ncu's filter)."""
    from kernels import cuda_sources

    sources = cuda_sources.load_all().values()
    return sorted({e.split("<", 1)[0] for s in sources for e in s.name_expressions})


def steps(work: Path) -> list[Step]:
    def harness_run(name: str, *args: str) -> tuple[str, ...]:
        return (PY, "-m", "harness", "run", "--device", "cuda", "--out", str(work / name), *args)

    def sanitizer(tool: str) -> Step:
        return Step(
            tool, 25,
            ("compute-sanitizer", "--tool", tool, "--error-exitcode", "86",
             *harness_run(tool, *PROBE)),
            # One cudaMalloc per tensor: an access past a tensor's end is out of bounds.
            env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
            unsupported=SANITIZER_UNSUPPORTED,
        )  # fmt: skip

    def timed(suite: str, *args: str, without: tuple[str, ...] = ()) -> Step:
        """A suite timed with every implementation but torch_compile (a step of its own)
        and those named in ``without``."""
        from harness import suites

        impls = dict.fromkeys(i for case in suites.load(suite).cases for i in case.impls)
        for name in ("torch_compile", *without):
            impls.pop(name, None)
        return harness_run(suite, "--suite", suite, "--impl", *impls, *args, *TIMING)

    # deformops' Triton kernels compile per shape (seconds each): its convolutions are
    # timed on the smoke shapes, not on every ResNet-50 layer in three dtypes.
    deformops = tuple(f"deformops_{backend}" for backend in ("eager", "triton", "cuda"))

    kernels = "|".join(our_kernel_names())
    return [
        Step("gpu-tests", 90, (  # it pays CuPy's cold compiles (cached after)
            PY, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider",
            "--maxfail=50", f"--junitxml={work / 'gpu-tests.xml'}",
            # The emulator, build-check, report and stand-in tests hold no GPU tests and
            # need CPU-side tooling (g++, NVRTC wheels, plotly) the GPU image lacks.
            "--ignore=tests/emulator", "--ignore=tests/test_build_check.py",
            "--ignore=tests/reports", "--ignore=tests/gpu_path")),
        # Both sdists build at once, for this GPU's architecture only, while nothing
        # else runs (measured build times land in peer-builds.json).
        Step("peer-builds", 60, (
            PY, "-m", "harness.peer_builds", "--wheels", str(WHEELS),
            "--site", str(work / PEER_SITE), "--work", str(work)), needs=WHEELS),
        Step("smoke", 20, timed("smoke")),
        Step("msda-l4", 30, timed("msda-l4")),
        Step("resnet50-dcn", 30, timed("resnet50-dcn", without=deformops)),
        # dtypes is resnet50-dcn in three dtypes: its float32 rows are the step above's.
        Step("dtypes", 20, timed("dtypes", "--dtype", "float16", "bfloat16", without=deformops)),
        Step("internimage-stages", 25, timed("internimage-stages")),
        Step("rfcn-dpsroi", 12, timed("rfcn-dpsroi")),
        Step("faster-rcnn-dpool", 12, timed("faster-rcnn-dpool")),
        Step("torch-compile", 30, harness_run(
            "torch-compile", "--suite", "internimage-stages", "--impl", "torch_compile", *TIMING)),
        sanitizer("memcheck"),
        sanitizer("racecheck"),
        Step("ncu", 25, (
            "ncu", "--csv", "--page", "raw", "--log-file", str(work / "ncu.csv"),
            "--metrics", ",".join(NCU_METRICS), "--kernel-name", f"regex:^({kernels})$",
            "--launch-count", str(NCU_LAUNCH_COUNT), *harness_run("ncu", *PROBE)),
            unsupported=NCU_UNSUPPORTED),
    ]  # fmt: skip


# --------------------------------------------------------------------------- #
# Running.
# --------------------------------------------------------------------------- #


def _tee(source, log, echo) -> None:
    for chunk in iter(lambda: source.read1(65536), b""):
        log.write(chunk)
        echo.write(chunk)
        echo.flush()


def run_step(step: Step, work: Path, deadline: float) -> dict:
    """Run ``step`` within its limit (and the deadline); its outcome for steps.json."""
    outcome = {"step": step.name, "limit_s": step.limit_s, "command": shlex.join(step.argv)}
    if shutil.which(step.argv[0]) is None:
        return {**outcome, "status": "skipped", "reason": f"{step.argv[0]} is not on the PATH"}
    if step.needs is not None and not step.needs.exists():
        return {**outcome, "status": "skipped", "reason": f"{step.needs} is not here"}
    limit = min(step.limit_s, deadline - time.monotonic())
    if limit < MIN_STEP_S:
        return {**outcome, "status": "skipped", "reason": f"out of budget ({limit:.0f} s left)"}
    print(f"=== {step.name} (limit {limit:.0f} s)", flush=True)
    log_path = work / f"{step.name}.log"
    start = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join((str(ROOT), str(work / PEER_SITE))),
                 "PYTHONUNBUFFERED": "1", **step.env},
            start_new_session=True)
        copier = threading.Thread(target=_tee, args=(process.stdout, log, sys.stdout.buffer))
        copier.start()
        cut = False
        try:
            process.wait(timeout=limit - GRACE_S)
        except subprocess.TimeoutExpired:
            cut = True
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        copier.join()
    outcome.update(exit_code=process.returncode, seconds=round(time.monotonic() - start, 1))
    unsupported = _unsupported_line(step, log_path) if process.returncode else None
    if unsupported:
        outcome.update(status="skipped", reason=f"unsupported here: {unsupported}")
    elif cut:
        outcome.update(status="cut", reason=f"stopped at its {limit:.0f} s limit")
    else:
        outcome["status"] = "ok" if process.returncode == 0 else "failed"
    return outcome


def _unsupported_line(step: Step, log_path: Path) -> str | None:
    if step.unsupported is None:
        return None
    pattern = re.compile(step.unsupported, re.IGNORECASE)
    lines = log_path.read_text(errors="replace").splitlines()
    return next((line.strip() for line in lines if pattern.search(line)), None)


def _commit() -> str:
    if os.environ.get("GPU_CHECK_COMMIT"):
        return os.environ["GPU_CHECK_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown: no git here; set GPU_CHECK_COMMIT"
    return head + (" (dirty)" if dirty else "")


def _nvidia_smi(work: Path) -> None:
    query = "name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw"
    try:
        result = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"],
                                capture_output=True, text=True, timeout=15)
        text = result.stdout + result.stderr
    except (OSError, subprocess.SubprocessError) as exc:
        text = f"nvidia-smi: {exc}\n"
    (work / "nvidia-smi.csv").write_text(text)


def run(dest: Path) -> int:
    started = time.monotonic()
    deadline = started + BUDGET_S - 15  # the tarball's share
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp()) / f"gpu-check-{stamp}"
    work.mkdir()
    (work / "commit.txt").write_text(_commit() + "\n")
    _nvidia_smi(work)
    outcomes = []
    for step in steps(work):
        outcomes.append(run_step(step, work, deadline))
        (work / "steps.json").write_text(json.dumps(outcomes, indent=1) + "\n")
    summary = "".join(
        f"{o['step']:20} {o['status']:8} exit {o.get('exit_code', '-')!s:4} "
        f"{o.get('seconds', 0):6.1f} s  {o.get('reason', '')}\n" for o in outcomes)
    summary += f"total {time.monotonic() - started:.0f} s of {BUDGET_S} s\n"
    (work / "steps.txt").write_text(summary)
    dest.mkdir(parents=True, exist_ok=True)
    tarball = dest / f"gpu-check-{stamp}.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(work, arcname=work.name)
    shutil.copy(work / "steps.txt", dest / f"gpu-check-{stamp}-steps.txt")
    print(f"results: {tarball}\n{summary}", end="")
    return 0


# --------------------------------------------------------------------------- #
# The dry run.
# --------------------------------------------------------------------------- #


def _harness_arguments(argv: Sequence[str]) -> list[str] | None:
    """The ``dcnbench`` arguments of a step that runs ``python -m harness``."""
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "harness":
            return list(argv[i + 2:])
    return None


def check_harness_run(args: Sequence[str]) -> str | None:
    """Why ``dcnbench <args>`` would not run a single case, or None."""
    from harness import cli, runner, suites

    try:
        parsed = cli.build_parser().parse_args(args)
    except SystemExit:
        return f"dcnbench does not accept: {shlex.join(args)}"
    try:
        selected = runner.select(runner.RunOptions(
            suite=suites.load(parsed.suite), device="cpu", ops=parsed.op, impls=parsed.impl,
            dtypes=parsed.dtype))
    except (ValueError, LookupError, OSError) as exc:
        return str(exc)
    return None if selected else "selects no case"


def _check_pytest(argv: Sequence[str]) -> str | None:
    with tempfile.TemporaryDirectory() as scratch:
        argv = [a if not a.startswith("--junitxml=") else f"--junitxml={scratch}/junit.xml"
                for a in argv]
        result = subprocess.run([*argv, "--collect-only"], cwd=ROOT, capture_output=True,
                                text=True, timeout=120)
    if result.returncode != 0:
        return f"pytest --collect-only exited {result.returncode}:\n{result.stdout[-2000:]}"
    return None


def dry_run() -> int:
    plan = steps(Path(tempfile.gettempdir()) / "gpu-check-dry-run")
    problems, missing = [], []
    for step in plan:
        print(f"{step.name:20} {step.limit_s:4d} s  {shlex.join(step.argv)}")
    total = sum(step.limit_s for step in plan)
    print(f"steps: {total} s of limits; whole script within {BUDGET_S} s")
    if total > BUDGET_S - 15:
        problems.append(f"the steps' limits add up to {total} s, more than the budget allows")
    for program in dict.fromkeys(step.argv[0] for step in plan):
        if shutil.which(program) is None:
            missing.append(program)
    for step in plan:
        args = _harness_arguments(step.argv)
        if args is not None and (why := check_harness_run(args)):
            problems.append(f"{step.name}: {why}")
        if step.argv[:3] == (PY, "-m", "pytest") and (why := _check_pytest(step.argv)):
            problems.append(f"{step.name}: {why}")
    for program in missing:
        names = ", ".join(s.name for s in plan if s.argv[0] == program)
        print(f"not on this machine's PATH: {program} (steps {names} would be skipped)")
    for problem in problems:
        print(f"problem: {problem}")
    print("dry run:", "problems found" if problems else "every step can start")
    return 1 if problems else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu-check.sh", description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="print the steps and check that each can start; run nothing")
    options = parser.parse_args(argv)
    if options.dry_run:
        return dry_run()
    return run(Path(os.environ.get("OUT") or ROOT / "results" / "local"))


if __name__ == "__main__":
    sys.exit(main())
