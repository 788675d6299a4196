"""nox sessions: `tests` (CPU, what CI runs), `lint`, `bench` (the default suite on this
machine's device, then the report), `report` (the site of every run under results/),
`mutants` (mutation testing of kernels/cuda, CPU), `nightly` (the GPU suites, compared
with the last stored run of the same device, then the mutants and the report) and `gpu`
(GPU tests and suites, for GPU hosts)."""

import json
from pathlib import Path

import nox
import nox.command

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"

# The torch build CI and the developers' machines install (from local disk there);
# elsewhere pip fetches it. GPU hosts keep whatever torch they have (the `gpu` session).
TORCH = ("torch==2.14.1", "torchvision==0.29.1")


# Peers that ship as sdists and build against the installed torch (CPU here):
# torch-ms-deform-attn's C++ extension, ~65 s of compile on 2 cores, cached by pip
# after the first build. --no-build-isolation: it must see our torch.
PEER_BUILD_TOOLS = ("setuptools>=77", "packaging>=24.2", "wheel")
PEERS_BUILT = ("torch-ms-deform-attn==0.1.1",)


def install(session: nox.Session, extras: str) -> None:
    session.install(*TORCH)
    session.install("-e", f".[{extras}]")


def install_peers(session: nox.Session) -> None:
    session.install(*PEER_BUILD_TOOLS)
    session.install("--no-build-isolation", *PEERS_BUILT)


def has_cuda(session: nox.Session) -> bool:
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return session.run("python", "-c", probe, success_codes=[0, 1], silent=True) is True


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite: emulated kernels, harness, references, build check, and the
    peers that build on the CPU (torch-ms-deform-attn)."""
    install(session, "test,report,ray")
    install_peers(session)
    session.run("dcnbench", "kernels")
    session.run("python", "-m", "pytest", "-q", *session.posargs)
    # The counters gate (docs/counters.md): no kernel's traffic grows unnoticed.
    session.run("dcnbench", "counters", "--suite", "counters", "--check",
                "results/counters/baseline.json")


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


RESULTS = Path("results")
SITE = Path("site")
MUTANTS_REPORT = RESULTS / "local" / "mutants"


@nox.session
def mutants(session: nox.Session) -> None:
    """Mutation testing of kernels/cuda (tests/mutation/run_mutants.py): every mutant of
    a sample, in a temporary copy of the tree, against its operators' tests; the report
    (score, survivors, equivalent mutants) goes to results/local/mutants/; fails when the
    score is below 95 %. Arguments after -- go to the tool (--per-operator 0: every mutant)."""
    install(session, "test")
    session.run("python", "tests/mutation/run_mutants.py", "--out", str(MUTANTS_REPORT),
                "--fail-under", "95", *session.posargs)


def new_run_dir(suite: str) -> Path:
    """Where this session's run goes: results/local/<UTC time>-<suite> (the runner's default
    adds the host; here the session must know the path to report and compare it)."""
    import datetime

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return RESULTS / "local" / f"{stamp}-{suite}"


def passes(session: nox.Session, *args: str) -> bool:
    """Run a dcnbench command whose exit status 1 means "ran, found a problem" (a failing
    row, a slowdown): False then, so the session carries on to the report; any other
    failure stops the session."""
    try:
        session.run(*args)
    except nox.command.CommandFailed as exc:
        if exc.return_code != 1:
            raise
        return False
    return True


def build_report(session: nox.Session) -> None:
    session.run("dcnbench", "report", str(RESULTS), "-o", str(SITE))
    session.log(f"report: open {(SITE / 'index.html').resolve().as_uri()}")


@nox.session
def bench(session: nox.Session) -> None:
    """Run the default suite on this machine's device (`smoke` on a CPU, `resnet50-dcn` on a
    GPU), then build the report and print where to open it."""
    install(session, "test,report")
    install_peers(session)
    device, suite = ("cuda", "resnet50-dcn") if has_cuda(session) else ("cpu", "smoke")
    # A failing row must not stop the report that shows it: the exit status comes last.
    passed = passes(session, "dcnbench", "run", "--suite", suite, "--device", device,
                    "--out", str(new_run_dir(suite)), *session.posargs)
    build_report(session)
    if not passed:
        session.error("some rows failed: see the report's run page")


@nox.session
def report(session: nox.Session) -> None:
    """Build the static site of every run under results/ into site/."""
    install(session, "report")
    build_report(session)


def last_run_of(device: str, suite: str, before: Path) -> Path | None:
    """The newest stored run of ``suite`` on the GPU (or CPU) named ``device``, other than
    ``before``."""
    runs = []
    for metadata_path in RESULTS.glob("**/metadata.json"):
        metadata = json.loads(metadata_path.read_text())
        name = metadata.get("gpu") or metadata.get("cpu")
        if (metadata_path.parent != before and name == device
                and metadata["suite"]["name"] == suite):
            runs.append((metadata.get("time", ""), metadata_path.parent))
    return max(runs)[1] if runs else None


NIGHTLY_SUITES = ("smoke", "resnet50-dcn", "dtypes")
NIGHTLY_FAIL_ABOVE = "5"  # percent slower, beyond the noise, that fails the night


@nox.session
def nightly(session: nox.Session) -> None:
    """The GPU suites in workers (one per GPU: a crashing case is an error row), each
    compared with the last stored run of the same GPU and suite (failing on a slowdown
    beyond 5 % with confidence), the mutation testing of the kernels (failing below a
    95 % score), then the report."""
    install(session, "test,report")
    if not has_cuda(session):
        session.error("nightly: needs a CUDA GPU")
    probe = "import torch; print(torch.cuda.get_device_name())"
    gpu = session.run("python", "-c", probe, silent=True).strip()
    failed = []
    for suite in NIGHTLY_SUITES:
        run_dir = new_run_dir(suite)
        # Every GPU, one worker each: a crashing or hanging case is an error row, not the
        # end of the night.
        if not passes(session, "dcnbench", "run", "--suite", suite, "--device", "cuda",
                      "--devices", "all", "--out", str(run_dir)):
            failed.append(f"{suite}: failing rows")
        previous = last_run_of(gpu, suite, run_dir)
        if previous is None:
            session.log(f"{suite}: no earlier run on {gpu} to compare with")
        elif not passes(session, "dcnbench", "compare", str(previous), str(run_dir),
                        "--fail-above", NIGHTLY_FAIL_ABOVE):
            failed.append(f"{suite}: slower than {previous.name}")
    if not passes(session, "python", "tests/mutation/run_mutants.py", "--out",
                  str(MUTANTS_REPORT), "--fail-under", "95"):
        failed.append(f"mutation score below 95 % (see {MUTANTS_REPORT / 'mutants.md'})")
    build_report(session)
    if failed:
        session.error("; ".join(failed))


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU tests and the GPU suites (scripts/gpu-check.sh) in the host's own environment."""
    session.run("bash", "scripts/gpu-check.sh", external=True)
