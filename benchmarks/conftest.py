"""Options of the pytest-benchmark entry (see test_suite.py)."""

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("dcnbench")
    group.addoption("--dcn-suite", default="smoke", help="suite name or path (default: smoke)")
    group.addoption("--dcn-device", choices=["cpu", "cuda"], default=None,
                    help="where to run (default: cuda when there is a GPU, else cpu)")
    group.addoption("--dcn-op", action="append", default=[], help="only this operator")
    group.addoption("--dcn-impl", action="append", default=[], help="only this implementation")
    group.addoption("--dcn-dtype", action="append", default=[], help="only this dtype")
    group.addoption("--dcn-plugin", action="append", default=[], metavar="MODULE",
                    help="import this plugin module (implementations, operators, metrics) "
                         "before collecting; repeatable")
    group.addoption("--dcn-rep-ms", type=float, default=None,
                    help="measured time per case (default: the harness's)")


@pytest.fixture(scope="session")
def dcn_options(request):
    return request.config
