"""Planted bugs (kernels/planted_bugs.cu) the emulator must catch, each
beyond what a GPU run would tell: a missing barrier shows as NaN, an
out-of-bounds write or read as an error naming the argument, a divergent
barrier as a deadlock report, a mistyped argument before any launch."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import emulator


@pytest.fixture(scope="module")
def bugs(kernel_source) -> emulator.RawModule:
    return emulator.RawModule(code=kernel_source("planted_bugs.cu"))


def test_missing_syncthreads_reads_poisoned_shared_memory(bugs, rng):
    block, blocks = 256, 8
    x = rng.standard_normal(block * blocks, dtype=np.float32)
    sums = np.zeros(blocks, dtype=np.float32)
    bugs.get_function("tree_sum_missing_sync")((blocks,), (block,), (x, sums, np.int32(x.size)))
    # Shared memory starts as NaN: the partials read before their writer ran.
    assert np.isnan(sums).all()


def test_out_of_bounds_write_is_caught_by_memcheck(bugs, rng):
    n = 1000
    x = rng.standard_normal(n, dtype=np.float32)
    y = np.zeros(n, dtype=np.float32)
    with emulator.mode("memcheck"), pytest.raises(emulator.MemcheckError) as caught:
        bugs.get_function("copy_off_by_one")((4,), (256,), (x, y, np.int32(n)))
    message = str(caught.value)
    assert "argument 1 'y'" in message
    assert "4 byte(s) written past its end, at byte offsets 4000..4003 of a 4000-byte array" in message
    assert "argument 0" not in message
    np.testing.assert_array_equal(y, x)  # the in-bounds results are copied back


def test_out_of_bounds_read_is_caught_by_address_sanitizer(bugs, rng):
    n = 1000
    x = rng.standard_normal(n, dtype=np.float32)
    y = np.zeros(n, dtype=np.float32)
    with emulator.mode("asan"), pytest.raises(emulator.AddressSanitizerError) as caught:
        bugs.get_function("shifted_read")((4,), (256,), (x, y, np.int32(n)))
    message = str(caught.value)
    assert "heap-buffer-overflow, READ of 4 byte(s)" in message
    assert "0 byte(s) after the end of argument 0 'x'" in message
    assert "source.cu:27" in message


def test_barrier_not_reached_by_every_thread_is_a_deadlock(bugs):
    y = np.zeros(64, dtype=np.float32)
    with pytest.raises(emulator.KernelDeadlockError) as caught:
        bugs.get_function("barrier_in_branch")((2,), (64,), (y,))
    message = str(caught.value)
    assert "kernel 'barrier_in_branch', block (" in message
    assert "48 thread(s) wait at __syncthreads() on line 34" in message
    assert "16 thread(s) exited without reaching it" in message


def test_threads_at_different_barriers_are_a_divergent_barrier(bugs):
    y = np.zeros(32, dtype=np.float32)
    with pytest.raises(emulator.KernelDeadlockError, match="divergent __syncthreads()") as caught:
        bugs.get_function("barriers_per_branch")((1,), (32,), (y,))
    assert "16 thread(s) wait at __syncthreads() on line 42" in str(caught.value)
    assert "16 thread(s) wait at __syncthreads() on line 45" in str(caught.value)


def test_shuffle_missing_half_its_mask_is_a_deadlock(bugs):
    y = np.zeros(32, dtype=np.float32)
    with pytest.raises(emulator.KernelDeadlockError) as caught:
        bugs.get_function("shuffle_in_branch")((1,), (32,), (y,))
    assert ("16 thread(s) wait at __shfl_down_sync on line 52 (mask 0xffffffff); "
            "16 thread(s) exited") in str(caught.value)


def test_mistyped_argument_is_caught_before_the_launch(bugs):
    x = np.zeros(256, dtype=np.float64)  # the kernel declares const float*
    y = np.full(256, 7.0, dtype=np.float32)
    with pytest.raises(emulator.KernelArgumentError,
                       match=r"argument 0 'x' .*expected a float32 array for `const float\*`, "
                             r"got a float64 array"):
        bugs.get_function("copy_off_by_one")((1,), (256,), (x, y, np.int32(255)))
    assert (y == 7.0).all()  # nothing ran
