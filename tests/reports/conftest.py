"""Runs shared by the report tests: a real CPU run and synthetic histories made from it.

The real run is a CPU smoke run of the three conv-family operators in float32
(about 15 s on 2 cores), made once per session; the histories copy its rows
with the harness's writers (reports_synthetic.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from reports_synthetic import history

from harness import cli

SLOW_IMPL = "torchvision"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "cpu-smoke"
    status = cli.main(["run", "--suite", "smoke", "--device", "cpu", "--dtype", "float32",
                       "--op", "conv2d", "deform_conv2d", "modulated_deform_conv2d",
                       "--warmup-ms", "1", "--rep-ms", "3", "--out", str(out)])
    assert status == 0
    return out


@pytest.fixture(scope="session")
def slow_history(smoke_run, tmp_path_factory) -> list[Path]:
    """Five nightly runs (the last has four before it: enough for the regression test);
    the last has every torchvision time 1.5 times longer."""
    return history(smoke_run, tmp_path_factory.mktemp("slow-history"), 5,
                   slow_impl=SLOW_IMPL, slowdown=1.5)


@pytest.fixture(scope="session")
def steady_history(smoke_run, tmp_path_factory) -> list[Path]:
    """Six nightly runs within ±3 % of each other."""
    return history(smoke_run, tmp_path_factory.mktemp("steady-history"), 6, seed=1)


@pytest.fixture(scope="session")
def site(smoke_run, slow_history, tmp_path_factory):
    """The report of the real run and the slow history."""
    from reports import site as site_builder

    out = tmp_path_factory.mktemp("site")
    built = site_builder.build([smoke_run, slow_history[0].parent], out)
    yield built
    shutil.rmtree(out, ignore_errors=True)
