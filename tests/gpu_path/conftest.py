"""The CuPy stand-in for the tests of the GPU path (``kernels.emulator.cupy_shim``)."""

import pytest

from kernels.emulator import cupy_shim


@pytest.fixture
def emulated_gpu(request):
    """CPU tensors go through ``kernels.launch``'s CUDA branch on an emulated H200, or
    on the GPU given by indirect parametrisation (``"A100"``; ``("A100", False)`` to
    record and pack launches without running the kernels)."""
    gpu, run_kernels = getattr(request, "param", "H200"), True
    if isinstance(gpu, tuple):
        gpu, run_kernels = gpu
    with cupy_shim.emulated_gpu(gpu, run_kernels=run_kernels) as state:
        yield state
