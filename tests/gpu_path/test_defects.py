"""The defects the GPU path had before any GPU ran it (issue 9), each with the
check that failed before its fix."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from test_cuda_branch import dcnv3_inputs

from harness import execution, registry
from harness.cases import make_case
from kernels import cuda_sources, launch
from kernels.ops.dcnv3 import dcnv3


def test_editing_an_included_header_changes_what_cupy_caches_by(emulated_gpu, tmp_path,
                                                                monkeypatch):
    """CuPy's kernel cache is keyed by the source text and options it is given: an
    edit to dcnv3_common.cuh or to the scalar_conversions.cuh it includes must
    change that text, or CuPy reuses the stale cubin."""
    shutil.copytree(cuda_sources.CUDA_DIR, tmp_path / "cuda")
    monkeypatch.setattr(cuda_sources, "CUDA_DIR", tmp_path / "cuda")
    source = cuda_sources.CudaSource(
        "dcnv3_direct.cu", ("dcnv3_direct_forward<float, 0>",), {},
        options=("-std=c++17", f"-I{tmp_path / 'cuda'}"))
    compiled = []
    for header in (None, "dcnv3_common.cuh", "scalar_conversions.cuh"):
        if header is not None:
            with (tmp_path / "cuda" / header).open("a") as file:
                file.write("\n#define DCNBENCH_EDITED_HEADER 1\n")
        launch.clear_caches()
        launch.module(source, "cpu")
        compiled.append(emulated_gpu.compiled[-1])
    assert len({(c.code, c.options) for c in compiled}) == 3


def test_no_deprecated_cupy_stream_api(emulated_gpu):
    """cupy.cuda.ExternalStream warns in CuPy 14; the torch stream goes to CuPy
    through Stream.from_external (the CUDA stream protocol)."""
    (x, offset, mask), sizes = dcnv3_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dcnv3(x, offset, mask, **sizes)
    assert len(emulated_gpu.launches) == 1


def test_a_failed_launch_may_be_an_earlier_kernels_error(emulated_gpu):
    """CUDA reports an earlier asynchronous kernel's fault at the next launch: the
    message names the kernel it surfaced at, says it may not be its own, and how to
    find the one that failed."""
    (x, offset, mask), sizes = dcnv3_inputs()
    emulated_gpu.fail_next_launch("CUDA_ERROR_ILLEGAL_ADDRESS")
    with pytest.raises(RuntimeError) as raised:
        dcnv3(x, offset, mask, **sizes)
    message = str(raised.value)
    assert "dcnv3_vectorized_forward<float, 0, 4>" in message
    assert "CUDA_ERROR_ILLEGAL_ADDRESS" in message
    assert "earlier asynchronous kernel" in message
    assert "CUDA_LAUNCH_BLOCKING=1" in message


def run_row(op: str, impl: str, overrides: dict, direction: str = "forward"):
    registry.load_all()
    case = make_case(registry.get_operator(op), overrides, "float32", "random")
    case_run = execution.prepare(case, "cpu", seed=0, backward=direction == "backward")
    row, _ = execution.run(case_run, registry.get_implementation(op, impl), direction, None)
    return row


def test_the_row_records_the_vectorized_kernel_that_ran(emulated_gpu):
    row = run_row("dcnv3", "cupy_vectorized", {"group_channels": 16}, "backward")
    assert row.status == "ok"
    assert row.kernel_variant == (
        "dcnv3_vectorized_forward<float, 0, 4>; dcnv3_vectorized_backward<float, 0, 4>")


def test_the_row_records_the_scalar_fallback_and_why(emulated_gpu):
    """group_channels 6 is no multiple of four floats: the vectorized design runs
    its scalar instantiation (VEC=1, several times slower), and the row says so."""
    row = run_row("dcnv3", "cupy_vectorized", {"group_channels": 6})
    assert row.status == "ok"
    assert row.kernel_variant == (
        "dcnv3_vectorized_forward<float, 0, 1> (scalar fallback: group_channels 6 is not a "
        "multiple of 4, the 16-byte vector)")


def test_a_misaligned_tensor_is_recorded_as_the_reason_for_the_fallback(emulated_gpu):
    (x, offset, mask), sizes = dcnv3_inputs()
    storage = torch.empty(x.numel() + 1)
    misaligned = storage[1:].view(x.shape).copy_(x)
    with launch.recorded_launches() as log:
        dcnv3(misaligned, offset, mask, **sizes)
    assert launch.variants(log) == (
        "dcnv3_vectorized_forward<float, 0, 1> (scalar fallback: tensor data 4 bytes past a "
        "16-byte boundary)")


def test_peers_and_references_record_no_kernel_variant():
    assert run_row("dcnv3", "pytorch_gridsample", {}).kernel_variant is None
