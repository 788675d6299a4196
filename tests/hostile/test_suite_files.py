"""Hostile suite files: a suite too large is refused before it is expanded, and
a filter that cannot be evaluated is one line naming the file, the filter and
the case, also in ``dcnbench list``."""

from __future__ import annotations

import json
import textwrap
import time

import pytest

from harness import cli, registry, suites


@pytest.fixture
def write_suite(tmp_path):
    registry.load_all()

    def write(sweep: str, name: str = "hostile") -> str:
        path = tmp_path / f"{name}.toml"
        path.write_text('description = "hostile"\n[[sweep]]\nop = "deform_conv2d"\n'
                        + textwrap.dedent(sweep))
        return str(path)
    return write


def test_a_suite_whose_axes_multiply_to_millions_is_refused_before_expansion(write_suite):
    path = write_suite("""
        dtypes = "all"
        modes = "all"
        [sweep.axes]
        N = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
        C_in = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
        H = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
        W = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
        """)
    start = time.perf_counter()
    with pytest.raises(suites.SuiteError, match=r"sweep\[0\]: deform_conv2d: axes.N \(16\) × "
                       r"axes.C_in \(16\) × axes.H \(16\) × axes.W \(16\) × dtypes \(\d+\) × "
                       r"modes \(\d+\) = [\d,]+ cases; expected at most 100,000"):
        suites.load(path)
    assert time.perf_counter() - start < 2


def test_the_bound_holds_for_the_whole_suite_not_each_sweep(tmp_path, monkeypatch):
    registry.load_all()
    monkeypatch.setattr(suites, "MAX_SUITE_CASES", 1000)
    values = ", ".join(str(v) for v in range(1, 26))  # 625 points a sweep
    path = tmp_path / "two.toml"
    path.write_text('description = "two"\n' + "".join(
        f'[[sweep]]\nop = "{op}"\n[sweep.axes]\nN = [{values}]\nC_in = [{values}]\n'
        for op in ("deform_conv2d", "modulated_deform_conv2d")))
    with pytest.raises(suites.SuiteError, match=r"sweep\[1\]: modulated_deform_conv2d: .* = "
                       r"625 cases; expected at most 1,000 in the whole suite \(375 left"):
        suites.load(str(path))


@pytest.mark.parametrize(("text", "message"), [
    ("1 / (H - H) == 0", "division by zero"),
    ("H < 'a'", "'<' not supported"),
    ("'a' * 10000000000 == 'b'", "a string of 10,000,000,000 characters"),
    ("'%999999999d' % H == ''", "(string formatting) is not allowed"),
    ("H % 0 == 1", "modulo by zero"),
])
def test_a_filter_failing_at_a_point_is_one_line_naming_filter_and_case(write_suite, text,
                                                                        message):
    path = write_suite(f"filters = [{json.dumps(text)}]\n[sweep.axes]\nH = [5, 6]\n")
    with pytest.raises(suites.SuiteError) as caught:
        suites.load(path)
    error = str(caught.value)
    assert error.startswith(f"{path}: sweep[0].filters[0]: {text!r} on case deform_conv2d/")
    assert message in error and "\n" not in error


@pytest.mark.parametrize("text", ["H" + " + H" * 500, "(" * 300 + "H" + ")" * 300,
                                  "not " * 100_000 + "H", "-" * 1_000_000 + "H"])
def test_a_filter_too_large_or_deep_is_refused_when_parsed(write_suite, text):
    path = write_suite(f"filters = [{json.dumps(text)}]\n")
    with pytest.raises(suites.SuiteError, match=r"sweep\[0\]\.filters\[0\]: .*(too large|"
                                                r"not an expression)"):
        suites.load(path)


def test_list_reports_a_broken_suite_in_suites_and_goes_on(write_suite, tmp_path, monkeypatch,
                                                           capsys):
    write_suite('filters = ["1 / (H - H) == 0"]\n', name="broken")
    monkeypatch.setattr(suites, "SUITES_DIR", tmp_path)
    assert cli.main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["suites"]
    assert [s["name"] for s in listed] == ["broken"]
    assert "'1 / (H - H) == 0' on case deform_conv2d/" in listed[0]["error"]
