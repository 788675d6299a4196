"""The peers page (``reports.peers``): its verdicts on planted rows, and its link in the site."""

import pandas as pd
import pytest

from reports import peers


def _rows(*rows):
    columns = ("device", "op", "impl", "impl_kind", "dtype", "direction", "status", "reason",
               "speedup")
    return pd.DataFrame([dict(zip(columns, row, strict=True)) for row in rows])


@pytest.fixture
def entries():
    frame = _rows(
        ("cpu", "ms_deform_attn", "reference", "reference", "float32", "forward", "ok", "", None),
        ("cpu", "ms_deform_attn", "torch_ms_deform_attn", "peer", "float16", "forward", "ok", "", 2.0),
        ("cpu", "ms_deform_attn", "torch_ms_deform_attn", "peer", "float16", "backward", "ok", "", 8.0),
        ("cpu", "ms_deform_attn", "pytorch_gridsample", "peer", "bfloat16", "forward", "xfail",
         "known inaccuracy", 1.0),
        ("cpu", "ms_deform_attn", "pytorch_gridsample", "peer", "bfloat16", "backward", "ok", "", 1.0),
        ("cpu", "ms_deform_attn", "deformops_eager", "peer", "float32", "forward", "skipped",
         "deformops is not importable here", None),
        ("cuda", "ms_deform_attn", "dcnv4_official", "peer", "float32", "forward", "error",
         "ValueError: softmax must be true", None),
        ("cpu", "ms_deform_attn", "cupy_vectorized", "kernel", "float16", "forward", "ok", "", None),
    )
    metadata = {"run-a": {"peers": {"precision": {
        "ms_deform_attn/torch_ms_deform_attn": {"float16": "upcast to float32"}}}},
        "run-b": {"peers": {"precision": {
            "ms_deform_attn/cupy_vectorized": {"float16": "native storage, float32 arithmetic"}}}},
        "run-c": {}}  # an older run without the peers metadata
    return {(e["device"], e["impl"], e["dtype"]): e for e in peers.table(frame, metadata)}


def test_the_references_are_not_listed(entries):
    assert not [key for key in entries if key[1] == "reference"]


def test_a_peer_passing_everything_with_its_geometric_mean_speedup(entries):
    entry = entries[("cpu", "torch_ms_deform_attn", "float16")]
    assert (entry["supported"], entry["passes"]) == ("yes", "yes")
    assert entry["speed"] == pytest.approx(4.0) and entry["timed_rows"] == 2
    assert entry["precision"] == "upcast to float32"


def test_a_known_inaccuracy_still_misses_the_float64_check(entries):
    assert entries[("cpu", "pytorch_gridsample", "bfloat16")]["passes"] == "no: 1 of 2 rows"


def test_absent_and_unsupported_say_why(entries):
    assert entries[("cpu", "deformops_eager", "float32")]["supported"] == (
        "absent: deformops is not importable here")
    unsupported = entries[("cuda", "dcnv4_official", "float32")]
    assert unsupported["supported"].startswith("no: ValueError: softmax must be true")
    assert unsupported["passes"] == "–" and unsupported["speed"] is None


def test_our_untimed_kernel_has_no_speed_and_says_how_it_computes(entries):
    entry = entries[("cpu", "cupy_vectorized", "float16")]
    assert entry["speed"] is None
    assert entry["precision"] == "native storage, float32 arithmetic"


def test_the_site_builds_the_peers_page_and_links_it(site):
    out = site.index.parent
    assert (out / "peers.html").is_file()
    assert 'href="peers.html"' in site.index.read_text()
    page = (out / "peers.html").read_text()
    assert "torchvision" in page and "passes float64" in page
