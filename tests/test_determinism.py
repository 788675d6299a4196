"""The deterministic scatter-add (``kernels/cuda/deterministic_atomics.cuh``) and
its host side (``kernels/determinism.py``), on the emulator.

A test kernel adds the same values to a few elements in two different orders
(threads run in order within a block on the emulator, so a permutation of the
values is a different order of atomics). Fixed point must give the same bits
for both orders; float atomics, the control, must not (or the orders chosen
would prove nothing).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kernels import determinism, emulator
from kernels.cuda_sources import COMPILE_OPTIONS

SOURCE = r"""
#include "deterministic_atomics.cuh"

// values[i] goes to sums[target[i]] through a ScatterAdd.
extern "C" __global__ void scatter(const float* values, const int* target, int n,
                                   float* float_sums, long long* fixed_sums, double scale,
                                   int* status) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const ScatterAdd<float> sums{float_sums, fixed_sums, scale, status};
    sums.add(target[i], values[i]);
}
"""
ELEMENTS = 3


@pytest.fixture(scope="module")
def scatter() -> emulator.RawKernel:
    return emulator.RawModule(code=SOURCE, options=COMPILE_OPTIONS).get_function("scatter")


def run_scatter(
    scatter, values: np.ndarray, target: np.ndarray, deterministic: bool, scale: float | None = None
) -> tuple[np.ndarray, int]:
    """Sums of ``values`` per ``target`` element, and the status word."""
    n = values.size
    args = (values, target.astype(np.int32), np.int32(n))
    status = np.zeros(1, dtype=np.int32)
    if deterministic:
        max_abs = float(np.abs(values).max())
        fixed = np.zeros(ELEMENTS, dtype=np.int64)
        scale = determinism.fixed_point_scale(max_abs, n) if scale is None else scale
        scatter((1,), (n,), (*args, None, fixed, np.float64(scale), status))
        return fixed.astype(np.float64) / scale, int(status[0])
    sums = np.zeros(ELEMENTS, dtype=np.float32)
    scatter((1,), (n,), (*args, sums, None, np.float64(0), status))
    return sums.astype(np.float64), int(status[0])


def values_with_cancellation(n: int) -> np.ndarray:
    """Magnitudes over 12 binary orders: a float sum depends on the order."""
    rng = np.random.default_rng(0)
    return (rng.standard_normal(n) * 2.0 ** rng.integers(-6, 6, n)).astype(np.float32)


def test_fixed_point_sums_do_not_depend_on_the_order(scatter):
    kernel = scatter
    n = 512
    values = values_with_cancellation(n)
    target = np.arange(n) % ELEMENTS
    order = np.random.default_rng(1).permutation(n)
    forward, status = run_scatter(kernel, values, target, deterministic=True)
    permuted, permuted_status = run_scatter(kernel, values[order], target[order], True)
    assert status == permuted_status == 0
    np.testing.assert_array_equal(forward, permuted)
    # Exact to within the documented bound: addends · 0.5 / scale per element.
    exact = np.array([values[target == e].astype(np.float64).sum() for e in range(ELEMENTS)])
    scale = determinism.fixed_point_scale(float(np.abs(values).max()), n)
    assert np.abs(forward - exact).max() <= n * 0.5 / scale

    # The control: float atomics over the same two orders differ.
    float_forward, _ = run_scatter(kernel, values, target, deterministic=False)
    float_permuted, _ = run_scatter(kernel, values[order], target[order], False)
    assert not np.array_equal(float_forward, float_permuted)


def test_overflow_and_non_finite_values_are_flagged(scatter):
    values = np.ones(8, dtype=np.float32)
    target = np.zeros(8, dtype=np.int32)
    # A scale whose bound ignores the count: the running sum wraps.
    _, status = run_scatter(scatter, values, target, True, scale=2.0**62 - 2.0**40)
    assert status == determinism.OVERFLOW
    # One value alone beyond 2^62.
    _, status = run_scatter(scatter, values, target, True, scale=2.0**63)
    assert status == determinism.OVERFLOW
    values[3] = np.nan
    _, status = run_scatter(scatter, values, target, True)
    assert status == determinism.NONFINITE


@pytest.mark.parametrize("max_abs, addends", [(1.0, 1), (3.7, 9 * 400), (1e-30, 7), (6e4, 2**20)])
def test_fixed_point_scale_is_the_largest_power_of_two_in_range(max_abs, addends):
    scale = determinism.fixed_point_scale(max_abs, addends)
    assert math.frexp(scale)[0] == 0.5  # a power of two
    assert max_abs * scale * addends <= 2.0**62 < 2 * max_abs * scale * addends


def test_fixed_point_scale_bad_count():
    with pytest.raises(ValueError, match="max_addends must be >= 1, got 0"):
        determinism.fixed_point_scale(1.0, 0)


def test_result_raises_on_overflow_and_is_nan_on_non_finite():
    sums = determinism.FixedPointSum((2, 3), "cpu", max_abs=1.0, max_addends=4)
    sums.sums.fill_(int(sums.scale) * 3)
    assert torch.equal(sums.result(torch.float32), torch.full((2, 3), 3.0))
    sums.status.fill_(determinism.NONFINITE)
    assert sums.result(torch.float16).isnan().all()
    sums.status.fill_(determinism.OVERFLOW)
    with pytest.raises(RuntimeError, match="overflowed int64"):
        sums.result(torch.float32)


def test_alert_is_pytorchs_error_only_in_deterministic_mode():
    determinism.alert_not_deterministic("op backward")  # mode off: nothing
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="op backward does not have a deterministic"):
            determinism.alert_not_deterministic("op backward")
    finally:
        torch.use_deterministic_algorithms(False)


def test_max_abs():
    assert determinism.max_abs(None) == 1.0
    assert determinism.max_abs(torch.empty(0, 3)) == 0.0
    assert determinism.max_abs(torch.tensor([1.5, -2.25], dtype=torch.float16)) == 2.25
