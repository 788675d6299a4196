"""``dcnbench kernels``: compile every CUDA source the way the GPU path does, and
report what each kernel costs an SM.

For every registered source (``kernels.cuda_sources``) and target architecture,
NVRTC -- the compiler CuPy runs at run time -- compiles the source to PTX with the
options and name expressions CuPy would give it; ``ptxas -v`` then assembles that
PTX for the real SM (the backend NVRTC itself runs when CuPy compiles straight to
a cubin) and reports registers, shared memory, stack and spills per kernel. From
those we compute theoretical occupancy at the kernel's launch block size the way
CUDA's occupancy calculator (``cuda_occupancy.h``) does. Neither step needs a
GPU: NVRTC and ptxas come from the ``nvidia-cuda-nvrtc`` and ``nvidia-cuda-nvcc``
wheels, so this runs in CI.

Exit status: 0 when every source compiled; 1 on any error (a compile error, an
unregistered ``.cu`` file, a kernel that cannot launch at its block size);
2 when the toolchain is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Literal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kernels.cuda_sources import CUDA_DIR, CudaSource, load_all
from kernels.nvrtc import Toolchain, ToolchainNotFound, find_toolchain

DESCRIPTION = (
    "Compile every CUDA kernel source with NVRTC and ptxas, as the GPU path does, and report "
    "registers, shared memory, stack, spills and theoretical occupancy per kernel."
)
KiB = 1024
WARP_SIZE = 32
DEFAULT_ARCHS = ("sm_90", "sm_80")


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """Per-SM resources of one architecture, as ``cuda_occupancy.h`` models them."""

    arch: str
    gpus: str
    smem_per_sm: int
    max_smem_per_block: int  # with the opt-in kernel attribute; 48 KiB without it
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_threads_per_block: int = 1024
    max_blocks_per_sm: int = 32
    barriers_per_sm: int = 64  # two named-barrier sets per block slot
    # Registers are handed to warps in units of 256, separately in each of the
    # SM's four sub-partitions (a warp's registers live in one of them).
    reg_alloc_unit: int = 256
    sub_partitions: int = 4
    # Shared memory is handed to blocks in 128-byte units; from sm_80 on the
    # driver also keeps 1 KiB per resident block for itself.
    smem_alloc_unit: int = 128
    smem_reserved_per_block: int = 1 * KiB


ARCHS: dict[str, SMLimits] = {
    "sm_90": SMLimits("sm_90", "H100/H200", smem_per_sm=228 * KiB, max_smem_per_block=227 * KiB),
    "sm_80": SMLimits("sm_80", "A100", smem_per_sm=164 * KiB, max_smem_per_block=163 * KiB),
}


@dataclasses.dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int
    warps_per_sm: int
    percent: float
    # Every resource that caps blocks_per_sm (several when they tie, as in
    # cuda_occupancy.h's limiting-factor mask); with 0 blocks, what is exceeded.
    limiters: tuple[str, ...]


def theoretical_occupancy(
    limits: SMLimits, *, registers: int, block_size: int, smem_bytes: int = 0, barriers: int = 0
) -> Occupancy:
    """Resident blocks and warps per SM, as ``cudaOccMaxActiveBlocksPerMultiprocessor``
    computes them with the default shared-memory carveout."""
    warps_per_block = -(-block_size // WARP_SIZE)
    max_warps = limits.max_threads_per_sm // WARP_SIZE
    threads_fit = block_size <= limits.max_threads_per_block
    blocks_by = {"threads": max_warps // warps_per_block if threads_fit else 0}
    blocks_by["blocks"] = limits.max_blocks_per_sm
    if registers:
        regs_per_warp = _round_up(registers * WARP_SIZE, limits.reg_alloc_unit)
        # Each sub-partition holds as many warps as its share of the register file
        # allows (a block that does not fit gets 0, as the launch-time check says).
        warps_per_partition = limits.regs_per_sm // limits.sub_partitions // regs_per_warp
        resident_warps = warps_per_partition * limits.sub_partitions
        blocks_by["registers"] = resident_warps // warps_per_block
    smem_per_block = _round_up(smem_bytes + limits.smem_reserved_per_block, limits.smem_alloc_unit)
    if smem_per_block > limits.max_smem_per_block + limits.smem_reserved_per_block:
        blocks_by["shared memory"] = 0
    else:
        blocks_by["shared memory"] = limits.smem_per_sm // smem_per_block
    if barriers:
        blocks_by["barriers"] = limits.barriers_per_sm // barriers
    blocks = min(blocks_by.values())
    return Occupancy(
        blocks_per_sm=blocks,
        warps_per_sm=blocks * warps_per_block,
        percent=100.0 * blocks * warps_per_block / max_warps,
        limiters=tuple(resource for resource, limit in blocks_by.items() if limit == blocks),
    )


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def cupy_nvrtc_options(options: Sequence[str], arch: str) -> list[str]:
    """What CuPy's ``RawModule`` hands NVRTC for a source's ``options``, include dirs aside.

    CuPy (``cupy/_core/core.pyx``, ``cupy/cuda/compiler.py``) adds ``--std=c++11``
    unless a standard is given, then ``-ftz=true``, and with NVRTC 12+ (all we
    support) ``--device-as-default-execution-space``, which makes unannotated
    functions device functions. Each changes what compiles, or how.
    """
    standard = [] if any("-std=c++" in option for option in options) else ["--std=c++11"]
    compute = arch.replace("sm_", "compute_")
    return [
        *options,
        *standard,
        "-ftz=true",
        "--device-as-default-execution-space",
        f"--gpu-architecture={compute}",
    ]


@dataclasses.dataclass
class KernelResources:
    """What ``ptxas -v`` reports for one kernel (bytes, except registers and barriers)."""

    registers: int = 0
    static_smem: int = 0
    stack_frame: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    barriers: int = 0


@dataclasses.dataclass(frozen=True)
class KernelReport:
    source: str
    arch: str
    kernel: str  # the name expression, or the symbol of an extern "C" kernel
    symbol: str  # what ptxas calls it (mangled for C++ kernels)
    resources: KernelResources
    dynamic_smem: int
    block_size: int | None
    launch_bounds: tuple[int, int] | None  # __launch_bounds__ (max threads, min blocks per SM)
    occupancy: Occupancy | None

    @property
    def spills(self) -> bool:
        return bool(self.resources.spill_stores or self.resources.spill_loads)


Severity = Literal["error", "warning"]


@dataclasses.dataclass(frozen=True)
class Problem:
    severity: Severity
    source: str
    message: str
    arch: str | None = None
    kernel: str | None = None


@dataclasses.dataclass
class BuildCheckResult:
    archs: tuple[str, ...]
    toolchain: str
    kernels: list[KernelReport] = dataclasses.field(default_factory=list)
    problems: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(problem.severity == "error" for problem in self.problems)


def check_kernels(
    sources: Mapping[str, CudaSource] | None = None,
    *,
    cuda_dir: Path = CUDA_DIR,
    archs: Sequence[str] = DEFAULT_ARCHS,
    only: Collection[str] = (),
) -> BuildCheckResult:
    """Compile ``sources`` (default: the registry) for ``archs`` and report every kernel.

    ``cuda_dir`` is where the ``.cu`` files are read from; any file there without a
    registration is an error. ``only`` restricts the check to sources named by
    file name or stem.
    """
    sources = load_all() if sources is None else sources
    toolchain = find_toolchain()
    result = BuildCheckResult(archs=tuple(dict.fromkeys(archs)), toolchain=toolchain.description)
    filenames = sorted(set(sources) | {path.name for path in cuda_dir.glob("*.cu")})
    if only:
        selected = [name for name in filenames if name in only or Path(name).stem in only]
        matched = set(selected) | {Path(name).stem for name in selected}
        result.problems += [
            Problem("error", name, "no such kernel source") for name in only if name not in matched
        ]
        filenames = selected
    for filename in filenames:
        if filename not in sources:
            message = "unregistered source: register a CudaSource for it (kernels/cuda_sources.py)"
            result.problems.append(Problem("error", filename, message))
            continue
        code = (cuda_dir / filename).read_text()
        for arch in result.archs:
            kernels, problems = _check_source(sources[filename], code, ARCHS[arch], toolchain)
            result.kernels += kernels
            result.problems += problems
    return result


def _check_source(
    source: CudaSource, code: str, limits: SMLimits, toolchain: Toolchain
) -> tuple[list[KernelReport], list[Problem]]:
    def problem(severity: Severity, message: str, kernel: str | None = None) -> Problem:
        return Problem(severity, source.filename, message, limits.arch, kernel)

    includes = [f"-I{include_dir}" for include_dir in toolchain.include_dirs]
    options = [*cupy_nvrtc_options(source.options, limits.arch), *includes]
    compiled = toolchain.compile_to_ptx(code, source.filename, options, source.name_expressions)
    if compiled.ptx is None:
        return [], [problem("error", f"NVRTC failed:\n{compiled.log}")]
    problems = [problem("warning", f"NVRTC:\n{compiled.log}")] if compiled.log else []
    ptxas = toolchain.assemble_verbose(compiled.ptx, limits.arch)
    output = ptxas.stdout + ptxas.stderr
    if ptxas.returncode != 0:
        return [], [*problems, problem("error", f"ptxas failed:\n{output}")]
    problems += [problem("warning", line) for line in output.splitlines() if "ptxas warn" in line]

    launch_bounds = _launch_bounds(compiled.ptx)
    reports = []
    for symbol, resources in _parse_ptxas_verbose(output).items():
        kernel = compiled.symbols.get(symbol, symbol)
        report, kernel_problems = _report_kernel(
            source, limits, kernel, symbol, resources, launch_bounds.get(symbol)
        )
        reports.append(report)
        problems += [problem(severity, message, kernel) for severity, message in kernel_problems]
    return sorted(reports, key=lambda report: report.kernel), problems


def _report_kernel(
    source: CudaSource,
    limits: SMLimits,
    kernel: str,
    symbol: str,
    resources: KernelResources,
    bounds: tuple[int, int] | None,
) -> tuple[KernelReport, list[tuple[Severity, str]]]:
    problems: list[tuple[Severity, str]] = []
    if kernel.startswith("_Z"):
        problems.append(
            ("warning", "C++ kernel without a name expression: CuPy needs its mangled name")
        )
    try:
        block_size = source.block_size(kernel)
    except KeyError:
        block_size = None
        problems.append(("warning", "no block size registered: occupancy unknown"))
    if block_size and bounds and block_size > bounds[0]:
        problems.append(("error", f"block size {block_size} > __launch_bounds__ {bounds[0]}"))
    elif block_size and bounds and block_size < bounds[0]:
        # Legal, but ptxas budgeted registers for the larger block.
        problems.append(("warning", f"block size {block_size} < __launch_bounds__ {bounds[0]}"))
    dynamic_smem = _dynamic_smem(source, kernel)
    occupancy = None
    if block_size:
        occupancy = theoretical_occupancy(
            limits,
            registers=resources.registers,
            block_size=block_size,
            smem_bytes=resources.static_smem + dynamic_smem,
            barriers=resources.barriers,
        )
        if occupancy.blocks_per_sm == 0:
            exceeded = " and ".join(occupancy.limiters)
            problems.append(
                (
                    "error",
                    f"cannot launch {block_size} threads: more {exceeded} than a block may have",
                )
            )
    report = KernelReport(
        source.filename,
        limits.arch,
        kernel,
        symbol,
        resources,
        dynamic_smem,
        block_size,
        bounds,
        occupancy,
    )
    return report, problems


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES_FOR = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USAGE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "barriers": re.compile(r"used (\d+) barriers"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}


def _parse_ptxas_verbose(output: str) -> dict[str, KernelResources]:
    """Resources per kernel (entry function) from ``ptxas -v`` output.

    A non-inlined device function gets its own "Function properties" block,
    which is not added to its callers' (a known gap).
    """
    kernels: dict[str, KernelResources] = {}
    entry = described = None
    for line in output.splitlines():
        if match := _ENTRY.search(line):
            entry = match[1]
            kernels[entry] = KernelResources()
        elif match := _PROPERTIES_FOR.search(line):
            described = match[1]
        elif (match := _FRAME.search(line)) and described in kernels:
            frame = kernels[described]
            frame.stack_frame, frame.spill_stores, frame.spill_loads = map(int, match.groups())
        elif entry and "Used" in line:
            for field, pattern in _USAGE.items():
                if usage := pattern.search(line):
                    setattr(kernels[entry], field, int(usage[1]))
    return kernels


_PTX_ENTRY = re.compile(r"\.entry\s+([\w$]+)\s*\([^)]*\)([^{]*)\{")


def _launch_bounds(ptx: str) -> dict[str, tuple[int, int]]:
    """``__launch_bounds__`` per kernel symbol, from PTX's ``.maxntid`` and ``.minnctapersm``."""
    bounds = {}
    for symbol, directives in _PTX_ENTRY.findall(ptx):
        if max_threads := re.search(r"\.maxntid\s+([\d,\s]+)", directives):
            threads = math.prod(int(extent) for extent in max_threads[1].split(","))
            min_blocks = re.search(r"\.minnctapersm\s+(\d+)", directives)
            bounds[symbol] = (threads, int(min_blocks[1]) if min_blocks else 0)
    return bounds


def _dynamic_smem(source: CudaSource, kernel: str) -> int:
    """Dynamic shared memory ``kernel`` is launched with, looked up like ``block_size``."""
    per_kernel = source.dynamic_smem
    return per_kernel.get(kernel, per_kernel.get(kernel.split("<", 1)[0], 0))


def render(result: BuildCheckResult, console: Console) -> None:
    """One rich table per architecture, then the problems, then a summary."""
    console.print(f"[bold]dcnbench kernels[/] ({result.toolchain})")
    for arch in result.archs:
        table = Table(title=f"{arch} ({ARCHS[arch].gpus})", title_justify="left")
        for column in ("source", "kernel"):
            table.add_column(column)
        for column in ("regs", "smem", "stack", "spill st/ld", "block", "occupancy"):
            table.add_column(column, justify="right")
        table.add_column("limiter")
        rows = [report for report in result.kernels if report.arch == arch]
        for index, (source, reports) in enumerate(itertools.groupby(rows, lambda r: r.source)):
            if index:
                table.add_section()
            for row, report in enumerate(reports):
                table.add_row("" if row else source, *_cells(report))
        console.print(table)
    # A compile error usually reads the same for every arch: print it once, naming them all.
    grouped: dict[tuple, list[str | None]] = {}
    for problem in result.problems:
        key = (problem.severity, problem.source, problem.kernel, problem.message)
        grouped.setdefault(key, []).append(problem.arch)
    for (severity, source, kernel, message), archs in grouped.items():
        where = " ".join(filter(None, [source, kernel, ", ".join(filter(None, archs))]))
        style = "bold red" if severity == "error" else "yellow"
        console.print(Text(f"{severity}: {where}: ", style=style) + Text(message))
    errors = sum(severity == "error" for severity, *_ in grouped)
    kernels = {(report.source, report.kernel) for report in result.kernels}
    spilling = sorted({report.kernel for report in result.kernels if report.spills})
    console.print(
        f"{len(kernels)} kernels on {', '.join(result.archs)}: {errors} errors, "
        f"{len(grouped) - errors} warnings"
        + (f"; spills in {', '.join(spilling)}" if spilling else ""),
        style="bold red" if errors else "bold green",
    )


def _cells(report: KernelReport) -> list[str | Text]:
    resources, occupancy = report.resources, report.occupancy
    smem = _bytes(resources.static_smem)
    if report.dynamic_smem:
        smem += f" + {_bytes(report.dynamic_smem)} dyn"
    spills = f"{resources.spill_stores}/{resources.spill_loads}"
    percent = f"{occupancy.percent:g}%" if occupancy else "?"
    return [
        report.kernel,
        str(resources.registers),
        smem,
        _bytes(resources.stack_frame),
        Text(spills, style="bold red" if report.spills else ""),
        str(report.block_size or "?"),
        Text(percent, style=_occupancy_style(occupancy)),
        ", ".join(occupancy.limiters) if occupancy else "",
    ]


def _bytes(count: int) -> str:
    return f"{count / KiB:.1f} KiB" if count >= KiB else f"{count} B"


def _occupancy_style(occupancy: Occupancy | None) -> str:
    if occupancy is None or occupancy.percent < 25:
        return "bold red"
    return "yellow" if occupancy.percent < 50 else "green"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--arch",
        action="append",
        choices=sorted(ARCHS),
        help=f"target architecture, repeatable (default: {' and '.join(DEFAULT_ARCHS)})",
    )
    parser.add_argument(
        "--source",
        action="append",
        metavar="NAME",
        help="check only this source, by file name or stem; repeatable",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON instead of tables"
    )


def run(
    args: argparse.Namespace,
    *,
    sources: Mapping[str, CudaSource] | None = None,
    cuda_dir: Path = CUDA_DIR,
) -> int:
    """``dcnbench kernels``; ``sources`` and ``cuda_dir`` let tests point it at fixtures."""
    try:
        result = check_kernels(
            sources, cuda_dir=cuda_dir, archs=args.arch or DEFAULT_ARCHS, only=args.source or ()
        )
    except ToolchainNotFound as error:
        print(f"dcnbench kernels: CUDA toolchain unavailable: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"ok": result.ok, **dataclasses.asdict(result)}, indent=2))
    else:
        # CI logs are not terminals and would get rich's 80-column default, folding every row.
        render(result, Console(width=None if sys.stdout.isatty() else 140))
    return 0 if result.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.build_check", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
