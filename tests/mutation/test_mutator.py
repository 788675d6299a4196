"""The mutator of ``kernels/cuda`` (``mutator.py``) and the mutant runner's
choices (``run_mutants.py``): known answers on small sources, and the real
kernel files."""

from __future__ import annotations

import collections
from pathlib import Path

import mutator
import pytest
import run_mutants

SNIPPET = """\
// a comment with a < b and atomicAdd(p, v)
#include "scalar_conversions.cuh"
template <typename scalar_t>
__global__ void k(float* out, const float* in, int height, int width) {
    const char* s = "x < y";
    for (int p = 0; p < height; ++p) {
        if (in[p] >= 0.f && p != width || p == 0) atomicAdd(out + p, in[p] * 2.f);
    }
    __syncthreads();
    const float y = floorf(in[0]) + static_cast<float>(width) - 1;
    out[0] = __float2half_rn(y);  /* a < b */
}
"""


def changes(source: str, operator: str) -> list[tuple[int, str, str]]:
    return [(m.line, m.original, m.replacement) for m in mutator.mutants(source)
            if m.operator == operator]


def test_code_only_blanks_comments_strings_and_directives_in_place():
    code = mutator.code_only(SNIPPET)
    assert len(code) == len(SNIPPET)
    assert code.count("\n") == SNIPPET.count("\n")
    assert "comment" not in code and "include" not in code and '"x < y"' not in code
    assert "a < b" not in code
    assert "for (int p = 0; p < height; ++p)" in code


def test_directive_continuations_are_blanked():
    code = mutator.code_only("#define F(a) \\\n    (a + 1)\nint x = a + 1;\n")
    assert "(a + 1)" not in code.split("\n")[1] and "a + 1" in code.split("\n")[2]


KNOWN_CHANGES = {
    "relational": [(6, " < ", " <= "), (7, " >= ", " > ")],
    "equality": [(7, " == ", " != "), (7, " != ", " == ")],
    "logical": [(7, " && ", " || "), (7, " || ", " && ")],
    "arithmetic": [(7, " + ", " - "), (10, " + ", " - "), (10, " - ", " + ")],
    "bound": [(6, "height", "height - 1"), (6, "height", "height + 1"), (6, "0", "1"),
              (10, " - 1", "")],
    "swap": [(4, "height", "width"), (4, "width", "height"), (6, "height", "width"),
             (7, "width", "height"), (10, "width", "height")],
    "drop": [(7, " + p", ""), (10, " + static_cast<float>(width)", ""), (10, " - 1", "")],
    "atomic": [(7, "atomicAdd(out + p, in[p] * 2.f)", "*(out + p) += in[p] * 2.f")],
    "barrier": [(9, "__syncthreads();", ";")],
    "rounding": [(10, "floorf(", "ceilf("), (11, "_rn(", "_rz(")],
}


@pytest.mark.parametrize("operator", mutator.OPERATORS)
def test_each_operator_makes_exactly_the_known_mutants(operator):
    """Comments, strings, the #include, the template's brackets and the
    pointer declarations give no mutant; the code gives these."""
    assert changes(SNIPPET, operator) == KNOWN_CHANGES[operator]


def test_apply_changes_only_the_span_and_refuses_a_changed_file():
    (atomic,) = [m for m in mutator.mutants(SNIPPET) if m.operator == "atomic"]
    mutated = atomic.apply(SNIPPET)
    assert mutated.replace("*(out + p) += in[p] * 2.f", "atomicAdd(out + p, in[p] * 2.f)") \
        == SNIPPET
    assert atomic.key == (
        "if (in[p] >= 0.f && p != width || p == 0) [[atomicAdd(out + p, in[p] * 2.f)=>"
        "*(out + p) += in[p] * 2.f]];"
    )
    with pytest.raises(ValueError, match="line 7 no longer holds"):
        atomic.apply(SNIPPET.replace("atomicAdd", "atomicSub"))


def test_an_atomic_call_over_two_lines_is_one_mutant():
    source = "void f(float4* to, float w) {\n    atomicAdd(to,\n              make_float4(w, w, w, w));\n}\n"
    (atomic,) = mutator.mutants(source)
    assert atomic.operator == "atomic" and atomic.line == 2
    assert atomic.replacement == "*(to) += make_float4(w, w, w, w)"
    assert "atomicAdd" not in atomic.apply(source)


KERNEL_FILES = sorted(Path(run_mutants.CUDA_DIR).glob("*.cu*"))


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_every_mutant_of_the_kernels_changes_them_and_keys_are_unique(path):
    text = path.read_text()
    found = mutator.mutants(text)
    assert found, f"no mutant of {path.name}"
    assert len({m.key for m in found}) == len(found)
    for m in found:
        assert m.apply(text) != text
        marked = " ".join(f"[[{m.original}=>{m.replacement}]]".split())
        assert marked in m.key


def test_selection_is_deterministic_capped_per_operator_and_in_file_order():
    found = mutator.mutants((Path(run_mutants.CUDA_DIR) / "deform_conv2d.cu").read_text())
    chosen = run_mutants.select(found, 3)
    assert [m.key for m in chosen] == [m.key for m in run_mutants.select(found[::-1], 3)][::-1]
    counts = collections.Counter(m.operator for m in chosen)
    assert all(n == min(3, sum(m.operator == op for m in found)) for op, n in counts.items())
    assert [found.index(m) for m in chosen] == sorted(found.index(m) for m in chosen)
    assert run_mutants.select(found, 0) == found


def test_every_kernel_file_has_its_operators_tests():
    """Each file of kernels/cuda maps to the tests of the operators that
    compile it: a header to every includer's operators."""
    subsets = run_mutants.tests_by_file()
    assert set(subsets) == {p.name for p in KERNEL_FILES}
    assert {"tests/test_deform_conv2d.py", "tests/test_deform_conv2d_edges.py"} \
        <= set(subsets["deform_conv2d.cu"])
    assert "tests/test_deform_roi_pool.py" not in subsets["deform_psroi_pool.cu"]
    assert "tests/test_dcnv4.py" in subsets["dcnv3_common.cuh"]
    assert {"tests/test_dcnv3.py", "tests/test_deform_conv2d.py",
            "tests/test_deform_roi_pool.py", "tests/test_deform_psroi_pool.py"} \
        <= set(subsets["scalar_conversions.cuh"])
    racecheck = "tests/test_kernels_under_racecheck.py::test_backward_has_no_race[deform_conv2d/deform_conv2d/cupy]"
    assert racecheck in subsets["deform_conv2d.cu"]
    assert racecheck not in subsets["deform_roi_pool.cu"]
    for tests in subsets.values():
        assert tests and all((run_mutants.ROOT / t.split("::")[0]).is_file() for t in tests)


def test_equivalent_mutants_are_real_mutants_with_reasons():
    for (file, key), reason in run_mutants.equivalent_mutants().items():
        keys = {m.key for m in mutator.mutants((Path(run_mutants.CUDA_DIR) / file).read_text())}
        assert key in keys, f"{file}: {key!r} is listed as equivalent but is no mutant"
        assert len(reason) > 20, f"{file}: {key!r} needs the reason it is equivalent"


@pytest.mark.parametrize("status, output, expected", [
    (0, "12 passed", ("survived", "")),
    (1, "FAILED tests/test_x.py::test_y[a] - AssertionError\n", ("killed", "tests/test_x.py::test_y[a]")),
    (None, "", ("killed", "timeout")),
    (-11, "Fatal Python error: Segmentation fault", ("killed", "crash (exit status -11)")),
    (1, "kernels.emulator.errors.CompileError: g++ could not compile the kernel source\n"
        "k.cu:3:5: error: no match for 'operator+='\n", ("invalid", "k.cu:3:5: error: no match for 'operator+='")),
])  # fmt: skip
def test_outcomes(status, output, expected):
    assert run_mutants.outcome_of(status, output) == expected
