"""CLI edges: numbers the parser refuses (naming the option, what was expected
and what came) before anything runs, and a report without its extra."""

from __future__ import annotations

import sys

import pytest

from harness import cli

RUN = ["run", "--suite", "smoke", "--device", "cpu"]
COMPARE = ["compare", "base", "new"]


@pytest.mark.parametrize(("argv", "message"), [
    ([*RUN, "--seed", str(2**64)], "--seed: expected an integer in 0..2**63-1, got 18446744073709551616"),
    ([*RUN, "--seed", "-1"], "--seed: expected an integer in 0..2**63-1, got -1"),
    ([*RUN, "--seed", "1.5"], "--seed: expected an integer, got '1.5'"),
    (["case", "conv2d", "--seed", str(10**30)], "--seed: expected an integer in 0..2**63-1"),
    ([*RUN, "--rep-ms", "-5"], "--rep-ms: expected a finite number > 0, got '-5'"),
    ([*RUN, "--rep-ms", "0"], "--rep-ms: expected a finite number > 0, got '0'"),
    ([*RUN, "--warmup-ms", "inf"], "--warmup-ms: expected a finite number >= 0, got 'inf'"),
    ([*COMPARE, "--fail-above", "nan"], "--fail-above: expected a finite number >= 0, got 'nan'"),
    ([*COMPARE, "--fail-above", "ten"], "--fail-above: expected a number, got 'ten'"),
    ([*COMPARE, "--min-effect", "-2"], "--min-effect: expected a finite number >= 0, got '-2'"),
])
def test_bad_numbers_are_refused_by_the_parser(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == cli.EXIT_USAGE
    error = capsys.readouterr().err
    assert message in " ".join(error.split()) and "Traceback" not in error


def test_report_without_plotly_names_the_extra_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly now fails
    assert cli.main(["report", str(tmp_path), "-o", str(tmp_path / "site")]) == cli.EXIT_USAGE
    out = " ".join(capsys.readouterr().out.split())  # the console wraps lines
    assert "the report needs plotly, which is not installed; install the report extra" in out
