"""The peers users install (``harness.operators.peer_packages``), against the float64 reference.

torch-ms-deform-attn is built and run for real (``nox -s tests`` installs it).
deformops and DCNv4 do not install here (Python >= 3.12; a GPU to build): their
adapters run against fakes of their documented API surface (``tests/fakes``),
which compute the documented semantics with independent code, so a wrong
layout, coordinate or softmax conversion in an adapter fails here.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from harness import execution, registry
from harness.cases import Case
from harness.operators import peer_packages
from kernels.peers import dcnv4_official, deformops

FAKES = Path(__file__).parent / "fakes"
SMALL = {"ms_deform_attn": {"N": 1, "Lq": 5, "M": 2, "D": 4, "L": 2, "P": 2, "H": 6, "W": 7},
         "deform_conv2d": {"N": 1, "C_in": 4, "C_out": 4, "H": 5, "W": 6, "offset_groups": 2},
         "modulated_deform_conv2d": {"N": 1, "C_in": 4, "C_out": 6, "H": 5, "W": 6, "groups": 2,
                                     "offset_groups": 2, "stride_h": 2},
         "dcnv4": {"N": 1, "H": 5, "W": 6, "group": 2, "group_channels": 16}}


@pytest.fixture
def fake_packages(monkeypatch):
    """tests/fakes first on sys.path, the fakes imported fresh, their call logs empty."""
    monkeypatch.syspath_prepend(str(FAKES))
    for name in list(sys.modules):
        if name.split(".")[0] in ("deformops", "DCNv4"):
            monkeypatch.delitem(sys.modules, name)
    deformops.metadata.cache_clear()
    yield {"deformops": importlib.import_module("deformops.registry"),
           "DCNv4": importlib.import_module("DCNv4.functions")}
    deformops.metadata.cache_clear()


def check_on_cpu(op: str, impl_name: str, params: dict, dtype: str = "float32",
                 backward: bool = True):
    """Each direction's harness verdict of ``impl_name`` on the case, run on the CPU
    through the implementation's prepare (whatever devices it declares)."""
    operator = registry.get_operator(op)
    case = Case(operator, operator.resolve(params), dtype, "random")
    run = execution.prepare(case, "cpu", seed=0, backward=backward)
    impl = registry.get_implementation(op, impl_name)
    on_cpu = registry.Implementation(**{**impl.__dict__, "devices": ("cpu",),
                                        "available": lambda device: None})
    rows = {}
    for direction in ("forward", "backward") if backward else ("forward",):
        row, _ = execution.run(run, on_cpu, direction, timing_config=None)
        rows[direction] = row
    return rows


# --- torch-ms-deform-attn: the real package ----------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("softmax", [False, True])
def test_torch_ms_deform_attn_passes_forward_and_gradients_on_the_cpu(softmax, dtype):
    pytest.importorskip("torch_ms_deform_attn", reason="built by `nox -s tests` (pip sdist)")
    operator = registry.get_operator("ms_deform_attn")
    case = Case(operator, operator.resolve({**SMALL["ms_deform_attn"], "softmax": softmax}),
                dtype, "random")
    run = execution.prepare(case, "cpu", seed=0, backward=True)
    impl = registry.get_implementation("ms_deform_attn", "torch_ms_deform_attn")
    for direction in ("forward", "backward"):
        row, _ = execution.run(run, impl, direction, timing_config=None)
        assert row.status == "ok", (direction, row.reason)


def test_torch_ms_deform_attn_metadata_names_its_version_and_build():
    pytest.importorskip("torch_ms_deform_attn", reason="built by `nox -s tests` (pip sdist)")
    found = peer_packages.peer_metadata()["packages"]["torch-ms-deform-attn"]
    assert found["version"] == "0.1.1"
    assert found["cuda_kernels"] is torch.cuda.is_available()  # CPU build here


# --- deformops: the fake of its documented surface ---------------------------

def test_deformops_is_unavailable_on_python_311_with_the_reason():
    if sys.version_info >= (3, 12):
        pytest.skip("deformops may import on Python >= 3.12")
    reason = registry.get_implementation("ms_deform_attn", "deformops_eager").unavailable_on("cpu")
    assert "Python >= 3.12" in reason and "gpu-check" in reason


@pytest.mark.parametrize("backend", deformops.BACKENDS)
@pytest.mark.parametrize("op", ["ms_deform_attn", "deform_conv2d", "modulated_deform_conv2d"])
def test_deformops_adapters_pass_through_the_documented_surface(fake_packages, op, backend):
    rows = check_on_cpu(op, f"deformops_{backend}", SMALL[op])
    assert {d: r.status for d, r in rows.items()} == {"forward": "ok", "backward": "ok"}, \
        {d: r.reason for d, r in rows.items()}
    calls = fake_packages["deformops"].CALLS
    assert calls and {call["backend"] for call in calls} == {backend}
    if op != "ms_deform_attn":
        params = registry.get_operator(op).resolve(SMALL[op])
        out_h = (params["H"] + 2 * params["pad_h"] - 3) // params["stride_h"] + 1
        assert calls[0]["value_shape"] == (1, params["H"], params["W"], params["C_in"])
        assert calls[0]["offset_shape"][1:] == (out_h, params["W"], params["offset_groups"], 9, 2)


def test_deformops_msda_fuses_the_softmax(fake_packages):
    rows = check_on_cpu("ms_deform_attn", "deformops_triton",
                        {**SMALL["ms_deform_attn"], "softmax": True})
    assert rows["forward"].status == "ok"
    assert fake_packages["deformops"].CALLS[0]["softmax"] is True


def test_deformops_metadata_with_the_package_importable(fake_packages):
    found = peer_packages.peer_metadata()
    assert found["packages"]["deformops"] == {
        "version": "3.0.1+fake", "backends": ["eager", "triton", "cuda"]}
    assert found["precision"]["ms_deform_attn/torch_ms_deform_attn"]["float16"] == "upcast to float32"
    assert found["precision"]["ms_deform_attn/cupy_vectorized"]["bfloat16"] == (
        "native storage, float32 arithmetic")


# --- DCNv4: the fake of its documented surface --------------------------------

def test_dcnv4_official_is_cuda_only_and_says_so():
    reason = registry.get_implementation("dcnv4", "dcnv4_official").unavailable_on("cpu")
    assert "does not run on cpu" in reason


def test_dcnv4_official_dcnv4_takes_the_contracts_layout(fake_packages):
    rows = check_on_cpu("dcnv4", "dcnv4_official", SMALL["dcnv4"], backward=False)
    assert rows["forward"].status == "ok", rows["forward"].reason
    assert fake_packages["DCNv4"].CALLS[0]["im2col_step"] == dcnv4_official.IM2COL_STEP


def test_dcnv4_official_flash_deform_attn_shows_the_released_double_softmax(fake_packages):
    """The released module's F.softmax before a kernel that applies it again: a fail
    row with its error, not hidden; the packing itself is right (same output as the
    reference of softmax applied twice)."""
    rows = check_on_cpu("ms_deform_attn", "dcnv4_official",
                        {**SMALL["ms_deform_attn"], "softmax": True}, backward=False)
    assert rows["forward"].status == "fail"
    assert rows["forward"].rel_l2 > 0.05 and "rel_l2" in rows["forward"].reason
    call = fake_packages["DCNv4"].CALLS[0]
    assert call["K"] == 2 and call["packed_shape"] == (1, 5, 2, 2 * 2 * 3)


def test_dcnv4_official_packing_is_the_kernels(fake_packages):
    """With the module's softmax undone (log of softmax = logits up to a constant per
    head), the kernel's own softmax gives the contract's output: the locations and
    logits are packed where the kernel reads them."""
    from kernels.reference.ms_deform_attn import ms_deform_attn

    operator = registry.get_operator("ms_deform_attn")
    params = operator.resolve({**SMALL["ms_deform_attn"], "softmax": True})
    inputs = operator.make_inputs(params, torch.float64, "cpu", torch.Generator().manual_seed(0))
    tensors = [inputs[name] for name in ("value", "spatial_shapes", "level_start_index",
                                         "sampling_locations", "attention_weights")]
    out = dcnv4_official.prepare_ms_deform_attn(*tensors, softmax=True)()
    twice = torch.softmax(tensors[4].flatten(3), -1).view_as(tensors[4])
    torch.testing.assert_close(out, ms_deform_attn(*tensors[:4], twice, softmax=True))


def test_dcnv4_official_refuses_weights_as_given_naming_why(fake_packages):
    rows = check_on_cpu("ms_deform_attn", "dcnv4_official", SMALL["ms_deform_attn"],
                        backward=False)
    assert rows["forward"].status == "error"
    assert "always applies a softmax" in rows["forward"].reason
