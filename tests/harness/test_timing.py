import time

import pytest
import torch

from harness import nvml, timing
from harness.timing import TimingConfig


def test_summary_statistics():
    stats = timing.summarize([5.0, 1.0, 2.0, 4.0, 3.0], noise_threshold=0.1, timer="cpu-clock")
    assert stats.median_ms == 3.0
    assert stats.iqr_ms == pytest.approx(4.0 - 2.0)  # quartiles 2 and 4 (inclusive method)
    assert (stats.min_ms, stats.samples, stats.timer) == (1.0, 5, "cpu-clock")
    assert stats.noisy  # IQR / median = 0.67


def test_noise_flag_threshold():
    steady = [10.0, 10.1, 10.2, 10.3, 10.4]  # IQR 0.2, median 10.2: 2%
    assert not timing.summarize(steady, 0.1, "cpu-clock").noisy
    assert timing.summarize(steady, 0.01, "cpu-clock").noisy


def test_single_sample_has_zero_iqr_and_empty_is_an_error():
    stats = timing.summarize([2.0], 0.1, "cpu-clock")
    assert (stats.median_ms, stats.iqr_ms, stats.samples) == (2.0, 0.0, 1)
    with pytest.raises(ValueError, match="no timing samples"):
        timing.summarize([], 0.1, "cpu-clock")


def test_sample_count_follows_the_estimate_within_bounds():
    config = TimingConfig(rep_ms=100, min_samples=5, max_samples=1000)
    assert timing._sample_count(1.0, config) == 100
    assert timing._sample_count(50.0, config) == 5
    assert timing._sample_count(1e-9, config) == 1000


def test_cpu_timer_measures_each_call_after_warm_up():
    calls = []

    def sleep_2ms():
        calls.append(time.perf_counter())
        time.sleep(0.002)

    config = TimingConfig(warmup_ms=10, rep_ms=40, min_samples=5)
    stats = timing.time_cpu(sleep_2ms, config)
    assert stats.timer == "cpu-clock"
    assert 2.0 <= stats.median_ms < 10.0  # sleep never returns early; the bound allows a busy machine
    assert stats.min_ms >= 2.0
    # One unmeasured call, warm-up calls for >= 10 ms, then the measured ones.
    assert len(calls) >= 1 + 1 + stats.samples
    assert 5 <= stats.samples <= 20


def test_time_call_dispatches_on_device():
    stats = timing.time_call(lambda: None, "cpu", TimingConfig(warmup_ms=1, rep_ms=1))
    assert stats.timer == "cpu-clock" and stats.samples >= 5


def test_cpu_copy_bandwidth_is_positive(monkeypatch):
    monkeypatch.setitem(timing.COPY_BYTES, "cpu", 1 << 20)
    gbps = timing.copy_bandwidth_gbps("cpu", TimingConfig(warmup_ms=1, rep_ms=5))
    assert gbps > 0.01


@pytest.mark.gpu
def test_cuda_timer_events_flush_and_graph():
    a = torch.randn(2048, 2048, device="cuda")
    config = TimingConfig(warmup_ms=5, rep_ms=20)
    eager = timing.time_cuda(lambda: a @ a, config)
    assert eager.timer == "cuda-events" and eager.samples >= 5 and eager.median_ms > 0
    assert timing.l2_flush_bytes(a.device) >= 2 * 1024 * 1024
    graphed = timing.time_cuda(lambda: a @ a, TimingConfig(warmup_ms=5, rep_ms=20, cuda_graph=True))
    assert graphed.timer == "cuda-graph" and graphed.median_ms > 0
    # 2·2048³ flops in well under a second on any GPU we run on.
    assert eager.median_ms < 1000
    assert timing.copy_bandwidth_gbps("cuda", config) > 50


@pytest.mark.gpu
def test_nvml_reads_clock_and_temperature():
    readings = nvml.sensors()
    if nvml._nvml() is None:
        pytest.skip("pynvml is not importable or NVML does not answer")
    assert readings["sm_clock_mhz"] > 0 and readings["gpu_temp_c"] > 0
    assert nvml.driver_version()
