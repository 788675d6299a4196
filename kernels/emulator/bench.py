"""Emulator speed: emulated CUDA threads per second on one core.

    python -m kernels.emulator.bench [--threads N]

Two kernels: a barrier-free elementwise one (the fast path: each CUDA thread
is a plain call) and a barrier-heavy shared-memory tree reduction (one fiber
per CUDA thread, 9 __syncthreads() per thread for 256-thread blocks). Then
tensor cores: a __half GEMM through nvcuda::wmma, one warp per 16 x 16 tile of
the output, in mma_sync (with their two fragment loads) per second.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

# Separate modules: one barrier anywhere in a module sends all its kernels
# through the scheduler, which would hide the fast path.
BARRIER_FREE_SOURCE = r"""
extern "C" __global__ void axpb(const float* x, float* y, float a, float b, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = fmaf(a, x[i], b);
}
"""

BARRIER_HEAVY_SOURCE = r"""
extern "C" __global__ void tree_sum(const float* x, float* sums, int n) {
  __shared__ float partial[256];
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  partial[threadIdx.x] = i < n ? x[i] : 0.0f;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) sums[blockIdx.x] = partial[0];
}
"""


WMMA_SOURCE = r"""
#include <mma.h>
using namespace nvcuda;
// C = A B for row-major A (rows x depth) and column-major B (depth x cols).
extern "C" __global__ void gemm(const __half* a, const __half* b, float* c, int cols, int depth) {
  const int warp = blockIdx.x, row = warp / (cols / 16) * 16, col = warp % (cols / 16) * 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> accumulator;
  wmma::fill_fragment(accumulator, 0.0f);
  for (int p = 0; p < depth; p += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
    wmma::load_matrix_sync(fa, a + row * depth + p, depth);
    wmma::load_matrix_sync(fb, b + col * depth + p, depth);
    wmma::mma_sync(accumulator, fa, fb, accumulator);
  }
  wmma::store_matrix_sync(c + row * cols + col, accumulator, cols, wmma::mem_row_major);
}
"""


def threads_per_second(launch, threads: int, repeats: int = 3) -> float:
    launch()  # warm-up: first-touch of stacks and buffers
    best = min(_timed(launch) for _ in range(repeats))
    return threads / best


def _timed(launch) -> float:
    start = time.perf_counter()
    launch()
    return time.perf_counter() - start


def measure(n_fast: int = 1 << 24, n_barrier: int = 1 << 20) -> dict[str, float]:
    """Threads per second of each kernel, with the results checked."""
    from kernels import emulator

    rng = np.random.default_rng(0)
    block = 256
    fast = emulator.RawModule(code=BARRIER_FREE_SOURCE).get_function("axpb")
    x = rng.standard_normal(n_fast, dtype=np.float32)
    y = np.empty_like(x)
    fast_args = (x, y, np.float32(2.0), np.float32(1.0), np.int32(n_fast))
    fast_rate = threads_per_second(
        lambda: fast((n_fast // block,), (block,), fast_args), n_fast)
    np.testing.assert_allclose(y, 2 * x + 1, rtol=1e-6)

    tree = emulator.RawModule(code=BARRIER_HEAVY_SOURCE).get_function("tree_sum")
    x = rng.standard_normal(n_barrier, dtype=np.float32)
    sums = np.empty(n_barrier // block, dtype=np.float32)
    barrier_rate = threads_per_second(
        lambda: tree((n_barrier // block,), (block,), (x, sums, np.int32(n_barrier))), n_barrier)
    np.testing.assert_allclose(sums, x.reshape(-1, block).sum(axis=1), rtol=1e-4, atol=1e-4)
    return {"barrier-free": fast_rate, "barrier-heavy": barrier_rate}


def mma_per_second(size: int = 128, depth: int = 256) -> float:
    """mma_sync (16 x 16 x 16, with their fragment loads) per second of a
    size x size x depth __half GEMM, the result checked."""
    import torch  # 64-byte aligned allocations: wmma wants 32

    from kernels import emulator

    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.integers(-2, 3, (size, depth)).astype(np.float16)).clone()
    b = torch.from_numpy(rng.integers(-2, 3, (size, depth)).astype(np.float16)).clone()  # B^T
    c = torch.full((size, size), float("nan"))
    gemm = emulator.RawModule(code=WMMA_SOURCE).get_function("gemm")
    tiles = (size // 16) ** 2
    rate = threads_per_second(
        lambda: gemm((tiles,), (32,), (a, b, c, np.int32(size), np.int32(depth))),
        tiles * depth // 16)
    np.testing.assert_array_equal(c.numpy(), a.double().numpy() @ b.double().numpy().T)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="OS threads (default: one core)")
    options = parser.parse_args()
    os.environ["DCNBENCH_EMULATOR_THREADS"] = str(options.threads)
    for name, rate in measure().items():
        print(f"{name:>14}: {rate / 1e6:8.1f} M emulated threads/s on {options.threads} core(s)")
    print(f"{'wmma':>14}: {mma_per_second() / 1e3:8.1f} k mma_sync/s on {options.threads} core(s)")


if __name__ == "__main__":
    main()
