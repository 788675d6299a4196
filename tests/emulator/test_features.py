"""Feature kernels (kernels/features.cu) against NumPy: shuffles, shared
memory, atomics, half / bfloat16, vector loads, templates, 3-D launches."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from kernels import emulator

AXPY_INSTANCES = ("axpy<float, 4>", "axpy<__half, 2>", "axpy<__nv_bfloat16, 1>")


@pytest.fixture(scope="module")
def features(kernel_source) -> emulator.RawModule:
    return emulator.RawModule(code=kernel_source("features.cu"), options=("-std=c++17",),
                              name_expressions=AXPY_INSTANCES)


def test_block_reduction_with_shuffles_and_shared_memory(features, rng):
    n, block = 5000, 256
    x = rng.standard_normal(n, dtype=np.float32)
    blocks = -(-n // block)
    sums = np.full(blocks, np.nan, dtype=np.float32)
    features.get_function("block_sum")((blocks,), (block,), (x, sums, np.int32(n)))
    expected = np.pad(x, (0, blocks * block - n)).reshape(blocks, block).sum(axis=1)
    np.testing.assert_allclose(sums, expected, rtol=1e-5, atol=1e-4)


def test_shared_memory_transpose_on_a_2d_grid(features, rng):
    rows, cols = 70, 45
    matrix = rng.standard_normal((rows, cols), dtype=np.float32)
    out = np.zeros((cols, rows), dtype=np.float32)
    grid = (-(-cols // 32), -(-rows // 32))
    features.get_function("transpose")(grid, (32, 8), (matrix, out, np.int32(rows), np.int32(cols)))
    np.testing.assert_array_equal(out, matrix.T)


def test_atomic_histogram_in_dynamic_shared_memory(features, rng):
    bins, n = 100, 20000
    values = rng.integers(0, bins, n, dtype=np.int32)
    counts = np.zeros(bins, dtype=np.uint32)
    features.get_function("histogram")((4,), (128,), (values, np.int32(n), counts, np.int32(bins)),
                                       shared_mem=bins * 4)
    np.testing.assert_array_equal(counts, np.bincount(values, minlength=bins))


@pytest.mark.parametrize("name", AXPY_INSTANCES)
def test_templated_kernel_through_name_expressions(features, rng, name):
    dtype = {"float": np.float32, "__half": np.float16,
             "__nv_bfloat16": ml_dtypes.bfloat16}[name.split("<")[1].split(",")[0]]
    unroll = int(name.split(",")[1].rstrip(">"))
    n = 1000
    x = rng.standard_normal(n).astype(dtype)
    y = rng.standard_normal(n).astype(dtype)
    expected = (np.float32(1.5) * x.astype(np.float32) + y.astype(np.float32)).astype(dtype)
    threads = -(-n // unroll)
    features.get_function(name)((-(-threads // 128),), (128,), (x, y, np.float32(1.5), np.int32(n)))
    tolerance = {np.float32: 1e-6, np.float16: 1e-3, ml_dtypes.bfloat16: 8e-3}[dtype]
    np.testing.assert_allclose(y.astype(np.float32), expected.astype(np.float32),
                               rtol=tolerance, atol=tolerance)


def test_half_arithmetic_and_atomics(features, rng):
    n = 256
    a = (rng.integers(-4, 5, n) / 4).astype(np.float16)  # quarters: every sum is exact
    b = rng.standard_normal(n).astype(np.float16)
    fma_out, sqrt_out = np.empty_like(a), np.empty_like(a)
    total = np.zeros(1, dtype=np.float16)
    features.get_function("half_ops")((2,), (128,), (a, b, fma_out, sqrt_out, total, np.int32(n)))
    fused = (a.astype(np.float64) * b + 1).astype(np.float16)  # __hfma rounds once
    np.testing.assert_array_equal(fma_out, fused * a + b)  # float16 ops round each step
    np.testing.assert_array_equal(sqrt_out, np.sqrt(np.abs(a).astype(np.float32)).astype(np.float16))
    assert total[0] == a.astype(np.float64).sum()


def test_bfloat16_arithmetic_and_atomics_with_torch_tensors(features, rng):
    n = 64
    a = torch.tensor(rng.integers(-2, 3, n), dtype=torch.bfloat16)  # small integers: exact sums
    pairs = torch.tensor(rng.integers(-8, 9, 2 * n) / 4, dtype=torch.bfloat16)
    out, pair_out = torch.empty_like(a), torch.empty_like(pairs)
    total = torch.zeros(1, dtype=torch.bfloat16)
    features.get_function("bfloat16_ops")((1,), (64,), (a, pairs, out, pair_out, total, np.int32(n)))
    assert torch.equal(out, a * a - 0.5)
    assert torch.equal(pair_out, pairs * pairs)
    assert total.item() == a.double().sum().item()


def test_16_byte_vector_loads(features, rng):
    n = 4 * 300
    x = rng.standard_normal(n, dtype=np.float32)
    y = np.empty_like(x)
    features.get_function("scale_float4")((3,), (128,), (x, y, np.float32(2.5), np.int32(n // 4)))
    expected = x.reshape(-1, 4) * np.float32(2.5)
    expected[:, 3] = np.clip(x.reshape(-1, 4)[:, 3], 0, 1)
    np.testing.assert_array_equal(y.reshape(-1, 4), expected)


def test_three_dimensional_grid_and_block(features):
    nx, ny, nz = 10, 5, 3
    out = np.full((nz, ny, nx, 3), -1, dtype=np.int32)
    features.get_function("coordinates")((3, 2, 2), (4, 3, 2),
                                         (out, np.int32(nx), np.int32(ny), np.int32(nz)))
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    np.testing.assert_array_equal(out, np.stack([x, y, z], axis=-1))


def test_votes_xor_and_up_shuffles_and_syncthreads_count(features, rng):
    blocks, block = 2, 64
    threads = blocks * block
    flags = rng.integers(0, 2, threads, dtype=np.int32)
    flags[32:64] = 1  # one warp where __all_sync holds
    ballots = np.zeros(threads // 32, dtype=np.uint32)
    all_any = np.zeros(2 * threads // 32, dtype=np.int32)
    xor_sums = np.zeros(threads, dtype=np.float32)
    prefix = np.zeros(threads, dtype=np.int32)
    block_count = np.zeros(blocks, dtype=np.int32)
    features.get_function("warp_votes")((blocks,), (block,),
                                        (flags, ballots, all_any, xor_sums, prefix, block_count))
    warps = flags.reshape(-1, 32)
    np.testing.assert_array_equal(ballots, (warps << np.arange(32)).sum(axis=1).astype(np.uint32))
    np.testing.assert_array_equal(all_any[0::2], warps.all(axis=1))
    np.testing.assert_array_equal(all_any[1::2], warps.any(axis=1))
    np.testing.assert_array_equal(xor_sums, np.repeat(np.arange(threads).reshape(-1, 32).sum(1), 32))
    np.testing.assert_array_equal(prefix, np.cumsum(warps, axis=1).ravel())
    np.testing.assert_array_equal(block_count, flags.reshape(blocks, -1).sum(axis=1))


def test_failed_device_assert_raises_instead_of_aborting(features):
    index = np.arange(32, dtype=np.int32)
    features.get_function("checked_index")((1,), (32,), (index, np.int32(32)))
    index[7] = 99
    with pytest.raises(emulator.KernelTrapError, match=r"thread \(7, 0, 0\).*index\[threadIdx.x\] < n"):
        features.get_function("checked_index")((1,), (32,), (index, np.int32(32)))
