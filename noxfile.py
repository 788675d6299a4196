"""nox sessions: `tests` (CPU, what CI runs), `lint`, `bench` (the default suite on this
machine's device) and `gpu` (GPU tests and suites, for GPU hosts)."""

import nox

nox.options.sessions = ["tests"]
nox.options.reuse_venv = "yes"

# The torch build CI and the developers' machines install (from local disk there);
# elsewhere pip fetches it. GPU hosts keep whatever torch they have (the `gpu` session).
TORCH = ("torch==2.14.1", "torchvision==0.29.1")


def install(session: nox.Session, extras: str) -> None:
    session.install(*TORCH)
    session.install("-e", f".[{extras}]")


def has_cuda(session: nox.Session) -> bool:
    probe = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    return session.run("python", "-c", probe, success_codes=[0, 1], silent=True) is True


@nox.session
def tests(session: nox.Session) -> None:
    """The CPU test suite: emulated kernels, harness, references, build check."""
    install(session, "test")
    session.run("dcnbench", "kernels")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Run the default suite on this machine's device: `smoke` on a CPU, `resnet50-dcn` on a GPU."""
    install(session, "test")
    if has_cuda(session):
        session.run("dcnbench", "run", "--suite", "resnet50-dcn", "--device", "cuda", *session.posargs)
    else:
        session.run("dcnbench", "run", "--suite", "smoke", "--device", "cpu", *session.posargs)


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """GPU tests and the GPU suites (scripts/gpu-check.sh) in the host's own environment."""
    session.run("bash", "scripts/gpu-check.sh", external=True)
