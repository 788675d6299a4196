"""`dcnbench compare`: verdicts from ratios and noise, and the exit status CI gates on."""

import numpy as np
import pytest
from conftest import SLOW_IMPL

from harness import cli, compare


@pytest.mark.parametrize(("new_median", "iqr", "p_value", "expected"), [
    (1.50, 0.01, 1e-6, "slower"),
    (0.70, 0.01, 1e-6, "faster"),
    (1.005, 0.002, 0.5, "same"),
    (1.50, 0.30, 1e-6, "unclear"),   # up 50 %, but not by twice the larger IQR
    (1.50, 0.01, 0.2, "unclear"),    # large, but the rank test does not separate the runs
    (1.01, 0.05, 0.5, "unclear"),    # too noisy to call it the same
    (1.015, 0.001, 1e-6, "same"),    # significant, but below the minimum effect
    (1.50, 0.01, float("nan"), "slower"),  # v1 rows: no samples, the effect size alone
])
def test_verdicts(new_median, iqr, p_value, expected):
    assert compare.verdict(1.0, new_median, iqr, iqr, p_value) == expected


def test_rank_test_separates_shifted_samples_only():
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.01, 50)
    assert compare.rank_test(base, base * 1.05) < 1e-6
    assert compare.rank_test(base, rng.normal(1.0, 0.01, 50)) > 0.01
    assert np.isnan(compare.rank_test(None, base))


def test_a_shift_hidden_in_the_medians_noise_is_not_a_slowdown():
    """The effect size guards the rank test: 3 % up with IQRs of 10 % is unclear even
    though a rank test on many samples finds the shift."""
    rng = np.random.default_rng(1)
    base = rng.normal(1.0, 0.075, 5000)
    new = base * 1.03
    p = compare.rank_test(base, new)
    assert p < compare.ALPHA
    iqr = float(np.subtract(*np.percentile(base, [75, 25])))
    assert compare.verdict(1.0, 1.03, iqr, iqr * 1.03, p) == "unclear"


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
