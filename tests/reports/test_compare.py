"""`dcnbench compare`: verdicts from ratios and noise, and the exit status CI gates on."""

import pandas as pd
import pytest
from conftest import SLOW_IMPL

from harness import cli, compare


@pytest.mark.parametrize(("ratio", "noise", "verdict"), [
    (1.50, 0.01, "slower"),
    (0.70, 0.01, "faster"),
    (1.005, 0.002, "same"),
    (1.50, 0.40, "unclear"),   # the change is within twice the noise
    (1.01, 0.05, "unclear"),   # too noisy to call it the same
    (1.015, 0.001, "same"),    # precise, but below the minimum effect
])
def test_verdicts(ratio, noise, verdict):
    assert compare.verdicts(pd.Series([ratio]), pd.Series([noise]))[0] == verdict


def test_planted_slowdown_is_found_and_gates(slow_history, capsys):
    comparison = compare.compare_runs(slow_history[-2], slow_history[-1])
    # Each synthetic run moves every time by up to ±3 %, so other cases may read slower by
    # a few percent; beyond 10 % only the planted ones do.
    slower = compare.regressions(comparison, 10)
    assert len(slower) > 0
    assert set(slower["impl"]) == {SLOW_IMPL}
    assert slower["ratio"].between(1.5 / 1.07, 1.5 * 1.07).all()
    means = comparison.geomeans.set_index(["impl", "direction"])["speedup"]
    assert means.loc[SLOW_IMPL].between(1 / 1.5 / 1.04, 1 / 1.5 * 1.04).all()
    assert cli.main(["compare", str(slow_history[-2]), str(slow_history[-1]),
                     "--fail-above", "10"]) == 1
    assert "slower" in capsys.readouterr().out
    # 50 % slower is under a 60 % threshold; no threshold never fails.
    assert cli.main(["compare", str(slow_history[-2]), str(slow_history[-1]),
                     "--fail-above", "60"]) == 0
    assert cli.main(["compare", str(slow_history[-2]), str(slow_history[-1])]) == 0


def test_steady_runs_pass_the_gate(steady_history):
    assert cli.main(["compare", str(steady_history[-2]), str(steady_history[-1]),
                     "--fail-above", "10"]) == 0
    comparison = compare.compare_runs(steady_history[-2], steady_history[-1])
    assert (comparison.cases["ratio"] < 1.03 / 0.97 + 1e-9).all()
    assert comparison.geomeans["speedup"].between(0.95, 1.05).all()


def test_not_a_run_directory(tmp_path, capsys):
    assert cli.main(["compare", str(tmp_path), str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().out
