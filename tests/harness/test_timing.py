import time

import pytest
import torch

from harness import nvml, timing
from harness.timing import TimingConfig


def test_summary_statistics_keep_every_sample():
    stats = timing.summarize([5.0, 1.0, 2.0, 4.0, 3.0], noise_threshold=0.1)
    assert stats.median == 3.0
    assert stats.iqr == pytest.approx(4.0 - 2.0)  # quartiles 2 and 4 (inclusive method)
    assert (stats.min, stats.count) == (1.0, 5)
    assert stats.samples == (5.0, 1.0, 2.0, 4.0, 3.0)  # in the order they were taken
    assert stats.noisy  # IQR / median = 0.67


def test_noise_flag_threshold():
    steady = [10.0, 10.1, 10.2, 10.3, 10.4]  # IQR 0.2, median 10.2: 2%
    assert not timing.summarize(steady, 0.1).noisy
    assert timing.summarize(steady, 0.01).noisy


def test_single_sample_has_zero_iqr_and_empty_is_an_error():
    stats = timing.summarize([2.0], 0.1)
    assert (stats.median, stats.iqr, stats.count) == (2.0, 0.0, 1)
    with pytest.raises(ValueError, match="no timing samples"):
        timing.summarize([], 0.1)


def test_sample_count_follows_the_estimate_within_bounds():
    config = TimingConfig(rep_ms=100, min_samples=5, max_samples=1000)
    assert timing._sample_count(1.0, config) == 100
    assert timing._sample_count(50.0, config) == 5
    assert timing._sample_count(1e-9, config) == 1000


def test_cpu_timer_measures_each_call_after_warm_up_and_keeps_the_last_output():
    calls = []

    def sleep_2ms():
        calls.append(time.perf_counter())
        time.sleep(0.002)
        return len(calls)

    config = TimingConfig(warmup_ms=10, rep_ms=40, min_samples=5)
    found = timing.time_cpu(sleep_2ms, config)
    assert found.method == "cpu-clock" and found.host_us is None and found.as_called is None
    stats = found.device
    assert 2.0 <= stats.median < 10.0  # sleep never returns early; the bound allows a busy machine
    assert stats.min >= 2.0
    # One unmeasured call, warm-up calls for >= 10 ms, then the measured ones.
    assert len(calls) >= 1 + 1 + stats.count
    assert 5 <= stats.count <= 20
    assert found.output == len(calls)  # the last call's result, for the check after timing


def test_measure_dispatches_on_device():
    found = timing.measure(lambda: None, "cpu", TimingConfig(warmup_ms=1, rep_ms=1))
    assert found.method == "cpu-clock" and found.device.count >= 5


def test_peak_memory_is_absent_on_the_cpu():
    assert timing.peak_memory_bytes(lambda: torch.zeros(1000), "cpu") is None


def test_cpu_copy_bandwidth_is_positive(monkeypatch):
    monkeypatch.setitem(timing.COPY_BYTES, "cpu", 1 << 20)
    gbps = timing.copy_bandwidth_gbps("cpu", TimingConfig(warmup_ms=1, rep_ms=5))
    assert gbps > 0.01


# --- the device-time method, on a GPU ---------------------------------------------------

def _small_kernels(count: int, a: torch.Tensor):
    """A call whose GPU time (~count tiny kernels) is far below its host time."""
    def call():
        out = a
        for _ in range(count):
            out = out + 1
        return out
    return call


@pytest.mark.gpu
def test_spin_method_measures_device_time_not_host_time():
    a = torch.zeros(1024, device="cuda")
    call = _small_kernels(40, a)  # ~40 launches: ~200+ µs of host time, a few µs each on the GPU
    config = TimingConfig(warmup_ms=5, rep_ms=20)
    found = timing.time_cuda(call, config)
    assert found.method == "cuda-spin", found.note
    assert found.host_us is not None and found.as_called is not None
    # The host needs longer to enqueue the call than the GPU to run it; device time
    # must not contain the host's time, as plain events around eager calls would.
    eager, _ = timing.event_samples(call, 20, torch.empty(1, device="cuda"))
    assert found.device.median < 0.7 * sorted(eager)[10]
    assert found.device.median * 1e3 < found.host_us.median
    assert found.as_called.median >= found.device.median
    assert torch.equal(found.output, a + 40)


@pytest.mark.gpu
def test_a_call_that_synchronises_falls_back_and_says_so():
    a = torch.zeros(1024, device="cuda")

    def syncs():
        out = a + 1
        torch.cuda.synchronize()
        return out

    found = timing.time_cuda(syncs, TimingConfig(warmup_ms=2, rep_ms=5))
    assert found.method in ("cuda-graph", "cuda-events")
    assert "spin" in found.note


@pytest.mark.gpu
def test_graph_replay_and_flush():
    a = torch.randn(2048, 2048, device="cuda")
    graphed = timing.time_cuda(lambda: a @ a, TimingConfig(warmup_ms=5, rep_ms=20, cuda_graph=True))
    assert graphed.method == "cuda-graph" and graphed.device.median > 0
    assert timing.l2_flush_bytes(a.device) >= 2 * 1024 * 1024
    assert timing.copy_bandwidth_gbps("cuda", TimingConfig(warmup_ms=5, rep_ms=20)) > 50


@pytest.mark.gpu
def test_peak_memory_counts_what_one_call_allocates():
    a = torch.zeros(1 << 20, device="cuda")  # 4 MiB input: not counted
    peak = timing.peak_memory_bytes(lambda: a * 2, "cuda")
    assert 4 << 20 <= peak < 8 << 20


@pytest.mark.gpu
def test_nvml_reads_clock_and_temperature():
    readings = nvml.sensors()
    if nvml._nvml() is None:
        pytest.skip("pynvml is not importable or NVML does not answer")
    assert readings["sm_clock_mhz"] > 0 and readings["gpu_temp_c"] > 0
    assert nvml.driver_version()
