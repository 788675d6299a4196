"""A suite's cases as pytest-benchmark benchmarks, timed by the harness's own timer.

    python -m pytest benchmarks --benchmark-only --dcn-suite resnet50-dcn --dcn-device cuda \
        --benchmark-json=new.json [--benchmark-compare=0001 --benchmark-compare-fail=median:5%]

One benchmark per case × implementation × direction of the suite (the same
selection as ``dcnbench run``: ``--dcn-op/--dcn-impl/--dcn-dtype``). Each is
checked against the float64 reference first (a ``fail`` or ``error`` fails the
test), then timed by ``harness.timing`` (device time on a GPU, ``docs/timing.md``;
``perf_counter_ns`` on a CPU), never by pytest-benchmark's host clock. The row
keeps every sample; they reach pytest-benchmark through its public API alone:
the ``benchmark`` marker's ``timer`` is ``SAMPLE_CLOCK``, a clock that replays
the row's samples, and ``benchmark.pedantic`` runs one round per sample (each
round reads the clock before and after a no-op, which advances it by one
sample). So pytest-benchmark's statistics, ``--benchmark-compare`` and
``--benchmark-compare-fail`` work on the real samples. Emulated
implementations (our kernels on a CPU) are checked and skipped: they are
never timed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest
import torch

from harness import environment, execution, plugins, registry, results, runner, suites, timing


class SampleClock:
    """A clock for pytest-benchmark that replays measured samples: read twice per
    round (start, end), it advances by the next sample between the two reads."""

    __name__ = "SampleClock"

    def __init__(self):
        self._ticks: list[float] = []

    def replay(self, samples_s: Sequence[float]) -> None:
        now, ticks = 0.0, []
        for sample in samples_s:
            ticks += [now, now + sample]
            now += sample
        self._ticks = ticks[::-1]

    def __call__(self) -> float:
        return self._ticks.pop()


SAMPLE_CLOCK = SampleClock()


def _device(config) -> str:
    return config.getoption("--dcn-device") or ("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "dcn_row" not in metafunc.fixturenames:
        return
    config = metafunc.config
    plugins.load(config.getoption("--dcn-plugin"))
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


def _no_op() -> None:
    """The round's "work": the call was done and timed by the harness."""


@pytest.mark.benchmark(timer=SAMPLE_CLOCK, warmup=False)
def test_case(benchmark, dcn_row, dcn_options):
    suite_case, impl_name, direction = dcn_row
    device = _device(dcn_options)
    seed = suites.load(dcn_options.getoption("--dcn-suite")).seed
    impl = registry.get_implementation(suite_case.case.op.name, impl_name)
    config = timing.TimingConfig()
    if dcn_options.getoption("--dcn-rep-ms") is not None:
        config = dataclasses.replace(config, rep_ms=dcn_options.getoption("--dcn-rep-ms"))
    row, _ = execution.run(_prepared(suite_case, device, seed), impl, direction, config)
    if row.status == "skipped":
        pytest.skip(row.reason)
    if row.status in ("fail", "error"):
        pytest.fail(f"{row.status}: {row.reason}\nreproduce: {row.reproduce}")
    if row.timing_skipped:
        pytest.skip(row.timing_skipped)
    benchmark.extra_info.update(
        case_id=row.case_id, impl=row.impl, direction=row.direction, status=row.status,
        timer=row.timer, rel_l2=row.rel_l2, sm_clock_mhz=row.sm_clock_mhz, **row.metrics)
    samples_ms = results.decode_samples(row.samples["time_ms"])
    SAMPLE_CLOCK.replay([float(sample) / 1e3 for sample in samples_ms])
    benchmark.pedantic(_no_op, rounds=len(samples_ms), iterations=1, warmup_rounds=0)
