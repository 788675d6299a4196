"""``dcnbench kernels`` (kernels/build_check.py) on fixture sources.

Each test copies the fixture ``.cu`` files it needs into its own directory and
passes its own ``CudaSource`` mapping, so the real registry is never touched.
NVRTC and ptxas run for real; the whole file takes a few seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import build_check
from kernels.build_check import ARCHS, KiB, check_kernels, theoretical_occupancy
from kernels.cuda_sources import CudaSource
from kernels.nvrtc import Toolchain, ToolchainNotFound, find_toolchain

FIXTURES = Path(__file__).parent / "build_check_fixtures"
REPO_ROOT = Path(__file__).parent.parent

BLOCK_REDUCE = CudaSource("block_reduce.cu", (), {"block_sum": 256})
TEMPLATED = CudaSource("templated.cu", ("scale<float, 4>", "scale<__half, 8>"), {"scale": 128})
SYNTAX_ERROR = CudaSource("syntax_error.cu", (), {"broken": 64})
SPILLS = CudaSource("spills.cu", (), {"spill_heavy": 1024})


@pytest.fixture(autouse=True, scope="module")
def toolchain():
    # The wheels are project dependencies, so CI must have them: fail there,
    # skip only on a machine that runs the tests without them (the GPU image).
    try:
        return find_toolchain()
    except ToolchainNotFound as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"CUDA toolchain wheels not installed: {error}")


def cuda_dir_with(tmp_path: Path, *filenames: str) -> Path:
    for filename in filenames:
        shutil.copy(FIXTURES / filename, tmp_path / filename)
    return tmp_path


def check(tmp_path: Path, *sources: CudaSource, **options) -> build_check.BuildCheckResult:
    cuda_dir = cuda_dir_with(tmp_path, *(source.filename for source in sources))
    return check_kernels(
        {source.filename: source for source in sources}, cuda_dir=cuda_dir, **options
    )


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    build_check.add_arguments(parser)
    return parser.parse_args(argv)


def test_well_behaved_kernel_reports_sane_resources_on_both_archs(tmp_path):
    result = check(tmp_path, BLOCK_REDUCE)
    assert result.ok and result.problems == []
    assert [report.arch for report in result.kernels] == ["sm_90", "sm_80"]
    for report in result.kernels:
        assert report.kernel == report.symbol == "block_sum"
        assert 4 <= report.resources.registers <= 32
        assert report.resources.static_smem == 256 * 4  # __shared__ float partial[256]
        assert report.resources.barriers >= 1  # __syncthreads
        assert not report.spills and report.resources.stack_frame == 0
        assert report.block_size == 256 and report.launch_bounds == (256, 0)
        assert report.occupancy.percent == 100.0
        assert report.occupancy.blocks_per_sm == 8


def test_templated_kernel_is_instantiated_through_name_expressions(tmp_path):
    result = check(tmp_path, TEMPLATED)
    assert result.ok and result.problems == []
    for arch in ("sm_90", "sm_80"):
        reports = {report.kernel: report for report in result.kernels if report.arch == arch}
        assert set(reports) == {"scale<float, 4>", "scale<__half, 8>"}
        assert reports["scale<float, 4>"].symbol == "_Z5scaleIfLi4EEvPT_S0_i"
        assert reports["scale<__half, 8>"].symbol.startswith("_Z5scaleI6__halfLi8E")
        # Block size registered under the template's name covers every instantiation.
        assert {report.block_size for report in reports.values()} == {128}


def test_syntax_error_exits_nonzero_with_nvrtc_log_and_checks_the_rest(tmp_path, capsys):
    sources = {source.filename: source for source in (SYNTAX_ERROR, BLOCK_REDUCE)}
    cuda_dir = cuda_dir_with(tmp_path, *sources)
    assert build_check.run(cli_args(), sources=sources, cuda_dir=cuda_dir) == 1
    out = capsys.readouterr().out
    assert 'syntax_error.cu(5): error: expected a ";"' in out
    assert "error: syntax_error.cu sm_90, sm_80: NVRTC failed" in out
    assert "block_sum" in out  # the other source was still compiled and reported


def test_spills_are_detected_and_highlighted(tmp_path, capsys):
    result = check(tmp_path, SPILLS)
    assert result.ok
    for report in result.kernels:
        # __launch_bounds__(1024, 2) leaves 65536 / 2048 = 32 registers per thread.
        assert report.launch_bounds == (1024, 2)
        assert report.resources.registers <= 32
        assert report.resources.spill_stores > 0 and report.resources.spill_loads > 0
        assert report.spills
    build_check.render(result, build_check.Console(width=140))
    assert "spills in spill_heavy" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arch", "registers", "block_size", "smem_bytes", "barriers", "percent", "limiters"),
    [
        # 32 regs x 32 threads = 1024 per warp: 16 warps in each quarter of the
        # register file, 64 per SM = all 2048 threads.
        ("sm_90", 32, 256, 0, 0, 100.0, ("threads", "registers")),
        # 4096 regs per warp: 4 warps per sub-partition, 16 per SM = 2 blocks of 8 warps.
        ("sm_90", 128, 256, 0, 0, 25.0, ("registers",)),
        # 33 regs round up to 1280 per warp (units of 256): 12 warps per sub-partition,
        # 48 per SM = 6 blocks; without the rounding it would be 7.
        ("sm_80", 33, 256, 0, 0, 75.0, ("registers",)),
        # 48 KiB + the 1 KiB the driver reserves per block: 164 // 49 = 3 blocks on A100 ...
        ("sm_80", 32, 256, 48 * KiB, 0, 37.5, ("shared memory",)),
        # ... and 228 // 49 = 4 on H100.
        ("sm_90", 32, 256, 48 * KiB, 0, 50.0, ("shared memory",)),
        # 227 KiB is the most a block may have: one block fits, one byte more never launches.
        ("sm_90", 32, 128, 227 * KiB, 0, 6.25, ("shared memory",)),
        ("sm_90", 32, 128, 227 * KiB + 1, 0, 0.0, ("shared memory",)),
        # One-warp blocks run out of block slots (32 per SM) at half the warps.
        ("sm_80", 16, 32, 0, 0, 50.0, ("blocks",)),
        # 16 named barriers per block: 64 // 16 = 4 blocks of 2 warps.
        ("sm_90", 16, 64, 0, 16, 12.5, ("barriers",)),
        # 72 regs x 1024 threads exceeds the 64 Ki registers a block may have.
        ("sm_90", 72, 1024, 0, 0, 0.0, ("registers",)),
        ("sm_90", 32, 2048, 0, 0, 0.0, ("threads",)),
    ],
)
def test_theoretical_occupancy_matches_hand_computation(
    arch, registers, block_size, smem_bytes, barriers, percent, limiters
):
    occupancy = theoretical_occupancy(
        ARCHS[arch],
        registers=registers,
        block_size=block_size,
        smem_bytes=smem_bytes,
        barriers=barriers,
    )
    assert occupancy.percent == percent
    assert occupancy.limiters == limiters
    assert occupancy.warps_per_sm == occupancy.blocks_per_sm * -(-block_size // 32)


def test_dynamic_shared_memory_counts_toward_occupancy(tmp_path):
    source = CudaSource(
        "block_reduce.cu", (), {"block_sum": 256}, dynamic_smem={"block_sum": 100 * KiB}
    )
    result = check(tmp_path, source)
    occupancy = {report.arch: report.occupancy for report in result.kernels}
    # 1 KiB static + 100 KiB dynamic + 1 KiB reserved = 102 KiB per block.
    assert occupancy["sm_90"].blocks_per_sm == 2  # 228 // 102
    assert occupancy["sm_80"].blocks_per_sm == 1  # 164 // 102
    assert occupancy["sm_80"].limiters == ("shared memory",)


def test_kernel_that_cannot_launch_is_an_error(tmp_path):
    source = CudaSource(
        "block_reduce.cu", (), {"block_sum": 256}, dynamic_smem={"block_sum": 200 * KiB}
    )
    result = check(tmp_path, source)
    # 201 KiB fits an H100 block (227 KiB) but not an A100 one (163 KiB).
    assert [(p.severity, p.arch, p.message) for p in result.problems] == [
        ("error", "sm_80", "cannot launch 256 threads: more shared memory than a block may have")
    ]


@pytest.mark.parametrize(
    ("source_options", "cupy_adds"),
    [
        (("-std=c++17", "-DTILE=4"), []),
        (("-DTILE=4",), ["--std=c++11"]),  # CuPy's default standard
    ],
)
def test_compiles_with_the_options_cupy_gives_nvrtc(
    tmp_path, monkeypatch, source_options, cupy_adds
):
    seen_options = []
    compile_to_ptx = Toolchain.compile_to_ptx

    def spy(self, code, filename, options, name_expressions):
        seen_options.append(options)
        return compile_to_ptx(self, code, filename, options, name_expressions)

    monkeypatch.setattr(Toolchain, "compile_to_ptx", spy)
    source = dataclasses.replace(BLOCK_REDUCE, options=source_options)
    assert check(tmp_path, source, archs=["sm_80"]).ok
    includes = [f"-I{include_dir}" for include_dir in find_toolchain().include_dirs]
    assert seen_options == [
        [
            *source_options,
            *cupy_adds,
            "-ftz=true",
            "--device-as-default-execution-space",
            "--gpu-architecture=compute_80",
            *includes,
        ]
    ]


def test_ptxas_warnings_are_reported(tmp_path):
    source = CudaSource("impossible_min_blocks.cu", (), {"fill": 1024})
    result = check(tmp_path, source, archs=["sm_90"])
    assert result.ok
    [problem] = result.problems
    assert problem.severity == "warning"
    assert (
        problem.message.startswith("ptxas warning")
        and ".minnctapersm will be ignored" in problem.message
    )


def test_ptxas_assembles_for_the_requested_arch(toolchain):
    # compute_80 PTX also assembles for sm_90, so only ptxas's own words tell which it did.
    code = (FIXTURES / "block_reduce.cu").read_text()
    compiled = toolchain.compile_to_ptx(
        code, "block_reduce.cu", ["--gpu-architecture=compute_80"], []
    )
    assembled = toolchain.assemble_verbose(compiled.ptx, "sm_80")
    assert "Compiling entry function 'block_sum' for 'sm_80'" in assembled.stdout + assembled.stderr


def test_kernel_without_name_expression_or_block_size_gets_warnings(tmp_path):
    result = check(tmp_path, CudaSource("mangled.cu", (), {}), archs=["sm_90"])
    assert result.ok
    [report] = result.kernels
    assert report.kernel == report.symbol == "_Z4fillPf"
    assert report.block_size is None and report.occupancy is None
    assert [(p.severity, p.kernel, p.message.split(":")[0]) for p in result.problems] == [
        ("warning", "_Z4fillPf", "C++ kernel without a name expression"),
        ("warning", "_Z4fillPf", "no block size registered"),
    ]


def test_unregistered_source_is_an_error(tmp_path):
    shutil.copy(FIXTURES / "block_reduce.cu", tmp_path / "stray.cu")
    result = check(tmp_path, BLOCK_REDUCE)
    assert not result.ok
    [problem] = result.problems
    assert (problem.severity, problem.source) == ("error", "stray.cu")
    assert "unregistered" in problem.message
    assert {report.source for report in result.kernels} == {"block_reduce.cu"}


def test_block_size_over_launch_bounds_is_an_error_and_under_a_warning(tmp_path):
    too_big = check(tmp_path, dataclasses.replace(BLOCK_REDUCE, block_sizes={"block_sum": 512}))
    assert not too_big.ok
    assert {p.severity for p in too_big.problems} == {"error"}
    assert "512 > __launch_bounds__ 256" in too_big.problems[0].message

    too_small = check(tmp_path, dataclasses.replace(BLOCK_REDUCE, block_sizes={"block_sum": 128}))
    assert too_small.ok
    assert {p.severity for p in too_small.problems} == {"warning"}
    assert "128 < __launch_bounds__ 256" in too_small.problems[0].message


def test_arch_source_and_json_options(tmp_path, capsys):
    sources = {source.filename: source for source in (BLOCK_REDUCE, TEMPLATED)}
    cuda_dir = cuda_dir_with(tmp_path, *sources)
    args = cli_args("--arch", "sm_80", "--source", "templated", "--json")
    assert build_check.run(args, sources=sources, cuda_dir=cuda_dir) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["archs"] == ["sm_80"]
    assert {(k["source"], k["arch"]) for k in report["kernels"]} == {("templated.cu", "sm_80")}
    assert {k["occupancy"]["percent"] for k in report["kernels"]} == {100.0}


def test_unknown_source_name_is_an_error(tmp_path):
    result = check(tmp_path, BLOCK_REDUCE, only=["deform_conv3d"])
    assert not result.ok and result.kernels == []
    assert [(p.source, p.message) for p in result.problems] == [
        ("deform_conv3d", "no such kernel source")
    ]


def test_missing_toolchain_exits_2_with_install_hint(tmp_path, monkeypatch, capsys):
    def missing():
        raise ToolchainNotFound("not found: ptxas; install with `pip install nvidia-cuda-nvcc`")

    monkeypatch.setattr(build_check, "find_toolchain", missing)
    assert build_check.run(cli_args(), sources={}, cuda_dir=tmp_path) == 2
    assert "pip install nvidia-cuda-nvcc" in capsys.readouterr().err


def test_module_entry_point_runs_on_the_real_registry():
    # Whether the real kernels build is CI's own `dcnbench kernels` step; here only
    # that `python -m` works and its exit status agrees with its report.
    completed = subprocess.run(
        [sys.executable, "-m", "kernels.build_check", "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    report = json.loads(completed.stdout)
    assert completed.returncode == (0 if report["ok"] else 1), completed.stderr
    assert report["archs"] == ["sm_90", "sm_80"]
