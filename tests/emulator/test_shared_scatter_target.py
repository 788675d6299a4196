"""Issue 13's target for the shared-scatter backward, on the gated counters.

``results/counters/baseline.json`` holds the counters of every kernel of the
``counters`` suite, and the CI gate (``dcnbench counters --suite counters
--check``) keeps it within 2 % of what the code counts. So the target is
checked on it: at every InternImage stage shape of the suite, float32 and
bfloat16, dcnv3 (with and without the softmax) and dcnv4,
``cupy_shared_scatter``'s backward issues at least 3× fewer global atomic
sector operations than ``cupy_vectorized``'s, and its modelled floor is lower.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BASELINE = Path(__file__).resolve().parents[2] / "results" / "counters" / "baseline.json"
FEWER_ATOMIC_SECTORS = 3.0


def backward_kernels(document: dict, impl: str) -> dict[str, dict]:
    """The dcnv3 / dcnv4 backward kernels of ``impl``, by case id."""
    return {k["case_id"]: k for k in document["kernels"].values()
            if k["op"] in ("dcnv3", "dcnv4") and k["impl"] == impl
            and k["direction"] == "backward"}


def shortfalls(document: dict) -> list[str]:
    """The cases where the shared scatter misses the target, and why."""
    vectorized = backward_kernels(document, "cupy_vectorized")
    shared = backward_kernels(document, "cupy_shared_scatter")
    missing = sorted(set(vectorized) ^ set(shared))
    problems = [f"{case}: counted for one design only" for case in missing]
    for case in sorted(set(vectorized) & set(shared)):
        before, after = vectorized[case], shared[case]
        if after["atomic_sectors"] * FEWER_ATOMIC_SECTORS > before["atomic_sectors"]:
            problems.append(f"{case}: {after['atomic_sectors']} atomic sectors, "
                            f"{before['atomic_sectors']} for cupy_vectorized")
        if after["floor_s"] >= before["floor_s"]:
            problems.append(f"{case}: modelled floor {after['floor_s']:.3g} s, "
                            f"{before['floor_s']:.3g} s for cupy_vectorized")
    return problems


@pytest.fixture(scope="module")
def baseline() -> dict:
    return json.loads(BASELINE.read_text())


def test_every_stage_shape_is_counted_for_both_designs(baseline):
    cases = backward_kernels(baseline, "cupy_shared_scatter")
    dtypes = {(k["op"], k["dtype"]) for k in cases.values()}
    assert dtypes == {(op, dtype) for op in ("dcnv3", "dcnv4")
                      for dtype in ("float32", "bfloat16")}
    assert len(cases) == 18  # 4 stages x 2 ops x 2 dtypes, + the softmax stage x 2 dtypes


def test_shared_scatter_issues_3x_fewer_atomic_sectors_than_vectorized(baseline):
    assert shortfalls(baseline) == []


def test_a_design_that_misses_the_target_is_reported(baseline):
    """The vectorized design's counters in place of the shared scatter's: the
    check names every case (planted: the target must be able to fail)."""
    planted = {"kernels": {}}
    for key, kernel in baseline["kernels"].items():
        if kernel["impl"] == "cupy_shared_scatter":
            continue
        planted["kernels"][key] = kernel
        if kernel["impl"] == "cupy_vectorized" and kernel["op"] in ("dcnv3", "dcnv4"):
            planted["kernels"][key + " shared"] = {**kernel, "impl": "cupy_shared_scatter"}
    problems = shortfalls(planted)
    assert len(problems) == 2 * 18
    assert all("for cupy_vectorized" in p for p in problems)
