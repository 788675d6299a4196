"""g++, the CUDA headers of the pip wheels, and the on-disk build cache.

Nothing here depends on a system CUDA install: the headers come from the
``nvidia-cuda-runtime`` / ``-crt`` / ``-cccl`` wheels. Built libraries are
cached under ``$DCNBENCH_CACHE_DIR/emulator`` (default
``~/.cache/dcnbench/emulator``), keyed by a hash of everything that goes into
the compiler: the generated translation unit, the shim headers it includes,
the flags and the compiler's version. Concurrent builds of the same key (two
pytest-xdist workers) each write a temporary file and rename it into place.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from .errors import CompileError

SHIM_DIR = Path(__file__).parent / "shim"
RUNTIME_SOURCE = SHIM_DIR / "dcn_runtime.cpp"

BASE_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-w",
              # CUDA code type-puns through reinterpret_cast (vector loads).
              "-fno-strict-aliasing")
ASAN_FLAGS = ("-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-pthread", "-w",
              "-fno-strict-aliasing", "-fsanitize=address", "-fno-omit-frame-pointer")
# The traced build (counters and racecheck modes), by clang. No auto-vectorizing:
# it would merge the lanes' scalar accesses into wide CPU loads the GPU never
# issues; no unrolling beyond the source's `#pragma unroll`: a loop's accesses keep
# their call sites. Its own names (-D): this runtime and the plain one share one process.
TRACED_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-w",
                "-fno-strict-aliasing", "-fno-vectorize", "-fno-slp-vectorize",
                "-fno-unroll-loops", "-DDCN_TRACED",
                "-Ddcn=dcn_traced", "-Ddcn_current=dcn_traced_current")
# Only the kernel modules call the hooks; the runtime defines them.
TRACE_HOOKS = ("-fsanitize-coverage=inline-8bit-counters,trace-loads,trace-stores",)

_build_locks: dict[str, threading.Lock] = {}
_build_locks_guard = threading.Lock()


def compiler() -> str:
    """The C++ compiler: ``$DCNBENCH_EMULATOR_CXX`` or ``g++`` on the PATH."""
    name = os.environ.get("DCNBENCH_EMULATOR_CXX", "g++")
    path = shutil.which(name)
    if path is None:
        raise CompileError(f"the CPU emulator needs a C++17 compiler; {name!r} is not on the PATH")
    return path


def tracing_compiler() -> str:
    """The compiler of the traced build: ``$DCNBENCH_EMULATOR_CLANG`` or ``clang++-19``
    (clang's -fsanitize-coverage=trace-loads,trace-stores)."""
    name = os.environ.get("DCNBENCH_EMULATOR_CLANG", "clang++-19")
    path = shutil.which(name)
    if path is None:
        raise CompileError(
            f"the emulator's counters and racecheck modes need clang 19 or newer; {name!r} is not "
            "on the PATH (apt-get install clang-19, or set DCNBENCH_EMULATOR_CLANG)")
    return path


@functools.cache
def compiler_identity(cxx: str) -> str:
    """Version and target of ``cxx``: part of every cache key."""
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    target = subprocess.run([cxx, "-dumpmachine"], capture_output=True, text=True, check=True)
    return out.splitlines()[0] + " " + target.stdout.strip()


@functools.cache
def cuda_include_dirs() -> tuple[str, ...]:
    """Include directories of the CUDA header wheels (cu13 layout, then cu12's)."""
    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    for root in roots:
        include = root / "cu13" / "include"
        if (include / "cuda_fp16.h").is_file():
            return (str(include), str(include / "cccl"))
        legacy = [root / name / "include" for name in ("cuda_runtime", "cuda_nvcc", "cccl")]
        if (legacy[0] / "cuda_fp16.h").is_file():
            return tuple(str(p) for p in legacy if p.is_dir())
    raise CompileError(
        "the CPU emulator needs the CUDA headers of the pip wheels nvidia-cuda-runtime, "
        "nvidia-cuda-crt and nvidia-cuda-cccl; none were found (pip install them)"
    )


def cache_dir() -> Path:
    root = os.environ.get("DCNBENCH_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "dcnbench"
    path = base / "emulator"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def _shim_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(SHIM_DIR.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _lock_for(key: str) -> threading.Lock:
    with _build_locks_guard:
        return _build_locks.setdefault(key, threading.Lock())


def build_shared_library(source: str, *, stem: str, flags: tuple[str, ...],
                         extra_args: tuple[str, ...] = (), cxx: str | None = None) -> Path:
    """Compile ``source`` (C++ text) into a shared library; return its cached path.

    ``flags`` pick the build (plain, AddressSanitizer or traced); ``extra_args``
    are the user's ``-D``/``-I`` options; ``cxx`` the compiler (default
    :func:`compiler`). Raises CompileError with the compiler's message.
    """
    cxx = cxx or compiler()
    includes = ("-I", str(SHIM_DIR), *(a for d in cuda_include_dirs() for a in ("-isystem", d)))
    args = (*flags, *extra_args, *includes)
    key_text = "\0".join((source, *args, compiler_identity(cxx), _shim_digest()))
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    target = cache_dir() / f"{stem}-{key}.so"
    if target.exists():
        return target
    with _lock_for(key):
        if target.exists():
            return target
        with tempfile.TemporaryDirectory(prefix="dcnbench-emu-") as tmp:
            tu = Path(tmp) / f"{stem}.cpp"
            tu.write_text(source)
            built = Path(tmp) / "out.so"
            result = subprocess.run([cxx, *args, str(tu), "-o", str(built)],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise CompileError(_diagnostics(result.stderr, tu))
            # Same filesystem as the cache: copy next to it, then rename atomically.
            staging = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
            shutil.copyfile(built, staging)
            os.replace(staging, target)
    return target


def _diagnostics(stderr: str, tu: Path) -> str:
    """g++'s errors, without the temporary file's path and the note chatter."""
    lines = [line.replace(str(tu.parent) + os.sep, "") for line in stderr.splitlines()]
    errors = [i for i, line in enumerate(lines) if "error" in line]
    if not errors:
        return "g++ failed:\n" + "\n".join(lines[-30:])
    shown = lines[max(0, errors[0] - 3): errors[0] + 30]
    return "g++ could not compile the kernel source for the CPU emulator:\n" + "\n".join(shown)
