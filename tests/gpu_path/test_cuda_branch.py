"""``kernels.launch``'s CUDA branch, through the CuPy stand-in, on every commit.

What runs here is the code a GPU runs, up to CuPy: the op wrappers' launch
configurations at H200 and A100 sizes, CUDA's grid limits, the pointer
arguments, the stream taken from torch for every launch, ``cupy.RawModule``'s
inputs; the kernels themselves then run in the emulator and are checked against
the float64 reference by the harness.
"""

from __future__ import annotations

import json

import pytest
import torch

from harness import cli
from kernels import launch
from kernels.emulator import KernelArgumentError
from kernels.ops.dcnv3 import dcnv3
from kernels.ops.deform_conv2d import deform_conv2d
from kernels.ops.deform_roi_pool import deform_roi_pool

OUR_IMPLEMENTATIONS = ("cupy", "cupy_direct", "cupy_vectorized", "cupy_staged",
                       "cupy_shared_scatter", "cupy_channels_fastest", "cupy_implicit_gemm",
                       "cupy_samples_fastest")


def dcnv3_inputs(group_channels: int = 8, requires_grad: bool = False):
    generator = torch.Generator().manual_seed(0)
    N, H, W, G = 1, 4, 5, 2
    tensors = (
        torch.randn(N, H, W, G * group_channels, generator=generator),
        torch.randn(N, H, W, G * 9 * 2, generator=generator),
        torch.rand(N, H, W, G * 9, generator=generator),
    )
    return [t.requires_grad_(requires_grad) for t in tensors], {"group": G,
                                                               "group_channels": group_channels}


@pytest.mark.slow
def test_the_smoke_suite_runs_every_op_through_the_cuda_branch(emulated_gpu, tmp_path):
    """`dcnbench run --suite smoke` with every kernel launched by CuPy's path:
    every operator of the suite, forward and backward, passes its check."""
    exit_code = cli.main(["run", "--suite", "smoke", "--device", "cpu", "--no-timing",
                          "--impl", *OUR_IMPLEMENTATIONS, "--out", str(tmp_path / "run")])
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").open()]
    ran = [row for row in rows if row["status"] != "skipped"]
    assert exit_code == 0
    assert {row["status"] for row in ran} == {"ok"}
    covered = {(row["op"], row["direction"]) for row in ran}
    suite_ops = {row["op"] for row in rows}
    assert covered == {(op, d) for op in suite_ops for d in ("forward", "backward")}
    assert len(suite_ops) >= 9
    # Every checked row went through the stand-in's CuPy, and says which kernels ran.
    assert all(row["kernel_variant"] for row in ran)
    launched = {launch.kernel for launch in emulated_gpu.launches}
    named = {v.split(" (")[0] for row in ran for v in row["kernel_variant"].split("; ")}
    assert named == launched


def test_kernels_launch_on_torchs_current_stream_side_streams_included(emulated_gpu):
    """Forward and backward, on the default stream and inside torch.cuda.stream(side):
    every launch is on the stream torch calls current."""
    (x, offset, mask), sizes = dcnv3_inputs(requires_grad=True)
    dcnv3(x, offset, mask, **sizes).sum().backward()
    on_default = list(emulated_gpu.launches)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        dcnv3(x, offset, mask, **sizes, design="direct").sum().backward()
    on_side = emulated_gpu.launches[len(on_default):]
    assert [launch.stream for launch in on_default] == [0, 0]
    assert side.cuda_stream != 0
    assert [launch.stream for launch in on_side] == [side.cuda_stream] * 2


@pytest.mark.parametrize(
    ("emulated_gpu", "slices"),
    [(("H200", False), 13), (("A100", False), 11)],
    indirect=["emulated_gpu"],
)
def test_launch_configuration_follows_the_gpus_size(emulated_gpu, slices):
    """deform_conv2d splits an offset group's 64 channels among threads until the
    items fill two waves of resident threads: 2·132·2048 on an H200, 2·108·2048 on
    an A100. 64x64 outputs, 3x3 taps: 36864 items per slice, so 540672 / 36864 → 15
    slices wanted, 5 channels each, 13 slices (H200); 442368 / 36864 → 12 wanted, 6
    channels each, 11 slices (A100). Grid x: slices·36864 threads in blocks of 256."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 64, 64, 64, generator=generator)
    offset = torch.zeros(1, 18, 64, 64)
    weight = torch.randn(8, 64, 3, 3, generator=generator)
    deform_conv2d(x, offset, weight, padding=(1, 1))
    (im2col,) = emulated_gpu.launches
    assert launch.device_properties("cpu").multiprocessor_count == (
        132 if emulated_gpu.properties.name == "NVIDIA H200" else 108)
    assert im2col.grid == (slices * 36864 // 256, 1, 1)
    assert im2col.block == (256, 1, 1)


@pytest.mark.parametrize("emulated_gpu", [("H200", False)], indirect=True)
def test_rois_beyond_the_grids_y_limit_take_several_launches(emulated_gpu):
    """The RoI is blockIdx.y, at most 65535 per launch: 65537 RoIs take two."""
    x = torch.randn(1, 4, 5, 5)
    rois = torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0]]).repeat(65537, 1)
    deform_roi_pool(x, rois, None, pooled_h=2, pooled_w=2, spatial_scale=1.0, sampling_ratio=2)
    assert [launch.grid[1] for launch in emulated_gpu.launches] == [65535, 2]


@pytest.mark.parametrize("emulated_gpu", [("H200", False)], indirect=True)
@pytest.mark.parametrize(("grid", "accepted"), [
    ((2**31 - 1, 65535, 65535), True),
    ((2**31, 1, 1), False),
    ((1, 65536, 1), False),
    ((1, 1, 65536), False),
])
def test_cudas_grid_limits_are_checked_before_cupy(emulated_gpu, grid, accepted):
    """2^31-1 blocks along x, 65535 along y and z reach CuPy; one more is refused first."""
    (x, offset, mask), _ = dcnv3_inputs()
    from kernels.ops import dcnv3 as ops
    kernel = launch.module(ops.SOURCES["direct"], "cpu").function(
        "dcnv3_direct_forward<float, 0>")
    arguments = (x, offset, mask, torch.empty_like(x), *(launch.int32(1) for _ in range(16)),
                 launch.float32(1.0))
    if accepted:
        kernel(grid, 256, arguments)
        assert emulated_gpu.launches[-1].grid == grid
    else:
        with pytest.raises(ValueError, match="grid .* dimension"):
            kernel(grid, 256, arguments)
        assert emulated_gpu.launches == []


def test_arguments_reach_the_kernel_as_cupy_packs_them(emulated_gpu):
    """CuPy passes a Python int as 8 bytes: the kernel's `int` would read garbage, and
    the stand-in refuses it; a tensor itself (not its pointer) is no CuPy argument."""
    from kernels.ops import dcnv3 as ops
    (x, offset, mask), _ = dcnv3_inputs()
    out = torch.empty_like(x)
    raw = launch.module(ops.SOURCES["direct"], "cpu")._raw.get_function(
        "dcnv3_direct_forward<float, 0>")
    pointers = [launch.int64(t.data_ptr()) for t in (x, offset, mask, out)]
    with pytest.raises(KernelArgumentError, match="int32 scalar .* got numpy.int64"):
        raw((1,), (256,), (*pointers, *([1] * 16), launch.float32(1.0)))
    with pytest.raises(TypeError, match="Unsupported type"):
        raw((1,), (256,), (x, offset, mask, out, *([launch.int32(1)] * 16), launch.float32(1.0)))
    # A Python bool is an int to CuPy: 8 bytes for the kernel's `int remove_center`.
    with pytest.raises(KernelArgumentError, match="argument 19 .* got numpy.int64"):
        raw((1,), (256,), (*pointers, *([launch.int32(1)] * 15), True, launch.float32(1.0)))


def test_a_module_runs_inside_the_stand_in_from_the_command_line(tmp_path):
    """`python -m kernels.emulator.cupy_shim MODULE ARGS`: what scripts use."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "kernels.emulator.cupy_shim", "--gpu", "A100", "harness", "run",
         "--suite", "smoke", "--device", "cpu", "--no-timing", "--op", "dcnv3", "--impl",
         "cupy_direct", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "results.jsonl").open()]
    assert {row["status"] for row in rows} == {"ok", "skipped"}
    assert "through the CUDA branch on an emulated NVIDIA A100-SXM4-80GB" in result.stderr
