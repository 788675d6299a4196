"""The counters mode on kernels whose warp-level traffic is known by hand
(tests/emulator/kernels/traced.cu): sectors per request, efficiency, distinct
sectors, atomics, and that the results of the launch are unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import emulator

THREADS = 1024  # 4 blocks of 256: 32 warps
WARPS = THREADS // 32


@pytest.fixture(scope="module")
def module(kernel_source):
    return emulator.RawModule(code=kernel_source("traced.cu"))


def counted(module, name, args, grid=(4,), block=(256,), shared_mem=0):
    kernel = module.get_function(name)
    with emulator.mode("counters"), emulator.recording() as launches:
        kernel(grid, block, args, shared_mem=shared_mem)
    assert len(launches) == 1
    return launches[0]


def buffer(launch, name):
    return next(b for b in launch.buffers if b.name == name)


def test_coalesced_copy_moves_four_sectors_per_request(module, rng):
    x = rng.standard_normal(THREADS, dtype=np.float32)
    y = np.full_like(x, np.nan)
    launch = counted(module, "copy", (x, y, np.int32(THREADS)))
    np.testing.assert_array_equal(y, x)  # the traced build computes the same
    load, store = launch.total("load"), launch.total("store")
    assert (load.requests, load.sectors, load.efficiency) == (WARPS, 4 * WARPS, 1.0)
    assert (store.requests, store.sectors, store.efficiency) == (WARPS, 4 * WARPS, 1.0)
    assert launch.total("atomic").requests == 0
    assert buffer(launch, "x").distinct_read_sectors == THREADS * 4 // 32
    assert buffer(launch, "y").distinct_written_sectors == THREADS * 4 // 32
    assert launch.dram_bytes == 2 * THREADS * 4
    assert (launch.threads, launch.blocks) == (THREADS, 4)


def test_stride_32_gather_touches_a_sector_per_lane(module, rng):
    x = rng.standard_normal(32 * THREADS, dtype=np.float32)
    y = np.full(THREADS, np.nan, dtype=np.float32)
    launch = counted(module, "gather_stride32", (x, y, np.int32(THREADS)))
    np.testing.assert_array_equal(y, x[::32])
    load = launch.total("load")
    assert (load.requests, load.sectors_per_request, load.efficiency) == (WARPS, 32.0, 1 / 8)


def test_broadcast_is_one_sector_per_request(module, rng):
    x = rng.standard_normal(8, dtype=np.float32)
    y = np.full(THREADS, np.nan, dtype=np.float32)
    launch = counted(module, "broadcast", (x, y, np.int32(THREADS)))
    load = launch.total("load")
    assert (load.requests, load.sectors, load.bytes_requested, load.bytes_useful) == (
        WARPS, WARPS, 4 * THREADS, 4 * WARPS)
    assert buffer(launch, "x").distinct_read_sectors == 1


def test_vector_loads_are_16_sectors_per_request_and_a_quarter_of_the_requests(module, rng):
    x = rng.standard_normal(4 * THREADS, dtype=np.float32)
    y = np.full_like(x, np.nan)
    vector = counted(module, "copy_vector", (x, y, np.int32(THREADS)))
    np.testing.assert_array_equal(y, x)
    scalar = counted(module, "copy", (x, np.full_like(x, np.nan), np.int32(x.size)),
                     grid=(16,))
    for kind in ("load", "store"):
        v, s = vector.total(kind), scalar.total(kind)
        assert (v.requests, v.sectors_per_request, v.efficiency) == (WARPS, 16.0, 1.0)
        assert (s.requests, v.sectors) == (4 * v.requests, s.sectors)


def test_a_vector_load_split_into_words_is_still_one_request(module, rng):
    x = rng.standard_normal(4 * THREADS, dtype=np.float32)
    y = np.full(THREADS, np.nan, dtype=np.float32)
    launch = counted(module, "sum_vector_words", (x, y, np.int32(THREADS)))
    np.testing.assert_allclose(y, x.reshape(-1, 4).sum(axis=1), rtol=1e-6)
    load = launch.total("load")
    assert (load.requests, load.sectors_per_request, load.efficiency) == (WARPS, 16.0, 1.0)


def test_neighbouring_scalar_loads_stay_two_requests(module, rng):
    x = rng.standard_normal(2 * THREADS, dtype=np.float32)
    y = np.full(THREADS, np.nan, dtype=np.float32)
    launch = counted(module, "pair_sum", (x, y, np.int32(THREADS)))
    load = launch.total("load")
    assert (load.requests, load.sectors_per_request, load.efficiency) == (2 * WARPS, 8.0, 0.5)


def test_a_loop_over_contiguous_pairs_is_not_taken_for_vectors(module, rng):
    x = rng.standard_normal(8 * THREADS, dtype=np.float32)
    y = np.full(THREADS, np.nan, dtype=np.float32)
    launch = counted(module, "pairs_in_a_loop", (x, y, np.int32(THREADS), np.int32(4)))
    load = launch.total("load")
    # Lane stride 32 bytes: each of the 8 scalar loads touches one sector per lane.
    assert (load.requests, load.sectors_per_request) == (8 * WARPS, 32.0)


def test_atomics_on_one_address_are_one_sector_per_warp(module, rng):
    x = rng.standard_normal(THREADS, dtype=np.float32)
    bins = np.zeros(1, dtype=np.float32)
    launch = counted(module, "histogram_one_bin", (x, bins, np.int32(THREADS)))
    np.testing.assert_allclose(bins[0], x.astype(np.float64).sum(), rtol=1e-4)
    atomic = launch.total("atomic")
    assert (atomic.requests, atomic.sectors, atomic.bytes_requested) == (WARPS, WARPS, 4 * THREADS)
    assert launch.total("load").requests == WARPS  # x only: the CAS loop is not traffic
    assert buffer(launch, "bins").distinct_written_sectors == 1


def test_divergent_branch_is_one_request_at_half_efficiency(module, rng):
    x = rng.standard_normal(THREADS, dtype=np.float32)
    y = np.zeros_like(x)
    launch = counted(module, "divergent_store", (x, y, np.int32(THREADS)))
    store = launch.total("store")
    assert (store.requests, store.sectors, store.efficiency) == (WARPS, 4 * WARPS, 0.5)
    # The loads are in the same branch: only even lanes read, half the bytes of each sector.
    assert launch.total("load").bytes_useful == 4 * THREADS // 2


def test_shared_memory_is_not_global_traffic(module, rng):
    x = rng.standard_normal(THREADS, dtype=np.float32)
    y = np.full_like(x, np.nan)
    launch = counted(module, "reverse_in_block", (x, y))
    np.testing.assert_array_equal(y, x.reshape(4, 256)[:, ::-1].ravel())
    assert launch.total("load").sectors == launch.total("store").sectors == 4 * WARPS


@pytest.mark.parametrize(("stride", "ways"), [(0, 1), (1, 1), (2, 2), (8, 8), (32, 32)])
def test_shared_memory_wavefronts_count_bank_conflicts(module, rng, stride, ways):
    x = rng.standard_normal(32 * 32, dtype=np.float32)
    y = np.full(128, np.nan, dtype=np.float32)
    launch = counted(module, "shared_stride", (x, y, np.int32(stride)), grid=(1,), block=(128,))
    np.testing.assert_array_equal(y, x[(np.arange(128) * stride) % 1024])
    fill, read = launch.shared["store"], launch.shared["load"]
    assert (fill.requests, fill.wavefronts_per_request) == (4 * 8, 1.0)  # 8 rounds, 4 warps
    assert (read.requests, read.wavefronts_per_request) == (4, ways)


def test_launches_outside_recording_are_not_kept_and_normal_mode_is_untraced(module, rng):
    x = rng.standard_normal(THREADS, dtype=np.float32)
    kernel = module.get_function("copy")
    with emulator.recording() as launches:
        kernel((4,), (256,), (x, np.zeros_like(x), np.int32(THREADS)))
    assert launches == []
