"""The execution modes on correct kernels: results must come back unchanged,
aliasing must survive memcheck's copies, and ASan must stay quiet on fibers."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import emulator

SOURCE = r"""
extern "C" __global__ void add_in_place(const float* x, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] += x[i];
}
"""

REDUCE_SOURCE = r"""
extern "C" __global__ void reverse_block(const float* x, float* y) {
  extern __shared__ float staged[];
  staged[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  float v = staged[blockDim.x - 1 - threadIdx.x];
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  y[blockIdx.x * blockDim.x + threadIdx.x] = v;
}
"""


def test_memcheck_keeps_aliased_arguments_aliased(rng):
    kernel = emulator.RawKernel(SOURCE, "add_in_place")
    y = rng.standard_normal(300, dtype=np.float32)
    expected = 2 * y
    with emulator.mode("memcheck"):
        kernel((2,), (256,), (y, y, np.int32(y.size)))
    np.testing.assert_array_equal(y, expected)


def test_environment_selects_the_mode_and_the_context_manager_wins(monkeypatch):
    monkeypatch.setenv("DCNBENCH_EMULATOR_MODE", "memcheck")
    assert emulator.current_mode() == "memcheck"
    with emulator.mode("normal"):
        assert emulator.current_mode() == "normal"
    with pytest.raises(ValueError, match="unknown emulator mode 'helgrind'"):
        emulator.mode("helgrind").__enter__()


def test_asan_mode_runs_fibers_cleanly_and_returns_results(rng):
    kernel = emulator.RawKernel(REDUCE_SOURCE, "reverse_block")
    x = rng.standard_normal(128, dtype=np.float32)
    y = np.zeros_like(x)
    with emulator.mode("asan"):
        kernel((2,), (64,), (x, y), shared_mem=64 * 4)
    reversed_blocks = x.reshape(2, 64)[:, ::-1].ravel()
    expected = reversed_blocks + reversed_blocks.reshape(-1, 2)[:, ::-1].ravel()
    np.testing.assert_array_equal(y, expected)


ALIASED_SOURCE = r"""
extern "C" __global__ void fill_halves(float* low, float* high, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n / 2) low[i] = 1.0f;
  else if (i < n) high[i] = 2.0f;
}
"""


@pytest.mark.parametrize("mode", ["asan", "memcheck"])
def test_writes_through_two_aliased_arguments_both_land(mode, rng):
    # dcnv4's backward passes one buffer as grad_offset and grad_mask.
    kernel = emulator.RawKernel(ALIASED_SOURCE, "fill_halves")
    y = rng.standard_normal(300, dtype=np.float32)
    with emulator.mode(mode):
        kernel((2,), (256,), (y, y, np.int32(y.size)))
    np.testing.assert_array_equal(y, np.repeat(np.float32([1, 2]), 150))


def test_asan_mode_shares_one_allocation_between_overlapping_arguments(rng):
    kernel = emulator.RawKernel(ALIASED_SOURCE, "fill_halves")
    y = rng.standard_normal(310, dtype=np.float32)
    untouched = y[150:160].copy()
    with emulator.mode("asan"):
        # high starts 10 floats into low: high[i] is low[i + 10].
        kernel((2,), (256,), (y, y[10:], np.int32(300)))
    np.testing.assert_array_equal(y[:150], np.ones(150, np.float32))
    np.testing.assert_array_equal(y[150:160], untouched)
    np.testing.assert_array_equal(y[160:], np.full(150, 2, np.float32))


NULLABLE_SOURCE = r"""
extern "C" __global__ void scale_or_negate(const float* scale, float* y, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = scale ? y[i] * scale[0] : -y[i];
}
"""


@pytest.mark.parametrize("mode", ["normal", "memcheck", "asan", "counters", "racecheck"])
@pytest.mark.parametrize("null", [None, "empty tensor"], ids=["None", "empty"])
def test_null_pointers_arrive_as_null_in_every_mode(mode, null):
    import torch

    kernel = emulator.RawKernel(NULLABLE_SOURCE, "scale_or_negate")
    pointer = None if null is None else torch.empty(0)
    y = np.arange(1, 9, dtype=np.float32)
    with emulator.mode(mode):
        kernel((1,), (32,), (pointer, y, np.int32(y.size)))
        np.testing.assert_array_equal(y, -np.arange(1, 9, dtype=np.float32))
        kernel((1,), (32,), (np.full(1, 3, np.float32), y, np.int32(y.size)))
    np.testing.assert_array_equal(y, -3 * np.arange(1, 9, dtype=np.float32))
