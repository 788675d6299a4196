"""NVRTC and ptxas from the CUDA pip wheels: compiling kernels without a GPU.

Only the build check (``dcnbench kernels``) uses this. ``cuda-bindings`` and
``cuda-pathfinder`` are imported inside :func:`find_toolchain`, never at module
level, because the GPU image runs our kernels through CuPy and has neither.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

INSTALL_HINT = (
    "pip install cuda-bindings nvidia-cuda-nvrtc nvidia-cuda-nvcc "
    "nvidia-cuda-runtime nvidia-cuda-cccl"
)


class ToolchainNotFound(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Compiled:
    ptx: str | None  # None when NVRTC reported an error (see log)
    log: str
    symbols: dict[str, str]  # lowered (mangled) symbol -> the name expression it came from


@dataclasses.dataclass(frozen=True)
class Toolchain:
    nvrtc: ModuleType  # cuda.bindings.nvrtc
    ptxas: str
    include_dirs: tuple[str, ...]
    description: str  # versions, for report headers: register counts depend on them

    def compile_to_ptx(
        self, code: str, filename: str, options: Sequence[str], name_expressions: Sequence[str]
    ) -> Compiled:
        """NVRTC ``code`` to PTX, instantiating ``name_expressions`` as CuPy's RawModule does.

        The program is named by the bare file name, as CuPy's temporary copy is:
        named by its full path, NVRTC would resolve ``#include "x.cuh"`` next to the
        source, which the GPU path does not.
        """
        nvrtc = self.nvrtc

        def call(function, *args):
            error, *values = function(*args)
            if error != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                message = nvrtc.nvrtcGetErrorString(error)[1].decode()
                raise RuntimeError(f"{function.__name__}: {message}")
            return values[0] if values else None

        def text(get_size, get) -> str:
            buffer = b" " * call(get_size, program)
            call(get, program, buffer)
            return buffer.decode().rstrip("\0").strip()

        program = call(nvrtc.nvrtcCreateProgram, code.encode(), filename.encode(), 0, [], [])
        try:
            for expression in name_expressions:
                call(nvrtc.nvrtcAddNameExpression, program, expression.encode())
            encoded = [option.encode() for option in options]
            (status,) = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
            log = text(nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog)
            if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
                return Compiled(ptx=None, log=log, symbols={})
            symbols = {
                call(nvrtc.nvrtcGetLoweredName, program, expression.encode()).decode(): expression
                for expression in name_expressions
            }
            return Compiled(text(nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX), log, symbols)
        finally:
            nvrtc.nvrtcDestroyProgram(program)

    def assemble_verbose(self, ptx: str, arch: str) -> subprocess.CompletedProcess[str]:
        """``ptxas -v`` for ``arch`` (``sm_90``): the backend NVRTC runs for CuPy's cubins."""
        with tempfile.TemporaryDirectory(prefix="dcnbench-ptxas-") as scratch:
            ptx_path = Path(scratch) / "kernel.ptx"
            ptx_path.write_text(ptx)
            command = [self.ptxas, "-v", f"--gpu-name={arch}", "-o", ptx_path.with_suffix(".cubin")]
            return subprocess.run([*command, ptx_path], capture_output=True, text=True)


@functools.cache
def find_toolchain() -> Toolchain:
    """NVRTC, ptxas and the CUDA headers, located in the installed wheels."""
    try:
        import cuda.pathfinder as pathfinder
        from cuda.bindings import nvrtc
    except ImportError as error:
        raise ToolchainNotFound(f"{error}; install it with `{INSTALL_HINT}`") from error
    ptxas = pathfinder.find_nvidia_binary_utility("ptxas")
    # On a GPU machine CuPy finds cuda_fp16.h & co. itself; NVRTC here needs them named.
    headers = {lib: pathfinder.locate_nvidia_header_directory(lib) for lib in ("cudart", "cccl")}
    missing = [name for name, found in [("ptxas", ptxas), *headers.items()] if found is None]
    if missing:
        raise ToolchainNotFound(f"not found: {', '.join(missing)}; install with `{INSTALL_HINT}`")
    try:
        _, major, minor = nvrtc.nvrtcVersion()
    except Exception as error:  # whatever loading libnvrtc raised, the remedy is the same
        raise ToolchainNotFound(f"cannot load NVRTC ({error}); `{INSTALL_HINT}`") from error
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release ([\d.]+)", version)
    return Toolchain(
        nvrtc=nvrtc,
        ptxas=ptxas,
        include_dirs=tuple(found.abs_path for found in headers.values()),
        description=f"NVRTC {major}.{minor}, ptxas {release[1] if release else '?'}",
    )
