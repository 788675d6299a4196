"""The history's regression test (docs/reports.md): exact sign test plus a minimum effect."""

import pytest
from conftest import SLOW_IMPL

from harness import results
from reports import history


def test_sign_test_is_exact():
    assert history.sign_test_p(7, 7) == pytest.approx(1 / 128)
    assert history.sign_test_p(0, 7) == 1.0
    assert history.sign_test_p(6, 7) == pytest.approx(8 / 128)
    assert history.sign_test_p(0, 0) == 1.0


def _points(runs):
    rows = results.load(runs)
    order = [p.name for p in runs]
    return history.series(rows, order)


def test_planted_regression_is_marked_and_nothing_else(slow_history):
    points = _points(slow_history)
    flagged = points[points["regression"]]
    assert set(flagged["run_id"]) == {slow_history[-1].name}
    assert set(flagged["impl"]) == {SLOW_IMPL}
    assert set(flagged["direction"]) == {"forward", "backward"}
    assert flagged["ratio"].between(1.4, 1.6).all()
    # The first runs have fewer than MIN_PREVIOUS runs before them: never tested.
    first = points[points["run_id"].isin([p.name for p in slow_history[:history.MIN_PREVIOUS]])]
    assert first["p_value"].isna().all()


def test_steady_history_has_no_regression(steady_history):
    points = _points(steady_history)
    assert not points["regression"].any()
    assert points["time_index"].between(0.95, 1.05).all()


def test_a_small_slowdown_is_not_a_regression(smoke_run, tmp_path):
    from reports_synthetic import history as make_history

    runs = make_history(smoke_run, tmp_path, 5, slow_impl=SLOW_IMPL, slowdown=1.03)
    points = _points(runs)
    assert not points["regression"].any()
    last = points[(points["run_id"] == runs[-1].name) & (points["impl"] == SLOW_IMPL)]
    assert (last["ratio"] < 1 + history.MIN_EFFECT).all()


def test_group_key():
    assert history.group_key({"gpu": "NVIDIA H200", "cpu": "x", "suite": {"name": "s"}}) == (
        "NVIDIA H200", "s")
    assert history.group_key({"gpu": None, "cpu": "AMD EPYC", "suite": {"name": "s"}}) == (
        "AMD EPYC", "s")
