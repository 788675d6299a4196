"""The racecheck mode on planted races and their correct twins
(tests/emulator/kernels/traced.cu)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import emulator


@pytest.fixture(scope="module")
def module(kernel_source):
    return emulator.RawModule(code=kernel_source("traced.cu"))


def racecheck(module, name, args, grid=(8,), block=(128,)):
    with emulator.mode("racecheck"):
        module.get_function(name)(grid, block, args)


def test_plain_scatter_into_shared_bins_is_a_race(module, rng):
    x = rng.standard_normal(1024, dtype=np.float32)
    bins = np.zeros(16, dtype=np.float32)
    with pytest.raises(emulator.RaceCheckError) as caught:
        racecheck(module, "scatter_plain", (x, bins, np.int32(x.size), np.int32(bins.size)))
    message = str(caught.value)
    assert "kernel 'scatter_plain': data race on argument 1 'bins'" in message
    assert "element " in message and "by block (" in message and "thread (" in message
    assert "without an atomic" in message


def test_the_race_names_both_threads_of_the_first_conflict(module):
    # Two threads only, one block: thread 16 adds into the bin thread 0 wrote.
    x = np.ones(32, dtype=np.float32)
    bins = np.zeros(16, dtype=np.float32)
    with pytest.raises(emulator.RaceCheckError,
                       match=r"element 0: written by block \(0, 0, 0\) thread \(0, 0, 0\), then "
                             r"read by block \(0, 0, 0\) thread \(16, 0, 0\)"):
        racecheck(module, "scatter_plain", (x, bins, np.int32(32), np.int32(16)),
                  grid=(1,), block=(32,))


def test_atomic_scatter_is_not_a_race(module, rng):
    x = rng.standard_normal(1024, dtype=np.float32)
    bins = np.zeros(16, dtype=np.float32)
    racecheck(module, "scatter_atomic", (x, bins, np.int32(x.size), np.int32(bins.size)))
    expected = x.astype(np.float64).reshape(-1, 16).sum(axis=0)
    np.testing.assert_allclose(bins, expected, rtol=1e-4, atol=1e-4)


def test_shared_memory_read_before_the_barrier_is_a_race(module, rng):
    x = rng.standard_normal(1024, dtype=np.float32)
    with pytest.raises(emulator.RaceCheckError,
                       match=r"data race on shared memory, byte offset 4: read by block "
                             r"\(0, 0, 0\) thread \(0, 0, 0\), then written by block \(0, 0, 0\) "
                             r"thread \(1, 0, 0\), without a __syncthreads\(\)"):
        racecheck(module, "shared_read_before_barrier", (x, np.zeros_like(x)))


def test_shared_memory_read_after_the_barrier_is_not_a_race(module, rng):
    x = rng.standard_normal(1024, dtype=np.float32)
    y = np.zeros_like(x)
    racecheck(module, "shared_read_after_barrier", (x, y))
    np.testing.assert_array_equal(y, np.roll(x.reshape(8, 128), -1, axis=1).ravel())


def test_disjoint_writes_and_shared_reads_are_not_races(module, rng):
    x = rng.standard_normal(1024, dtype=np.float32)
    y = np.zeros_like(x)
    racecheck(module, "copy", (x, y, np.int32(x.size)))
    racecheck(module, "broadcast", (x, y, np.int32(x.size)))
    np.testing.assert_array_equal(y, np.full_like(x, x[0]))


def test_the_planted_plain_add_in_deform_col2im_is_a_race(monkeypatch):
    """Issue 17's survivor: col2im's atomicAdd turned into `+=` passed every numeric
    test (at most 2 blocks per sample there). The racecheck finds it at a test shape."""
    import torch

    from harness import registry
    from harness.cases import make_case
    from kernels import launch
    from kernels.cuda_sources import CudaSource

    registry.load_all()
    impl = registry.get_implementation("deform_conv2d", "cupy")
    case = make_case(registry.get_operator("deform_conv2d"),
                     {"N": 1, "C_in": 8, "C_out": 4, "H": 8, "W": 8}, "float32", "random")
    inputs = case.op.make_inputs(case.params, torch.float32, "cpu",
                                 torch.Generator().manual_seed(0), case.mode)

    def gradients():
        leaf = inputs["input"].detach().requires_grad_()
        out = impl.forward({**inputs, "input": leaf}, case.params)
        with emulator.mode("racecheck"):
            return torch.autograd.grad(out, [leaf], torch.ones_like(out))

    gradients()  # the kernel as it is: no race
    atomic = "grad_in.add(s.corner[q], s.weight[q] * masked_g);"  # a float atomicAdd
    original = CudaSource.code

    def planted(self):
        text = original(self)
        if self.filename == "deform_conv2d.cu":
            assert atomic in text, "the scatter this test plants a race in has changed"
            text = text.replace(atomic,
                                "grad_in.values[s.corner[q]] += s.weight[q] * masked_g;")
        return text

    monkeypatch.setattr(CudaSource, "code", planted)
    monkeypatch.setattr(launch, "_modules", {})
    with pytest.raises(emulator.RaceCheckError,
                       match=r"kernel 'deform_col2im<float, false>': data race on argument 4 "
                             r"'grad_input'"):
        gradients()


def test_an_in_place_update_through_aliased_arguments_is_not_a_race(rng):
    kernel = emulator.RawKernel(r"""
extern "C" __global__ void add_in_place(const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] += x[i];
}""", "add_in_place")
    y = rng.standard_normal(1000, dtype=np.float32)
    expected = 2 * y
    with emulator.mode("racecheck"):
        kernel((4,), (256,), (y, y, np.int32(y.size)))
    np.testing.assert_array_equal(y, expected)


def test_a_barrier_removed_from_dcnv3_direct_backwards_reduction_is_a_race(monkeypatch):
    """The tree reduction of the offset gradients in shared memory reads a partner's
    partial sum that the partner wrote in the same round once its barrier is gone."""
    import torch

    from harness import registry
    from harness.cases import make_case
    from kernels import launch
    from kernels.cuda_sources import CudaSource

    registry.load_all()
    impl = registry.get_implementation("dcnv3", "cupy_direct")
    case = make_case(registry.get_operator("dcnv3"),
                     {"N": 1, "H": 6, "W": 6, "group": 2, "group_channels": 16}, "float32",
                     "random")
    inputs = case.op.make_inputs(case.params, torch.float32, "cpu",
                                 torch.Generator().manual_seed(0), case.mode)

    def gradients():
        leaf = inputs["offset"].detach().requires_grad_()
        out = impl.forward({**inputs, "offset": leaf}, case.params)
        with emulator.mode("racecheck"):
            return torch.autograd.grad(out, [leaf], torch.ones_like(out))

    gradients()  # the kernel as it is: no race
    barrier = """                    partial[k][threadIdx.x] += partial[k][threadIdx.x + span];
            __syncthreads();"""
    original = CudaSource.code

    def planted(self):
        text = original(self)
        if self.filename == "dcnv3_direct.cu":
            assert barrier in text, "the reduction this test removes a barrier from has changed"
            text = text.replace(barrier, barrier.replace("__syncthreads();", ""))
        return text

    monkeypatch.setattr(CudaSource, "code", planted)
    monkeypatch.setattr(launch, "_modules", {})
    with pytest.raises(emulator.RaceCheckError,
                       match=r"kernel 'dcnv3_direct_backward<float, 0>': data race on shared "
                             r"memory, byte offset \d+: .* without a __syncthreads\(\)"):
        gradients()


WARP_EXCHANGE = r"""
extern "C" __global__ void exchange(int* out, int sync) {
  __shared__ int value[64];
  value[threadIdx.x] = threadIdx.x;
  if (sync == 1) __syncwarp();
  // Half the warp syncs, then reads what the other half wrote: a race.
  if (sync == 2 && threadIdx.x % 32 < 16) __syncwarp(0xffffu);
  out[threadIdx.x] = value[threadIdx.x ^ (sync == 2 ? 16 : 1)];
}
"""


@pytest.mark.parametrize(("sync", "race"), [(1, False), (0, True), (2, True)],
                         ids=["syncwarp", "none", "half-warp"])
def test_a_whole_warp_syncwarp_orders_its_lanes_exchange_through_shared_memory(sync, race):
    kernel = emulator.RawModule(code=WARP_EXCHANGE).get_function("exchange")
    out = np.zeros(64, dtype=np.int32)
    with emulator.mode("racecheck"):
        if race:
            with pytest.raises(emulator.RaceCheckError, match=r"data race on shared memory"):
                kernel((1,), (64,), (out, np.int32(sync)))
        else:
            kernel((1,), (64,), (out, np.int32(sync)))
            np.testing.assert_array_equal(out, np.arange(64) ^ 1)
