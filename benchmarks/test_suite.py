"""A suite's cases as pytest-benchmark benchmarks, timed by the harness's own timer.

    python -m pytest benchmarks --benchmark-only --dcn-suite resnet50-dcn --dcn-device cuda \
        --benchmark-json=new.json [--benchmark-compare=0001 --benchmark-compare-fail=median:5%]

One benchmark per case × implementation × direction of the suite (the same
selection as ``dcnbench run``: ``--dcn-op/--dcn-impl/--dcn-dtype``). Each is
checked against the float64 reference first (a ``fail`` or ``error`` fails the
test), then timed by ``harness.timing``: CUDA events on the current stream with a
cold L2 per sample on a GPU, ``perf_counter_ns`` on a CPU, never pytest-benchmark's
host clock. The samples are handed to pytest-benchmark as its rounds, so its
statistics, ``--benchmark-compare`` and ``--benchmark-compare-fail`` work on them.
Emulated implementations (our kernels on a CPU) are checked and skipped: they
are never timed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from unittest import mock

import pytest
import torch

from harness import environment, execution, registry, runner, suites, timing


def _device(config) -> str:
    return config.getoption("--dcn-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "dcn_row" not in metafunc.fixturenames:
        return
    config = metafunc.config
    options = runner.RunOptions(
        suite=suites.load(config.getoption("--dcn-suite")), device=_device(config),
        ops=config.getoption("--dcn-op"), impls=config.getoption("--dcn-impl"),
        dtypes=config.getoption("--dcn-dtype"), out=None, resume=False, seed=None,
        timing=None)
    params = [
        pytest.param((suite_case, impl.name, direction),
                     id=f"{suite_case.case.id}/{impl.name}/{direction}")
        for suite_case, impls in runner.select(options)
        for impl in impls
        for direction in (["forward", "backward"] if suite_case.backward else ["forward"])
    ]
    metafunc.parametrize("dcn_row", params)


_PREPARED: dict[tuple, execution.CaseRun] = {}


def _prepared(suite_case: suites.SuiteCase, device: str, seed: int) -> execution.CaseRun:
    """The case's inputs and reference results, made once for all its implementations."""
    key = (suite_case.case.id, device, seed, suite_case.backward)
    if key not in _PREPARED:
        environment.use_contract_precision()
        _PREPARED.clear()  # cases come one after another: keep one in memory
        _PREPARED[key] = execution.prepare(suite_case.case, device, seed, suite_case.backward)
    return _PREPARED[key]


@contextlib.contextmanager
def _timing_samples():
    """The samples ``harness.timing`` summarises while the block runs (the harness keeps
    only their statistics)."""
    samples: list[float] = []

    def keep(samples_ms, *args, **kwargs):
        samples.extend(samples_ms)
        return summarize(samples_ms, *args, **kwargs)

    summarize = timing.summarize
    with mock.patch.object(timing, "summarize", keep):
        yield samples


def test_case(benchmark, dcn_row, dcn_options):
    suite_case, impl_name, direction = dcn_row
    device = _device(dcn_options)
    seed = suites.load(dcn_options.getoption("--dcn-suite")).seed
    impl = registry.get_implementation(suite_case.case.op.name, impl_name)
    config = timing.TimingConfig()
    if dcn_options.getoption("--dcn-rep-ms") is not None:
        config = dataclasses.replace(config, rep_ms=dcn_options.getoption("--dcn-rep-ms"))
    with _timing_samples() as samples:
        row, _ = execution.run(_prepared(suite_case, device, seed), impl, direction, config)
    if row.status == "skipped":
        pytest.skip(row.reason)
    if row.status in ("fail", "error"):
        pytest.fail(f"{row.status}: {row.reason}\nreproduce: {row.reproduce}")
    if row.timing_skipped:
        pytest.skip(row.timing_skipped)
    benchmark.extra_info.update(
        case_id=row.case_id, impl=row.impl, direction=row.direction, status=row.status,
        timer=row.timer, rel_l2=row.rel_l2, tflops=row.tflops, gbps=row.gbps,
        speedup=row.speedup, sm_clock_mhz=row.sm_clock_mhz)
    if benchmark.disabled:
        return
    # pytest-benchmark has no public way to take samples measured elsewhere: record them
    # as its rounds (one call per round) the way its own runner does, and mark the
    # fixture used as benchmark(...) and pedantic(...) do.
    benchmark._mode = "harness.timing"
    stats = benchmark._make_stats(1)
    for sample_ms in samples:
        stats.update(sample_ms / 1e3)
