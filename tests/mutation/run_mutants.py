"""Mutation testing of ``kernels/cuda``: do the tests catch every wrong kernel?

    python tests/mutation/run_mutants.py [--out DIR] [--per-operator N] [--jobs J]
                                         [--files NAME ...] [--fail-under PERCENT]
                                         [--survivors-of MUTANTS_JSON]

Every ``.cu`` / ``.cuh`` file of ``kernels/cuda`` gets the single-change mutants
of ``mutator.py``; each mutant is built and run against the tests of the
operators that compile that file, in a temporary copy of the working tree
(never the tree itself), and is *killed* when a test fails (or the run
crashes or times out), *survives* when they all pass, or is *invalid* when it
does not compile. Mutants listed in ``equivalent.toml`` (with the reason no
test can tell them apart) are not run. The score is killed / (killed +
survived); the report (``mutants.json`` and ``mutants.md``, a readable table
of the score, every survivor and the equivalent mutants) goes to ``--out``.
Exit status 0: score >= ``--fail-under``; 1: below it; 2: the unmutated tests
failed (nothing was measured).

Which tests run for a file (recorded in the report): ``kernels/cuda_sources.py``
names every compiled source; the ``kernels.ops`` modules that hold a source
(or use a module or function that does) are its operators, a ``.cuh`` belongs
to the sources that include it, and an operator's tests are
``tests/test_<operator>.py`` and ``tests/test_<operator>_*.py`` (the edge
tests) and its kernels' runs in ``tests/test_kernels_under_racecheck.py``, without ``slow``
and ``gpu`` tests, stopping at the first failure. So a survivor is a gap in the
operator's own tests.

Which mutants run: all of them is about 1,800 (~10 s each on two cores: five
hours); ``--per-operator N`` takes, per file, the first N mutants of each
operator in the order of a hash of their key -- deterministic, so two runs of
the same code run the same mutants, and a mutant of a changed line is
redrawn. The default, 3, is about 150 mutants: 40 minutes with ``--jobs 2`` on
two cores shared with other work (load ~6); ``--per-operator 0`` runs every
mutant.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import pkgutil
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mutator  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "kernels" / "cuda"
EQUIVALENT_FILE = Path(__file__).resolve().parent / "equivalent.toml"
# -x: a killed mutant costs its tests up to the first failure. The opcheck and
# torch.compile tests check the torch.library registration and tracing, which no
# kernel change alters, and are the slowest of the operators' tests (10 s of
# dcnv3's 25): they are left out.
PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu",
               "-k", "not opcheck and not torch_compile")


# --------------------------------------------------------------------------- #
# Which tests guard which kernel file.
# --------------------------------------------------------------------------- #


def _sources_held(value: object) -> set[str]:
    from kernels.cuda_sources import CudaSource

    if isinstance(value, CudaSource):
        return {value.filename}
    if isinstance(value, dict):
        return {v.filename for v in value.values() if isinstance(v, CudaSource)}
    return set()


def operator_sources() -> dict[str, set[str]]:
    """For every ``kernels.ops`` module, the sources it compiles: those it holds,
    and those of the ``kernels.ops`` modules it holds as a whole (dcnv4 runs
    dcnv3's kernels through ``family``). Imported helper functions do not
    count: deform_psroi_pool borrows argument checks from deform_roi_pool,
    not its kernels."""
    import kernels.ops

    modules = {
        info.name: importlib.import_module(f"kernels.ops.{info.name}")
        for info in pkgutil.iter_modules(kernels.ops.__path__)
    }
    held = {name: set().union(*map(_sources_held, vars(module).values()))
            for name, module in modules.items()}
    uses = {
        name: {value.__name__.removeprefix("kernels.ops.") for value in vars(module).values()
               if isinstance(value, types.ModuleType) and value.__name__.startswith("kernels.ops.")}
        for name, module in modules.items()
    }
    compiled = {name: set(sources) for name, sources in held.items()}
    changed = True
    while changed:  # the closure over whole-module uses
        changed = False
        for name in modules:
            for used in uses[name] & set(modules):
                if not compiled[used] <= compiled[name]:
                    compiled[name] |= compiled[used]
                    changed = True
    return compiled


def included_files(filename: str) -> set[str]:
    """``filename`` and every ``kernels/cuda`` header it includes, transitively."""
    seen, todo = set(), [filename]
    while todo:
        name = todo.pop()
        if name in seen or not (CUDA_DIR / name).is_file():
            continue
        seen.add(name)
        todo += re.findall(r'^\s*#include\s+"([^"]+)"', (CUDA_DIR / name).read_text(), re.M)
    return seen


def operator_tests(operators: set[str], tests_dir: Path = ROOT / "tests") -> list[str]:
    """The operators' own test files, relative to the root."""
    found = set()
    for operator in operators:
        found |= set(tests_dir.glob(f"test_{operator}.py"))
        found |= set(tests_dir.glob(f"test_{operator}_*.py"))
    return sorted(str(path.relative_to(tests_dir.parent)) for path in found)


def racecheck_tests(operators: set[str], tests_dir: Path = ROOT / "tests") -> list[str]:
    """The node ids of ``tests/test_kernels_under_racecheck.py``'s runs of the operators' kernels
    (its ids start with the kernels.ops module; skipped while the emulator has no
    racecheck mode)."""
    path = tests_dir / "test_kernels_under_racecheck.py"
    if not path.is_file():
        return []
    spec = importlib.util.spec_from_file_location("racecheck_ids", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [f"{path.relative_to(tests_dir.parent)}::test_backward_has_no_race[{run}]"
            for run in module.IDS if run.split("/", 1)[0] in operators]


def tests_by_file() -> dict[str, list[str]]:
    """For every file of ``kernels/cuda``, the tests of the operators that
    compile it: their test files and their racecheck runs."""
    from kernels import cuda_sources

    registered = cuda_sources.load_all()
    compiled_by = operator_sources()
    subsets = {}
    for path in sorted(CUDA_DIR.iterdir()):
        if path.suffix not in (".cu", ".cuh"):
            continue
        sources = {s for s in registered if path.name in included_files(s)}
        operators = {op for op, compiled in compiled_by.items() if compiled & sources}
        subsets[path.name] = operator_tests(operators) + racecheck_tests(operators)
    return subsets


# --------------------------------------------------------------------------- #
# Which mutants run.
# --------------------------------------------------------------------------- #


def equivalent_mutants(path: Path = EQUIVALENT_FILE) -> dict[tuple[str, str], str]:
    """(file, mutant key) -> the reason no test can kill it."""
    entries = tomllib.loads(path.read_text()).get("equivalent", [])
    return {(entry["file"], entry["mutant"]): entry["reason"] for entry in entries}


def _rank(mutant: mutator.Mutant) -> str:
    return hashlib.sha256(f"{mutant.operator}\0{mutant.key}".encode()).hexdigest()


def select(mutants: list[mutator.Mutant], per_operator: int) -> list[mutator.Mutant]:
    """The first ``per_operator`` mutants of each operator by the hash of their
    key (all of them for 0), in file order."""
    if per_operator == 0:
        return list(mutants)
    chosen = set()
    for operator in mutator.OPERATORS:
        of_operator = sorted((m for m in mutants if m.operator == operator), key=_rank)
        chosen |= {id(m) for m in of_operator[:per_operator]}
    return [m for m in mutants if id(m) in chosen]


# --------------------------------------------------------------------------- #
# Running them.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Result:
    file: str
    line: int
    operator: str
    key: str
    outcome: str  # killed, survived, invalid
    detail: str  # the first failing test, "timeout", "crash", or the compiler's complaint
    seconds: float


def copy_tree(destination: Path) -> None:
    """The working tree's files (tracked and untracked, not ignored) under ``destination``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_tests(tree: Path, tests: list[str], cache: Path, timeout: float
              ) -> tuple[int | None, str, float]:
    """(exit status or None on timeout, output, seconds) of pytest on ``tests`` in ``tree``."""
    env = {k: v for k, v in os.environ.items() if k != "DCNBENCH_EMULATOR_MODE"}
    env |= {"PYTHONPATH": str(tree), "DCNBENCH_CACHE_DIR": str(cache),
            "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", *PYTEST_ARGS, *tests], cwd=tree,
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(
            expired.stdout, bytes) else (expired.stdout or "")
        return None, output, time.monotonic() - started
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


def outcome_of(status: int | None, output: str) -> tuple[str, str]:
    if status == 0:
        return "survived", ""
    if "could not compile the kernel source" in output or "CompileError" in output:
        first = next((line.strip() for line in output.splitlines() if "error:" in line), "")
        return "invalid", first[:200]
    if status is None:
        return "killed", "timeout"
    failed = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return "killed", failed.group(1) if failed else f"crash (exit status {status})"


def run_mutant(mutant: mutator.Mutant, file: str, tests: list[str], trees: queue.Queue,
               cache: Path, timeout: float) -> Result:
    tree = trees.get()
    try:
        path = tree / "kernels" / "cuda" / file
        original = path.read_text()
        path.write_text(mutant.apply(original))
        try:
            status, output, seconds = run_tests(tree, tests, cache, timeout)
        finally:
            path.write_text(original)
    finally:
        trees.put(tree)
    outcome, detail = outcome_of(status, output)
    return Result(file, mutant.line, mutant.operator, mutant.key, outcome, detail,
                  round(seconds, 1))


def score_of(results: list[Result]) -> float:
    killed = sum(r.outcome == "killed" for r in results)
    counted = killed + sum(r.outcome == "survived" for r in results)
    return 100.0 * killed / counted if counted else 100.0


# --------------------------------------------------------------------------- #
# The report.
# --------------------------------------------------------------------------- #


def markdown(report: dict) -> str:
    results = [Result(**r) for r in report["mutants"]]
    lines = [
        "# Mutation testing of kernels/cuda", "",
        f"Score **{report['score']:.1f} %** ({report['killed']} killed of "
        f"{report['killed'] + report['survived']}; {report['invalid']} invalid, "
        f"{len(report['equivalent'])} equivalent not run); {report['duration_s'] / 60:.1f} min "
        f"with {report['jobs']} jobs, {report['per_operator'] or 'all'} mutants per operator "
        "and file.", "",
        "| file | tests | mutants | killed | survived | invalid | score |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for file, info in report["files"].items():
        mine = [r for r in results if r.file == file]
        killed = sum(r.outcome == "killed" for r in mine)
        survived = sum(r.outcome == "survived" for r in mine)
        invalid = sum(r.outcome == "invalid" for r in mine)
        files = dict.fromkeys(Path(t.split("::")[0]).name for t in info["tests"])
        lines.append(
            f"| {file} | {', '.join(files)} | {len(mine)} | "
            f"{killed} | {survived} | {invalid} | {score_of(mine):.1f} % |"
        )
    lines += ["", "## Survivors", ""]
    survivors = [r for r in results if r.outcome == "survived"]
    lines += [f"- `{r.file}:{r.line}` ({r.operator}): `{r.key}`" for r in survivors] or ["None."]
    lines += ["", "## Equivalent mutants (not run)", ""]
    lines += [f"- `{e['file']}`: `{e['mutant']}` -- {e['reason']}"
              for e in report["equivalent"]] or ["None."]
    if report["stale_equivalents"]:
        lines += ["", "## Listed as equivalent but no longer in the code", ""]
        lines += [f"- `{e['file']}`: `{e['mutant']}`" for e in report["stale_equivalents"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "local" / "mutants")
    parser.add_argument("--per-operator", type=int, default=3,
                        help="mutants per operator and file (0: all)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--files", nargs="*", help="only these kernels/cuda files")
    parser.add_argument("--fail-under", type=float, default=95.0)
    parser.add_argument("--survivors-of", type=Path, metavar="MUTANTS_JSON",
                        help="run only the survivors of an earlier report (after new tests)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    subsets = tests_by_file()
    if args.files:
        unknown = sorted(set(args.files) - set(subsets))
        if unknown:
            parser.error(f"--files: not in kernels/cuda: {', '.join(unknown)}")
        subsets = {f: t for f, t in subsets.items() if f in args.files}
    untested = [f for f, tests in subsets.items() if not tests]
    if untested:
        print(f"no tests compile {', '.join(untested)}", file=sys.stderr)
        return 2
    equivalents = equivalent_mutants()
    survivors = None
    if args.survivors_of:
        earlier = json.loads(args.survivors_of.read_text())["mutants"]
        survivors = {(r["file"], r["key"]) for r in earlier if r["outcome"] == "survived"}
    plan, listed = [], []
    for file in subsets:
        found = mutator.mutants((CUDA_DIR / file).read_text())
        keys = {m.key for m in found}
        listed += [{"file": f, "mutant": k, "reason": r, "present": k in keys}
                   for (f, k), r in equivalents.items() if f == file]
        runnable = [m for m in found if (file, m.key) not in equivalents]
        if survivors is None:
            plan += [(file, m) for m in select(runnable, args.per_operator)]
        else:
            plan += [(file, m) for m in runnable if (file, m.key) in survivors]
    if survivors is not None:
        subsets = {f: t for f, t in subsets.items() if any(f == file for file, _ in plan)}

    with tempfile.TemporaryDirectory(prefix="dcnbench-mutants-") as scratch:
        scratch = Path(scratch)
        cache = scratch / "cache"
        trees: queue.Queue[Path] = queue.Queue()
        for job in range(args.jobs):
            copy_tree(scratch / f"tree{job}")
            trees.put(scratch / f"tree{job}")
        baseline = {}
        for tests in subsets.values():
            key = tuple(tests)
            if key not in baseline:
                status, output, seconds = run_tests(scratch / "tree0", tests, cache, 1800)
                if status != 0:
                    print(f"the unmutated tests fail ({' '.join(tests)}):\n{output[-3000:]}",
                          file=sys.stderr)
                    return 2
                baseline[key] = seconds
                print(f"baseline of {len(tests)} test files and ids: {seconds:.0f} s", flush=True)
        results: list[Result] = []
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(run_mutant, m, file, subsets[file], trees, cache,
                            max(120.0, 4 * baseline[tuple(subsets[file])]))
                for file, m in plan
            ]
            for done, future in enumerate(concurrent.futures.as_completed(futures), start=1):
                result = future.result()
                results.append(result)
                print(f"[{done}/{len(plan)}] {result.outcome:8} {result.seconds:5.1f} s "
                      f"{result.file}:{result.line} {result.operator}: {result.key[:100]}",
                      flush=True)
    results.sort(key=lambda r: (r.file, r.line, r.operator, r.key))
    report = {
        "score": score_of(results),
        "killed": sum(r.outcome == "killed" for r in results),
        "survived": sum(r.outcome == "survived" for r in results),
        "invalid": sum(r.outcome == "invalid" for r in results),
        "duration_s": round(time.monotonic() - started),
        "jobs": args.jobs,
        "per_operator": args.per_operator,
        "files": {f: {"tests": t, "baseline_s": round(baseline[tuple(t)], 1)}
                  for f, t in subsets.items()},
        "mutants": [dataclasses.asdict(r) for r in results],
        "equivalent": [e for e in listed if e["present"]],
        "stale_equivalents": [e for e in listed if not e["present"]],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mutants.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "mutants.md").write_text(markdown(report))
    print(f"score {report['score']:.1f} % ({report['killed']} killed, {report['survived']} "
          f"survived, {report['invalid']} invalid) in {report['duration_s'] / 60:.1f} min; "
          f"report: {args.out / 'mutants.md'}")
    return 0 if report["score"] >= args.fail_under else 1


if __name__ == "__main__":
    sys.exit(main())
