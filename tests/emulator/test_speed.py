"""The emulator's speed on one core, reported (``pytest -s`` or the
``record_property`` of a JUnit report) and bounded well below the measured
numbers so that a regression of an order of magnitude fails."""

from __future__ import annotations

from kernels.emulator import bench


def test_emulated_threads_per_second_on_one_core(monkeypatch, record_property):
    monkeypatch.setenv("DCNBENCH_EMULATOR_THREADS", "1")
    rates = bench.measure(n_fast=1 << 21, n_barrier=1 << 17)
    for name, rate in rates.items():
        record_property(f"{name} threads/s", rate)
        print(f"\n{name}: {rate / 1e6:.1f} M emulated threads/s on one core")
    # Measured on the 2-core CI machine: ~175 M/s and ~2.3 M/s.
    assert rates["barrier-free"] > 10e6
    assert rates["barrier-heavy"] > 0.2e6


def test_wmma_mma_sync_per_second_on_one_core(monkeypatch, record_property):
    monkeypatch.setenv("DCNBENCH_EMULATOR_THREADS", "1")
    rate = bench.mma_per_second(size=64, depth=128)
    record_property("wmma mma_sync/s", rate)
    print(f"\nwmma: {rate / 1e3:.1f} k mma_sync/s (16 x 16 x 16, with their loads) on one core")
    # Measured on the 2-core machine: ~20 k/s.
    assert rate > 2e3
