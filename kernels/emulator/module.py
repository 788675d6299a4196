"""``RawModule`` and ``RawKernel``: CuPy's API over g++-built CPU modules.

A module is built lazily, on the first ``get_function``, like CuPy's. One
build is a shared library holding the transformed source and one entry per
kernel (plain ``__global__`` functions and each name expression); the
runtime library (scheduler, fibers, worker threads) is built once per flavor
and loaded with RTLD_GLOBAL before any module.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import memcheck, modes, traced
from .arguments import Param, ParamDesc, check_and_pack, pack
from .device import PROPERTIES
from .errors import (
    CompileError,
    EmulatorError,
    KernelDeadlockError,
    KernelTrapError,
    LaunchConfigError,
    UnsupportedFeatureError,
    WarpMatrixError,
)
from .source import MAIN_FILE, TransformedSource, transform
from .toolchain import (
    ASAN_FLAGS,
    BASE_FLAGS,
    RUNTIME_SOURCE,
    TRACE_HOOKS,
    TRACED_FLAGS,
    build_shared_library,
    compiler,
    tracing_compiler,
)

FLAVOR_FLAGS = {"plain": BASE_FLAGS, "asan": ASAN_FLAGS, "traced": TRACED_FLAGS}
# The traced runtime holds the analyses of the counters and racecheck modes.
_RUNTIME_TEXT = {"traced": '#include "dcn_runtime.cpp"\n#include "dcn_trace.cpp"\n'}
_MESSAGE_SIZE = 4096
_STATUS_ERRORS = {1: KernelDeadlockError, 2: KernelTrapError, 3: LaunchConfigError,
                  4: WarpMatrixError}


class _KernelDesc(ctypes.Structure):
    """Mirror of ``dcn::KernelDesc`` in shim/dcn_entry.h."""

    _fields_ = [("name", ctypes.c_char_p), ("run_thread", ctypes.c_void_p),
                ("num_params", ctypes.c_int), ("params", ctypes.POINTER(ParamDesc))]


@functools.cache
def runtime(flavor: str) -> ctypes.CDLL:
    """The runtime library of ``flavor``, loaded globally so modules link to it."""
    text = _RUNTIME_TEXT.get(flavor) or RUNTIME_SOURCE.read_text()
    path = build_shared_library(text, stem=f"runtime-{flavor}", flags=FLAVOR_FLAGS[flavor],
                                cxx=flavor_compiler(flavor))
    library = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    library.dcn_launch.restype = ctypes.c_int
    library.dcn_launch.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint),
        ctypes.POINTER(ctypes.c_uint), ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
        ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    if flavor == "traced":
        library.dcn_trace_begin.restype = None
        library.dcn_trace_end.restype = None
    return library


def flavor_compiler(flavor: str) -> str:
    return tracing_compiler() if flavor == "traced" else compiler()


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    """One launchable kernel of a built module."""

    name: str
    run_thread: int  # address of the entry's per-thread function
    params: tuple[Param, ...]
    uses_fibers: bool
    flavor: str


@dataclasses.dataclass(frozen=True)
class _Options:
    cxx_args: tuple[str, ...]  # -std / -D / -U / -I for g++
    include_dirs: tuple[str, ...]


# NVRTC spellings of the options that carry over to g++.
_CARRIED_OPTIONS = {"-D": "-D", "--define-macro": "-D", "-U": "-U", "--undefine-macro": "-U",
                    "-I": "-I", "--include-path": "-I"}


def parse_options(options: Sequence[str]) -> _Options:
    """CuPy/NVRTC options -> g++ arguments. -D, -U, -I and -std (C++17 at
    least: the shim needs it) carry over, in NVRTC's spellings (``-DX``,
    ``-D X``, ``--define-macro=X``); NVRTC-only options (-arch,
    --use_fast_math, -lineinfo, ...) have no CPU meaning and are dropped."""
    cxx_args, include_dirs, std = [], [], "c++17"
    items = iter(options)
    for option in items:
        if option.lstrip("-").startswith("std=c++"):
            standard = option.lstrip("-").removeprefix("std=")
            std = standard if standard not in ("c++03", "c++11", "c++14") else std
            continue
        flag, value = _carried_option(option, items)
        if flag:
            cxx_args.append(flag + value)
            if flag == "-I":
                include_dirs.append(value)
    return _Options((f"-std={std}", *cxx_args), tuple(include_dirs))


def _carried_option(option: str, rest) -> tuple[str | None, str]:
    if option in _CARRIED_OPTIONS:
        return _CARRIED_OPTIONS[option], next(rest, "")
    for spelling, flag in _CARRIED_OPTIONS.items():
        if spelling.startswith("--") and option.startswith(spelling + "="):
            return flag, option[len(spelling) + 1:]
        if not spelling.startswith("--") and option.startswith(spelling):
            return flag, option[len(spelling):]
    return None, ""


class _ModuleBuild:
    """A RawModule's source, transformed once, built once per flavor."""

    def __init__(self, code: str, options: Sequence[str], name_expressions: Sequence[str]):
        self.code = code
        self.options = parse_options(options)
        self.name_expressions = tuple(name_expressions)
        self._lock = threading.Lock()
        self._transformed: TransformedSource | None = None
        self._entries: dict[str, dict[str, KernelEntry]] = {}
        self._libraries: dict[str, ctypes.CDLL] = {}  # keep each build loaded

    @property
    def transformed(self) -> TransformedSource:
        if self._transformed is None:
            self._transformed = transform(self.code, self.options.include_dirs)
        return self._transformed

    def entries(self, flavor: str) -> dict[str, KernelEntry]:
        with self._lock:
            if flavor not in self._entries:
                self._libraries[flavor], self._entries[flavor] = self._build(flavor)
            return self._entries[flavor]

    def _build(self, flavor: str) -> tuple[ctypes.CDLL, dict[str, KernelEntry]]:
        source = self.transformed
        names = self._entry_names(source)
        runtime(flavor)  # modules resolve dcn_current & co against it at load
        hooks = TRACE_HOOKS if flavor == "traced" else ()
        path = build_shared_library(
            _translation_unit(source, names), stem="module-" + flavor,
            flags=FLAVOR_FLAGS[flavor] + hooks, extra_args=self.options.cxx_args,
            cxx=flavor_compiler(flavor))
        library = ctypes.CDLL(str(path))
        library.dcn_kernels.restype = ctypes.POINTER(_KernelDesc)
        table = library.dcn_kernels()
        fibers = source.uses_collectives or os.environ.get("DCNBENCH_EMULATOR_FIBERS") == "1"
        entries = {}
        for i, name in enumerate(names):
            desc = table[i]
            signature = source.kernels[_base_name(name)]
            params = tuple(
                Param.from_desc(k, desc.params[k], *_param_label(signature, k))
                for k in range(desc.num_params))
            entries[name] = KernelEntry(name, desc.run_thread, params, fibers, flavor)
        return library, entries

    def _entry_names(self, source: TransformedSource) -> list[str]:
        plain = [k.name for k in source.kernels.values() if not k.is_template]
        for expression in self.name_expressions:
            if _base_name(expression) not in source.kernels:
                raise CompileError(
                    f"name expression {expression!r} names no __global__ function of the source "
                    f"(kernels: {', '.join(sorted(source.kernels)) or 'none'})")
        return plain + [e for e in self.name_expressions if e not in plain]


def _base_name(expression: str) -> str:
    """``"ns::kernel<float, 4>"`` -> ``"kernel"``."""
    return expression.split("<", 1)[0].strip().rsplit("::", 1)[-1].strip()


def _param_label(signature, index: int) -> tuple[str, str]:
    if index < len(signature.param_names):
        return signature.param_names[index], signature.param_texts[index]
    return f"arg{index}", ""


def _translation_unit(source: TransformedSource, names: list[str]) -> str:
    def address(name: str) -> str:
        kernel = source.kernels.get(name)
        return "&" + (kernel.qualified if kernel and not kernel.is_template else name)

    rows = "".join(f"  ::dcn::describe_kernel<{address(n)}>({_cxx_string(n)}),\n" for n in names)
    return (
        '#include "dcn_emulator.h"\n'
        f'#line 1 "{MAIN_FILE}"\n'
        f"{source.text}\n"
        '#line 1 "dcnbench-emulator-entries"\n'
        '#include "dcn_entry.h"\n'
        "static const ::dcn::KernelDesc dcn_kernel_table[] = {\n"
        f"{rows}"
        "  {nullptr, nullptr, 0, nullptr}};\n"
        'extern "C" const ::dcn::KernelDesc* dcn_kernels() { return dcn_kernel_table; }\n'
    )


def _cxx_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RawModule:
    """CuPy's ``cupy.RawModule`` for the CPU: ``get_function(name)`` returns
    a RawKernel for a plain ``__global__`` function or a name expression."""

    def __init__(self, code: str | None = None, path: str | os.PathLike | None = None,
                 options: Sequence[str] = (), backend: str = "nvrtc",
                 translate_cucomplex: bool = False, *, enable_cooperative_groups: bool = False,
                 name_expressions: Sequence[str] | None = None, jitify: bool = False):
        if (code is None) == (path is None):
            raise TypeError("RawModule takes exactly one of code= and path=")
        if enable_cooperative_groups:
            raise UnsupportedFeatureError(
                "cooperative launches (grid-wide sync) are not supported by the CPU emulator")
        self.code = code if code is not None else Path(path).read_text()
        self.options = tuple(options)
        self.backend = backend
        self.name_expressions = tuple(name_expressions or ())
        self._build = _ModuleBuild(self.code, self.options, self.name_expressions)

    def compile(self, log_stream: Any = None) -> None:
        """Builds the module now instead of at the first get_function."""
        self._build.entries("plain")

    def get_function(self, name: str) -> RawKernel:
        entries = self._build.entries("plain")
        if name not in entries:
            known = sorted(entries)
            raise KeyError(f"no kernel {name!r} in the module; launchable names: {known} (template "
                           "kernels need their instantiation in name_expressions)")
        return RawKernel._bound(self, name)


class RawKernel:
    """CuPy's ``cupy.RawKernel`` for the CPU.

    Called as ``kernel(grid, block, args, shared_mem=0, stream=None)``,
    exactly as CuPy takes it, with NumPy arrays or CPU torch tensors where
    CuPy takes device arrays and NumPy scalars for value parameters.
    """

    def __init__(self, code: str, name: str, options: Sequence[str] = (),
                 backend: str = "nvrtc", *, translate_cucomplex: bool = False,
                 enable_cooperative_groups: bool = False, jitify: bool = False):
        self._attach(RawModule(code=code, options=options, backend=backend,
                               enable_cooperative_groups=enable_cooperative_groups), name)

    @classmethod
    def _bound(cls, module: RawModule, name: str) -> RawKernel:
        """A kernel of an existing module (what ``get_function`` returns)."""
        kernel = cls.__new__(cls)
        kernel._attach(module, name)
        return kernel

    def _attach(self, module: RawModule, name: str) -> None:
        self._module = module
        self.name = name
        self.max_dynamic_shared_size_bytes = PROPERTIES.sharedMemPerBlock
        self.preferred_shared_memory_carveout = -1

    @property
    def code(self) -> str:
        return self._module.code

    @property
    def options(self) -> tuple[str, ...]:
        return self._module.options

    def compile(self) -> None:
        self._entry("plain")

    @property
    def params(self) -> tuple[Param, ...]:
        """The parameters with their concrete types (emulator extension)."""
        return self._entry("plain").params

    # CuPy's function attributes; the CPU has no registers or local memory.
    @property
    def max_threads_per_block(self) -> int:
        return PROPERTIES.maxThreadsPerBlock

    @property
    def attributes(self) -> dict[str, int]:
        return {
            "max_threads_per_block": PROPERTIES.maxThreadsPerBlock,
            "shared_size_bytes": 0, "const_size_bytes": 0, "local_size_bytes": 0,
            "num_regs": 0, "ptx_version": 90, "binary_version": 90, "cache_mode_ca": 0,
            "max_dynamic_shared_size_bytes": self.max_dynamic_shared_size_bytes,
            "preferred_shared_memory_carveout": self.preferred_shared_memory_carveout,
        }

    def _entry(self, flavor: str) -> KernelEntry:
        entries = self._module._build.entries(flavor)
        if self.name not in entries:
            raise KeyError(f"no kernel {self.name!r} in the module")
        return entries[self.name]

    def __call__(self, grid: tuple, block: tuple, args: Sequence[Any], *, shared_mem: int = 0,
                 stream: Any = None, enable_cooperative_groups: bool = False) -> None:
        if enable_cooperative_groups:
            raise UnsupportedFeatureError(
                "cooperative launches (grid-wide sync) are not supported by the CPU emulator")
        grid3 = _dims(grid, "grid", PROPERTIES.maxGridSize)
        block3 = _dims(block, "block", PROPERTIES.maxThreadsDim)
        threads = block3[0] * block3[1] * block3[2]
        if threads > PROPERTIES.maxThreadsPerBlock:
            raise LaunchConfigError(f"kernel '{self.name}': block {block} has {threads} threads, "
                                    f"more than {PROPERTIES.maxThreadsPerBlock}")
        if int(shared_mem) < 0 or int(shared_mem) > self.max_dynamic_shared_size_bytes:
            raise LaunchConfigError(
                f"kernel '{self.name}': shared_mem={shared_mem} is outside [0, "
                f"{self.max_dynamic_shared_size_bytes}] (raise max_dynamic_shared_size_bytes, as "
                "on the GPU, for more than 48 KiB)")
        entry = self._entry("plain")
        values, packed = check_and_pack(self.name, entry.params, args)
        mode = modes.current_mode()
        if mode == "asan":
            from . import asan  # imported late: only asan mode needs the subprocess machinery

            asan.launch(self._module, self.name, grid3, block3, int(shared_mem), values,
                        entry.params)
        elif mode in ("counters", "racecheck"):
            traced.launch(mode, self._entry("traced"), grid3, block3, int(shared_mem), values,
                          entry.params)
        elif mode == "memcheck":
            with memcheck.guarded(self.name, entry.params, values) as guarded_values:
                execute(entry, grid3, block3, int(shared_mem), pack(guarded_values))
        else:
            execute(entry, grid3, block3, int(shared_mem), packed)


def _dims(value: Any, what: str, limits: tuple[int, int, int]) -> tuple[int, int, int]:
    if not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        raise LaunchConfigError(f"{what} must be a tuple of 1 to 3 ints, as CuPy requires; "
                                f"got {value!r}")
    dims = [int(v) for v in value] + [1] * (3 - len(value))
    for d, limit in zip(dims, limits, strict=True):
        if not 1 <= d <= limit:
            raise LaunchConfigError(f"{what} {value!r} is outside the limits {limits}")
    return dims[0], dims[1], dims[2]


def worker_count() -> int:
    configured = os.environ.get("DCNBENCH_EMULATOR_THREADS")
    if configured:
        return max(1, int(configured))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def fiber_stack_bytes(flavor: str) -> int:
    kib = max(16, int(os.environ.get("DCNBENCH_EMULATOR_STACK_KIB", "256")))
    return kib * 1024 * (4 if flavor == "asan" else 1)  # ASan's redzones grow every frame


def execute(entry: KernelEntry, grid: tuple[int, int, int], block: tuple[int, int, int],
            shared_mem: int, packed_args: ctypes.Array) -> None:
    """Runs one launch in this process; raises the runtime's findings."""
    message = ctypes.create_string_buffer(_MESSAGE_SIZE)
    status = runtime(entry.flavor).dcn_launch(
        entry.run_thread, packed_args, entry.name.encode(), (ctypes.c_uint * 3)(*grid),
        (ctypes.c_uint * 3)(*block), shared_mem, worker_count(), int(entry.uses_fibers),
        fiber_stack_bytes(entry.flavor), message, _MESSAGE_SIZE)
    if status:
        raise _STATUS_ERRORS.get(status, EmulatorError)(message.value.decode(errors="replace"))


__all__ = ["KernelEntry", "RawKernel", "RawModule", "execute", "parse_options"]
