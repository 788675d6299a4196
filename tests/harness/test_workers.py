"""Cases in worker processes and on Ray: a planted fault (a segfaulting or deadlocked
emulated kernel, a sleep past the timeout, os._exit, a runaway allocation) becomes an
error row saying what happened and the run goes on; shards and merge; the run
directory's lock; Ctrl-C and kill -9 of the parent keep every finished row."""

from __future__ import annotations

import html
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness import plugins, registry, results, runner, suites

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT)])}
OP = "fault_scale"  # the operator of the fault_toy plugin (imported by the runs alone)
FAULTS = {  # fault_toy's planted faults -> what their error rows' reasons start with
    "segfault": "the worker died of SIGSEGV",
    "deadlock": "timed out after",
    "sleeps": "timed out after",
    "exits": "the worker exited with status 1",
    "hog": "the worker exceeded the memory limit",
}
RAY_DIED = "the Ray worker failed while running this row (WorkerCrashedError"
# A worker with torch imported holds about 0.7 GiB: the hog passes this limit quickly.
MEMORY_LIMIT_GB = "1.2"
CASE_TIMEOUT_S = 10  # above a row's time with its kernel's first (uncached) build


def fault_suite(tmp_path: Path, faults=tuple(FAULTS)) -> Path:
    """Case C2: the reference, each fault, then a right implementation (the case goes on
    past its faults); case C3: only right ones."""
    impls = json.dumps(["reference", *faults, "good"])
    path = tmp_path / "faults.toml"
    path.write_text(textwrap.dedent(f"""
        description = "planted faults"
        plugins = ["fault_toy"]
        case_timeout = {CASE_TIMEOUT_S}
        [[sweep]]
        op = "{OP}"
        impls = {impls}
        dtypes = ["float32"]
        [sweep.params]
        C = 2
        [[sweep]]
        op = "{OP}"
        impls = ["reference", "good"]
        dtypes = ["float32"]
        [sweep.params]
        C = 3
    """))
    return path


def dcnbench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def statuses(run_dir: Path) -> dict[tuple[str, str, str], str]:
    return {results.row_key(r): r["status"] for r in results.read_rows(run_dir)}


def check_fault_rows(run_dir: Path, faults, reasons=FAULTS) -> None:
    rows = results.read_rows(run_dir)
    assert len(rows) == len(faults) + 4
    assert len({results.row_key(r) for r in rows}) == len(rows)
    for row in rows:
        if row["impl"] in faults:
            assert row["status"] == "error", row
            assert row["reason"].startswith(reasons[row["impl"]]), row["reason"]
            assert row["reproduce"].startswith(f"dcnbench case {OP} ")
            assert f"--impl {row['impl']}" in row["reproduce"]
        else:
            assert row["status"] == "ok", row


@pytest.mark.slow
def test_every_fault_is_an_error_row_and_the_run_goes_on(tmp_path):
    out = tmp_path / "run"
    done = dcnbench("run", "--suite", str(fault_suite(tmp_path)), "--device", "cpu",
                    "--workers", "2", "--memory-limit-gb", MEMORY_LIMIT_GB, "--no-timing",
                    "--out", str(out))
    assert done.returncode == 1, done.stdout + done.stderr  # some rows errored
    check_fault_rows(out, tuple(FAULTS))
    assert f"timed out after {CASE_TIMEOUT_S} s" in done.stdout
    assert results.read_metadata(out)["execution"]["case_timeout_s"] == CASE_TIMEOUT_S

    # The report's run page shows each fault with the command that reproduces it.
    site = tmp_path / "site"
    assert dcnbench("report", str(out), "-o", str(site)).returncode == 0
    page = (site / "runs" / f"{out.name}.html").read_text()
    failures = page.split("<h2>Failures</h2>")[1].split("<h2>")[0]
    for row in results.read_rows(out):
        if row["status"] == "error":
            assert html.escape(row["reason"]) in failures
            assert html.escape(row["reproduce"]) in failures
    assert f"local, 2 workers, case timeout {CASE_TIMEOUT_S} s, memory limit" in page


@pytest.fixture
def fault_registry(monkeypatch):
    """fault_toy registered for this test alone (copies of the registries)."""
    registry.load_all()
    for name in ("OPERATORS", "IMPLEMENTATIONS", "LOADED"):
        owner = plugins if name == "LOADED" else registry
        monkeypatch.setattr(owner, name, dict(getattr(owner, name)))
    monkeypatch.delitem(sys.modules, "fault_toy", raising=False)
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])  # for the workers Ray starts


def run_in_process(suite_path: Path, out: Path, **options) -> int:
    from rich.console import Console

    console = Console(file=open(os.devnull, "w"), width=200)  # noqa: SIM115
    return runner.run_suite(runner.RunOptions(
        suite=suites.load(str(suite_path)), device="cpu", out=out, timing=None, **options),
        console)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance (2 CPUs) for the module's Ray tests: its start-up once."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", ENV["PYTHONPATH"])  # the Ray workers inherit it
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_tasks_killed_mid_case_are_error_rows(fault_registry, local_ray, tmp_path):
    faults = ("segfault", "sleeps", "exits")
    out = tmp_path / "run"
    assert run_in_process(fault_suite(tmp_path, faults), out, executor="ray") == 1
    check_fault_rows(out, faults, {**FAULTS, "segfault": RAY_DIED, "exits": RAY_DIED})
    assert local_ray.is_initialized()  # a cluster it did not start stays up


def test_ray_and_workers_give_the_rows_of_a_plain_run(fault_registry, local_ray, tmp_path):
    suite = fault_suite(tmp_path, faults=())
    assert run_in_process(suite, tmp_path / "plain") == 0
    assert run_in_process(suite, tmp_path / "ray", executor="ray") == 0
    assert run_in_process(suite, tmp_path / "workers", workers=2) == 0
    plain = statuses(tmp_path / "plain")
    assert len(plain) == 4
    assert statuses(tmp_path / "ray") == plain
    assert statuses(tmp_path / "workers") == plain


def test_without_ray_the_executor_says_how_to_install_it(toy, toy_suite, tmp_path, capsys,
                                                         monkeypatch):
    from harness import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray: ImportError
    out = tmp_path / "run"
    assert cli.main(["run", "--suite", toy_suite, "--device", "cpu", "--executor", "ray",
                     "--out", str(out)]) == cli.EXIT_USAGE
    assert "pip install 'dcnbench[ray]'" in capsys.readouterr().out.replace("\n", "")
    assert not out.exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--workers", "-1"], "--workers: expected 0 (in this process) or more, got -1"),
    (["--case-timeout", "0", "--workers", "1"], "--case-timeout: expected a positive number"),
    (["--memory-limit-gb", "2"], "--memory-limit-gb: limits a local worker; expected --workers"),
    (["--address", "auto"], "--address: names a Ray cluster; expected --executor ray"),
    (["--devices", "cuda:0"], "--devices: names GPUs; expected --device cuda, got cpu"),
    (["--shard", "3/2"], "--shard: expected K/N with 1 <= K <= N, got '3/2'"),
    (["--shard", "1"], "--shard: expected K/N with 1 <= K <= N, got '1'"),
])
def test_bad_execution_options_are_usage_errors(toy, toy_suite, tmp_path, capsys, argv, message):
    from harness import cli

    assert cli.main(["run", "--suite", toy_suite, "--device", "cpu", "--out",
                     str(tmp_path / "run"), *argv]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().out.replace("\n", "")


def test_shards_partition_the_cases_and_merge_joins_them(tmp_path):
    suite = "smoke"
    selected = runner.select(runner.RunOptions(suite=suites.load(suite)))
    shares = [runner.shard_of(selected, k, 3) for k in (1, 2, 3)]
    ids = [[sc.case.id for sc, _ in share] for share in shares]
    assert sorted(sum(ids, [])) == sorted(sc.case.id for sc, _ in selected)
    costs = [sum(runner.case_cost(sc, impls) for sc, impls in share) for share in shares]
    assert max(costs) < 1.2 * min(costs), costs  # balanced by the estimate
    assert [[sc.case.id for sc, _ in runner.shard_of(selected, k, 3)] for k in (1, 2, 3)] == ids
    with pytest.raises(ValueError, match=r"--shard: expected K/N with 1 <= K <= N, got 4/3"):
        runner.shard_of(selected, 4, 3)


def test_shards_balance_the_cost_not_the_count(toy, write_suite):
    """Two costly cases among cheap ones, the costly ones where a split blind to the cost
    (every other case) would put both in one shard: each shard gets one."""
    suite = write_suite("""
        description = "two costly cases"
        [[sweep]]
        op = "toy_scale"
        impls = ["good"]
        [sweep.params]
        H = 100
        W = 100
        [sweep.axes]
        C = [1000, 1, 999, 2, 3, 4]
    """)
    selected = runner.select(runner.RunOptions(suite=suites.load(suite)))
    costly = [[sc.case.params["C"] for sc, _ in runner.shard_of(selected, k, 2)
               if sc.case.params["C"] >= 999] for k in (1, 2)]
    assert sorted(map(len, costly)) == [1, 1], costly


def test_shard_runs_merge_into_the_rows_of_a_plain_run(toy, toy_suite, tmp_path, capsys):
    from harness import cli

    base = ["run", "--suite", toy_suite, "--device", "cpu", "--no-timing", "--impl", "good",
            "baseline"]
    assert cli.main([*base, "--out", str(tmp_path / "plain")]) == 0
    for k in (1, 2):
        assert cli.main([*base, "--shard", f"{k}/2", "--out", str(tmp_path / f"s{k}")]) == 0
    one, two = statuses(tmp_path / "s1"), statuses(tmp_path / "s2")
    assert one and two and not set(one) & set(two)
    assert cli.main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"),
                     "-o", str(tmp_path / "merged")]) == 0
    assert statuses(tmp_path / "merged") == statuses(tmp_path / "plain")
    merged = results.read_metadata(tmp_path / "merged")
    assert [m["shard"] for m in merged["merged_from"]] == [1, 2] and "shard" not in merged

    capsys.readouterr()
    assert cli.main(["merge", str(tmp_path / "s1"), "-o", str(tmp_path / "m1")]) == 2
    assert "expected two or more run directories, got 1" in capsys.readouterr().out
    assert cli.main(["merge", str(tmp_path / "s1"), str(tmp_path / "s1"),
                     "-o", str(tmp_path / "m2")]) == 2
    assert "rows are in more than one run" in capsys.readouterr().out.replace("\n", "")

    rows = (tmp_path / "s2" / results.RESULTS).read_text().splitlines(keepends=True)
    (tmp_path / "s2" / results.RESULTS).write_text("".join(rows[:-1]))  # s2 lost a case
    lost = json.loads(rows[-1])["case_id"]
    assert cli.main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"),
                     "-o", str(tmp_path / "m3")]) == 1
    assert f"{lost} (shard 2/2" in capsys.readouterr().out.replace("\n", "")


def test_a_live_run_locks_its_directory_and_a_dead_ones_lock_is_taken_over(tmp_path):
    run_dir = results.RunDir(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from harness import results; "
         "lock = results.RunDir(sys.argv[1]).lock(); lock.__enter__(); print('held', "
         "flush=True); time.sleep(600)", str(run_dir.path)],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        refused = rf"another run is writing into it \(pid {holder.pid} on host "
        with pytest.raises(results.RunDirLocked, match=refused), run_dir.lock():
            pass
    finally:
        holder.kill()  # kill -9: no clean-up ran
        holder.wait()
    with run_dir.lock():
        assert f"pid {os.getpid()} " in (run_dir.path / results.LOCK).read_text()


def _started_rows(out: Path, count: int, process: subprocess.Popen) -> None:
    """Wait until ``out`` holds ``count`` rows (the run is under way)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        path = out / results.RESULTS
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.2)
    pytest.fail(f"the run wrote fewer than {count} rows ({process.poll()=})")


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["ctrl-c", "kill -9"])
def test_stopping_the_parent_mid_launch_keeps_every_finished_row(tmp_path, stop):
    """The deadlocked kernel runs in a worker when the parent is stopped: Ctrl-C ends
    the run at once with 130, kill -9 leaves no worker behind; every finished row is
    kept either way, and --resume finishes the run (after the Ctrl-C)."""
    out = tmp_path / "run"
    suite = fault_suite(tmp_path, faults=("deadlock",))
    args = ["run", "--suite", str(suite), "--device", "cpu", "--workers", "1", "--no-timing",
            "--case-timeout", "600", "--out", str(out)]
    tag = {"DCNBENCH_TEST_RUN": str(out)}  # the workers inherit it: how to find them
    parent = subprocess.Popen([sys.executable, "-m", "harness", *args], cwd=ROOT,
                              env={**ENV, **tag},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        _started_rows(out, 1, parent)  # the reference's row: the deadlock runs now
        time.sleep(1)
        stopped = time.monotonic()
        if stop == "ctrl-c":  # as a terminal sends it: to the whole process group
            os.killpg(parent.pid, signal.SIGINT)
            assert parent.wait(timeout=30) == runner.EXIT_INTERRUPTED
            assert time.monotonic() - stopped < 10
        else:
            parent.kill()
            parent.wait()
    finally:  # a failed check leaves no deadlocked process spinning
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()
    deadline = time.monotonic() + 30  # the worker dies with its parent
    while time.monotonic() < deadline and _processes_with(tag):
        time.sleep(0.2)
    assert not _processes_with(tag)
    kept = statuses(out)
    assert kept == {(f"{OP}/N2_C2/float32/random", "reference", "forward"): "ok"}
    if stop == "kill -9":
        return  # resuming is the same either way: once is enough for CI's time
    done = dcnbench("run", "--suite", str(suite), "--device", "cpu", "--workers", "1",
                    "--no-timing", "--case-timeout", str(CASE_TIMEOUT_S), "--resume",
                    "--out", str(out))
    assert done.returncode == 1, done.stdout
    check_fault_rows(out, ("deadlock",))


def _processes_with(env: dict[str, str]) -> list[int]:
    """The running processes whose environment holds ``env``."""
    marks = [f"{k}={v}".encode() for k, v in env.items()]
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().split(") ")[1][0]
        except OSError:
            continue
        if state != "Z" and all(mark in environ for mark in marks):
            found.append(int(proc.name))
    return found
