"""Issue 13's targets for the staged DCNv3/DCNv4 forward and the channels-fastest RoI
pools, checked on the gated counters (``results/counters/baseline.json``; the CI gate
keeps it within 2 % of what the code counts). The shared scatter's target has its own
file (``test_shared_scatter_target.py``).

- ``cupy_staged``: a modelled H200 floor at least 1.3x lower than ``cupy_vectorized``'s
  in every dcnv3 / dcnv4 forward of the suite, and its bfloat16 backward moving fewer
  DRAM bytes than its float32 one.
- ``cupy_channels_fastest``: the pooling kernel's sectors per request at most 1/4 of
  ``cupy``'s, or, where 1/4 is below what a request of its width can take, at that
  floor (``AT_THE_SECTOR_FLOOR``); the cases in ``SECTORS_TARGET_MISSES`` are held to
  the ratio they reach today (docs/kernels/roi_pool.md says why they miss).
- ``cupy_samples_fastest`` (deform_psroi_pool only, lanes over a bin's samples): the
  same 1/4 of ``cupy``'s sectors per request in every case, the per-class trans
  ones that ``cupy_channels_fastest`` misses included, and a modelled floor below
  both other designs'.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

BASELINE = Path(__file__).resolve().parents[2] / "results" / "counters" / "baseline.json"
STAGED_FLOOR_GAIN = 1.3
SECTORS_PER_REQUEST_RATIO = 0.25
# Sector efficiency (bytes the lanes asked for / bytes of the sectors moved) at which a
# design is at the counter's floor: a warp request of 32 distinct 4-byte values cannot
# take fewer than 4 sectors (2-byte: 2), so where 1/4 of cupy's sectors per request is
# below that (roi_align: ~10 today; the float32 deformable pools' forward: ~13), only
# narrower requests, not a better layout, could meet it.
AT_THE_SECTOR_FLOOR = 0.95
# (op, dtype, direction, with offsets): the ratio reached, as a bound. The R-FCN pool
# with per-class offsets samples a different position in every lane of this design
# (cupy_samples_fastest meets the target there).
SECTORS_TARGET_MISSES = {
    ("deform_psroi_pool", "float32", "forward", True): 0.42,
    ("deform_psroi_pool", "float32", "backward", True): 0.45,
    ("deform_psroi_pool", "bfloat16", "forward", True): 0.35,
    ("deform_psroi_pool", "bfloat16", "backward", True): 0.41,
}
ROI_OPS = ("roi_align", "deform_roi_pool", "modulated_deform_roi_pool", "deform_psroi_pool")


@pytest.fixture(scope="module")
def baseline() -> dict:
    return json.loads(BASELINE.read_text())


def _per_case(document: dict, impl: str, ops: tuple[str, ...], pool_only: bool = False):
    """(case id, direction) -> summed counters of ``impl``'s kernels (without the
    staging transposes when ``pool_only``)."""
    sums: dict[tuple[str, str], dict] = defaultdict(
        lambda: {"sectors": 0, "requests": 0, "bytes_useful": 0, "floor_s": 0.0,
                 "dram_bytes": 0})
    for kernel in document["kernels"].values():
        if kernel["impl"] != impl or kernel["op"] not in ops:
            continue
        if pool_only and kernel["kernel"].startswith("transpose"):
            continue
        total = sums[kernel["case_id"], kernel["direction"]]
        total["sectors"] += kernel["sectors"]
        total["requests"] += sum(kernel["requests"].values())
        total["bytes_useful"] += sum(kernel["bytes_useful"].values())
        total["floor_s"] += kernel["floor_s"]
        total["dram_bytes"] += kernel["dram_bytes"]
    return sums


def staged_shortfalls(document: dict) -> list[str]:
    ops = ("dcnv3", "dcnv4")
    before, after = _per_case(document, "cupy_vectorized", ops), _per_case(document, "cupy_staged", ops)
    problems = [f"{case}: counted for one design only" for case in sorted(set(before) ^ set(after))]
    for case, direction in sorted(set(before) & set(after)):
        if direction != "forward":
            continue
        gain = before[case, direction]["floor_s"] / after[case, direction]["floor_s"]
        if gain < STAGED_FLOOR_GAIN:
            problems.append(f"{case}: staged forward floor only {gain:.2f}x lower")
    for case, direction in sorted(after):
        if direction == "backward" and "/bfloat16/" in case:
            half = after[case, direction]["dram_bytes"]
            full = after[case.replace("/bfloat16/", "/float32/"), direction]["dram_bytes"]
            if half >= full:
                problems.append(f"{case}: bfloat16 backward moves {half} bytes, float32 {full}")
    return problems


def sectors_per_request_shortfalls(document: dict, impl: str, ops: tuple[str, ...],
                                    misses: dict) -> list[str]:
    """``impl``'s pool kernels against ``cupy``'s: sectors per request at most
    SECTORS_PER_REQUEST_RATIO of them or at the floor (AT_THE_SECTOR_FLOOR), or the
    bound ``misses`` holds a case to."""
    before = _per_case(document, "cupy", ops, pool_only=True)
    after = _per_case(document, impl, ops, pool_only=True)
    problems = [f"{case}: counted for one design only" for case in sorted(set(before) ^ set(after))]
    op_of = {k["case_id"]: k["op"] for k in document["kernels"].values()}
    for case, direction in sorted(set(before) & set(after)):
        old, new = before[case, direction], after[case, direction]
        ratio = (new["sectors"] / new["requests"]) / (old["sectors"] / old["requests"])
        dtype = case.split("/")[2]
        with_offsets = op_of[case] != "roi_align" and "_notrans" not in case
        bound = misses.get((op_of[case], dtype, direction, with_offsets),
                           SECTORS_PER_REQUEST_RATIO)
        efficiency = new["bytes_useful"] / (32 * new["sectors"])
        if ratio > bound and efficiency < AT_THE_SECTOR_FLOOR:
            problems.append(f"{case} {direction}: sectors per request {ratio:.3f}x of cupy's, "
                            f"bound {bound}, sector efficiency {efficiency:.2f}")
    return problems


def channels_fastest_shortfalls(document: dict) -> list[str]:
    return sectors_per_request_shortfalls(document, "cupy_channels_fastest", ROI_OPS,
                                          SECTORS_TARGET_MISSES)


def samples_fastest_shortfalls(document: dict) -> list[str]:
    ops = ("deform_psroi_pool",)
    problems = sectors_per_request_shortfalls(document, "cupy_samples_fastest", ops, {})
    after = _per_case(document, "cupy_samples_fastest", ops)
    for other in ("cupy", "cupy_channels_fastest"):
        before = _per_case(document, other, ops)  # the transposes included: its whole cost
        for case, direction in sorted(set(before) & set(after)):
            if after[case, direction]["floor_s"] >= before[case, direction]["floor_s"]:
                problems.append(f"{case} {direction}: modelled floor not below {other}'s")
    return problems


def test_staged_forward_floor_and_half_precision_bytes(baseline):
    assert staged_shortfalls(baseline) == []


def test_channels_fastest_sectors_per_request(baseline):
    assert channels_fastest_shortfalls(baseline) == []


def test_samples_fastest_sectors_per_request_and_floor(baseline):
    assert samples_fastest_shortfalls(baseline) == []


def test_every_design_is_in_the_gated_suite(baseline):
    impls = {(k["op"], k["impl"]) for k in baseline["kernels"].values()}
    assert {(op, "cupy_staged") for op in ("dcnv3", "dcnv4")} <= impls
    assert {(op, "cupy_channels_fastest") for op in ROI_OPS} <= impls
    assert ("deform_psroi_pool", "cupy_samples_fastest") in impls


def test_a_design_that_misses_its_target_is_reported(baseline):
    """The old designs' counters under the new names (planted: the checks must fail)."""
    renamed = {"cupy_vectorized": "cupy_staged", "cupy": "cupy_channels_fastest"}
    planted = {"kernels": {}}
    for key, kernel in baseline["kernels"].items():
        if kernel["impl"] in renamed.values():
            continue
        planted["kernels"][key] = kernel
        if kernel["impl"] in renamed:
            planted["kernels"][key + " planted"] = {**kernel, "impl": renamed[kernel["impl"]]}
    assert len(staged_shortfalls(planted)) >= 18  # every forward, and the bytes check
    assert len(channels_fastest_shortfalls(planted)) == 20  # every case, both directions


def test_a_samples_fastest_design_that_misses_its_targets_is_reported(baseline):
    """The first design's counters as the samples-fastest one's (planted): every PS case
    and direction misses the sectors target and the floor against ``cupy``."""
    planted = {"kernels": {}}
    for key, kernel in baseline["kernels"].items():
        if kernel["impl"] == "cupy_samples_fastest":
            continue
        planted["kernels"][key] = kernel
        if kernel["impl"] == "cupy" and kernel["op"] == "deform_psroi_pool":
            planted["kernels"][key + " planted"] = {**kernel, "impl": "cupy_samples_fastest"}
    problems = samples_fastest_shortfalls(planted)
    assert sum("sectors per request" in p for p in problems) == 8  # 4 cases, 2 directions
    assert sum("not below cupy's" in p for p in problems) == 8
