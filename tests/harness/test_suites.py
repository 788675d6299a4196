import dataclasses
import re

import pytest
import torch
from harness_toy import TOY

from harness import registry, suites
from harness.suites import SuiteError


def test_expansion_is_the_product_of_axes_tied_groups_dtypes_and_modes(toy, write_suite):
    path = write_suite("""
        description = "product"
        seed = 3
        [[sweep]]
        op = "toy_scale"
        impls = ["reference", "good"]
        dtypes = ["float32", "float16"]
        modes = "all"
        [sweep.params]
        scale = 2
        [sweep.axes]
        N = [1, 2]
        [sweep.tied]
        shape = [{ H = 4, W = 4 }, { H = 8, W = 6, stride_h = 2 }]
    """)
    suite = suites.load(path)
    assert (suite.name, suite.description, suite.seed) == ("toy", "product", 3)
    assert len(suite.cases) == 2 * 2 * 2 * 2  # N × shape × dtype × mode
    ids = [sc.case.id for sc in suite.cases]
    assert len(set(ids)) == len(ids)
    assert "toy_scale/N2_C3_H8_W6_s2x1_scale2_bias/float16/zeros" in ids
    assert all(sc.impls == ("reference", "good") and not sc.backward for sc in suite.cases)
    assert all(sc.case.params["scale"] == 2.0 for sc in suite.cases)


def test_defaults_every_implementation_float32_random(toy, write_suite):
    suite = suites.load(write_suite("""
        description = "defaults"
        [[sweep]]
        op = "toy_scale"
    """))
    (only,) = suite.cases
    assert only.case.dtype == "float32" and only.case.mode == "random"
    assert only.impls == tuple(i.name for i in registry.implementations_of(TOY))
    assert suite.seed == 0


def test_filters_keep_matching_points(toy, write_suite):
    suite = suites.load(write_suite("""
        description = "filters"
        [[sweep]]
        op = "toy_scale"
        filters = ["H >= W", "not (H == 4 and W == 4) or C % 2 == 1"]
        [sweep.axes]
        H = [4, 8]
        W = [4, 8]
        C = [2, 3]
    """))
    points = sorted((sc.case.params["H"], sc.case.params["W"], sc.case.params["C"])
                    for sc in suite.cases)
    assert points == [(4, 4, 3), (8, 4, 2), (8, 4, 3), (8, 8, 2), (8, 8, 3)]


def test_extends_takes_the_sweeps_and_override_replaces_keys(toy, write_suite):
    base = write_suite("""
        description = "base"
        seed = 5
        [[sweep]]
        op = "toy_scale"
        dtypes = ["float32"]
        [sweep.axes]
        C = [2, 3]
    """, name="base")
    derived = suites.load(write_suite(f"""
        description = "derived"
        extends = "{base}"
        [override]
        dtypes = ["float16", "bfloat16"]
        backward = true
    """, name="derived"))
    assert (derived.description, derived.seed) == ("derived", 5)
    assert sorted((sc.case.params["C"], sc.case.dtype) for sc in derived.cases) == [
        (2, "bfloat16"), (2, "float16"), (3, "bfloat16"), (3, "float16")]
    assert all(sc.backward for sc in derived.cases)
    assert derived.sha256 != suites.load(base).sha256
    broken = write_suite(f"""
        description = "derived"
        extends = "{base}"
        [override]
        modes = ["edges"]
    """, name="broken")
    with pytest.raises(SuiteError, match=re.escape(
            f"{broken} (extends {base}): sweep[0].modes: \"edges\" is not one of: random, zeros")):
        suites.load(broken)


def test_base_sweeps_takes_some_of_the_bases_sweeps(toy, write_suite):
    base = write_suite("""
        description = "base"
        [[sweep]]
        op = "toy_scale"
        [sweep.params]
        C = 2
        [[sweep]]
        op = "toy_scale"
        [sweep.params]
        C = 3
    """, name="base")
    derived = suites.load(write_suite(f"""
        description = "derived"
        extends = "{base}"
        base_sweeps = [1]
    """, name="derived"))
    assert [sc.case.params["C"] for sc in derived.cases] == [3]
    broken = write_suite(f"""
        description = "derived"
        extends = "{base}"
        base_sweeps = [2]
    """, name="broken")
    with pytest.raises(SuiteError, match=re.escape(
            f"{broken}: base_sweeps: expected a non-empty list of indices of {base}'s 2 sweeps "
            "(0 to 1), got [2]")):
        suites.load(broken)


def test_a_sweep_may_name_several_operators(toy, write_suite):
    registry.register_operator(dataclasses.replace(registry.get_operator(TOY), name="toy_twin"))
    registry.implementation("toy_twin", "reference", kind="reference",
                            dtypes=("float64", "float32"))(lambda inputs, params: None)
    suite = suites.load(write_suite("""
        description = "two"
        [[sweep]]
        op = ["toy_scale", "toy_twin"]
        impls = ["reference"]
    """))
    assert [sc.case.op.name for sc in suite.cases] == ["toy_scale", "toy_twin"]


def assert_message(text: str, path: str, expected: str) -> None:
    """``text`` is "<path>: <expected>", where "..." in ``expected`` stands for anything."""
    pattern = ".*".join(re.escape(piece) for piece in expected.split("..."))
    assert re.match(f"{re.escape(path)}: {pattern}", text, re.DOTALL), text


BASE = """
description = "broken"
[[sweep]]
op = "toy_scale"
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[sweep.axes]\nC = \"2\"", 'sweep[0].axes.C: expected a non-empty list of integers, got "2"'),
        ("[sweep.axes]\nC = []", "sweep[0].axes.C: expected a non-empty list of integers, got []"),
        ("[sweep.axes]\nC = [2, 2.5]", "sweep[0].axes.C: expected a non-empty list of integers, got [2, 2.5]"),
        ("[sweep.axes]\nchannels = [2]", "sweep[0].axes.channels: toy_scale has no parameter 'channels'; expected one of: N, C"),
        ("[sweep.params]\nbias = 1", "sweep[0].params.bias: expected a boolean, got 1"),
        ("[sweep.params]\nC = true", "sweep[0].params.C: expected an integer, got true"),
        ("[sweep.params]\nC = 0", "sweep[0]: point {'C': 0}: parameter 'C' must be >= 1"),
        ("[sweep.params]\nC = 2\n[sweep.axes]\nC = [3]", "sweep[0].axes.C: also set in ...sweep[0].params; expected each parameter once"),
        ("[sweep.tied]\nshape = { H = 4 }", "sweep[0].tied.shape: expected a non-empty list of parameter tables"),
        ("[sweep.tied]\nshape = [{ H = 4.5 }]", "sweep[0].tied.shape[0].H: expected an integer, got 4.5"),
        ("impls = [\"fast\"]", 'sweep[0].impls: "fast" is not one of: reference, baseline'),
        ("dtypes = [\"float8\"]", 'sweep[0].dtypes: "float8" is not one of: float64, float32'),
        ("modes = [\"edges\"]", 'sweep[0].modes: "edges" is not one of: random, zeros'),
        ("modes = \"some\"", 'sweep[0].modes: expected a non-empty list of names or "all", got "some"'),
        ("backward = \"yes\"", 'sweep[0].backward: expected a boolean, got "yes"'),
        ("speed = 1", "sweep[0].speed: unknown key; expected one of: axes, backward"),
        ("filters = [\"Cin > 2\"]", "sweep[0].filters[0]: unknown name 'Cin' in 'Cin > 2'; expected a parameter of toy_scale"),
        ("filters = [\"__import__('os')\"]", "sweep[0].filters[0]: ... is not allowed"),
        ("filters = [\"C.real > 1\"]", "sweep[0].filters[0]: 'C.real' in 'C.real > 1' is not allowed"),
        ("filters = [\"C >\"]", "sweep[0].filters[0]: 'C >' is not an expression"),
        ("filters = [1]", "sweep[0].filters[0]: expected an expression string, got 1"),
    ],
)
def test_malformed_sweeps_name_file_key_and_expectation(toy, write_suite, extra, message):
    path = write_suite(BASE + extra)
    with pytest.raises(SuiteError) as raised:
        suites.load(path)
    assert_message(str(raised.value), path, message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[sweep]]\nop = "toy_scale"', "description: missing; expected a string"),
        ('description = "x"', "sweep: missing; expected a list"),
        ('description = "x"\nsweep = [1]', "sweep: expected one or more [[sweep]] tables"),
        ('description = 3\n[[sweep]]\nop = "toy_scale"', "description: expected a string, got 3"),
        ('description = "x"\ncolour = 1\n[[sweep]]\nop = "toy_scale"', "colour: unknown key; expected one of: case_timeout, description, extends"),
        ('description = "x"\n[[sweep]]\nop = "toy_conv"', "sweep[0].op: unknown operator 'toy_conv'"),
        ('description = "x"\n[[sweep]]\nop = 3', "sweep[0].op: expected a string or list, got 3"),
        ('description = "x"\n[[sweep]]\nop = "toy_scale"\n[[sweep]]\nop = "toy_scale"',
         "sweep[1]: case toy_scale/.../float32/random is also produced by ...sweep[0]"),
        ('description = "x"\n[[sweep]]\nop = "toy_scale"\nfilters = ["C > 100"]',
         "the sweeps produce no case; expected at least one"),
        ('description = "x"\n[override]\nseed = 1\n[[sweep]]\nop = "toy_scale"',
         "override.seed: unknown key; expected one of: backward, dtypes, impls, modes"),
        ("description = ", "not valid TOML: ..."),
    ],
)
def test_malformed_suites_name_file_key_and_expectation(toy, write_suite, text, message):
    path = write_suite(text)
    with pytest.raises(SuiteError) as raised:
        suites.load(path)
    assert_message(str(raised.value), path, message)


def test_extends_cycles_and_missing_suites_are_errors(toy, write_suite, tmp_path):
    path = write_suite(f'description = "loop"\nextends = "{tmp_path / "loop.toml"}"', name="loop")
    with pytest.raises(SuiteError, match="extends itself"):
        suites.load(path)
    with pytest.raises(SuiteError, match="no such suite; expected a path to a .toml file or one of: "
                                         ".*smoke"):
        suites.load("no-such-suite")


# --- the suites we ship, against the real operators ---------------------------------------


def test_smoke_covers_every_operator_implementation_and_input_mode():
    suite = suites.load("smoke")
    registry.load_all()
    for op in registry.OPERATORS.values():
        mine = [sc for sc in suite.cases if sc.case.op is op]
        assert mine, f"smoke has no {op.name} case"
        # Every implementation of the repository's own (plugins' come and go).
        assert {i for sc in mine for i in sc.impls} >= {
            i.name for i in registry.implementations_of(op.name)
            if i.source.startswith("harness.operators")}
        assert {sc.case.mode for sc in mine} == set(op.input_modes)
        assert {sc.case.dtype for sc in mine} == {"float32", "float16", "bfloat16"}
        assert all(sc.backward for sc in mine)
        largest = max(_input_elements(sc.case) for sc in mine)
        assert largest <= SMOKE_MAX_INPUT_ELEMENTS, f"{op.name}: smoke shapes must stay small"


# Input elements of the largest smoke case of any operator: keeps the suite at
# a couple of minutes on a 2-core CPU with every kernel emulated.
SMOKE_MAX_INPUT_ELEMENTS = 10_000


def _input_elements(case) -> int:
    """Elements of all the case's input tensors: a size measure for any operator."""
    inputs = case.op.make_inputs(case.params, torch.float32, "cpu",
                                 torch.Generator().manual_seed(0), case.mode)
    return sum(t.numel() for t in inputs.values())


def test_resnet50_dcn_is_the_stage_3_to_5_convs():
    suite = suites.load("resnet50-dcn")
    plain = [sc for sc in suite.cases if not sc.case.params["allow_tf32"]]
    assert len(plain) == 2 * 2 * 2 * 12  # ops × N × offset_groups × layers
    layers = set()
    for sc in plain:
        p = sc.case.params
        assert sc.case.op.name in ("deform_conv2d", "modulated_deform_conv2d")
        assert (p["kernel_h"], p["kernel_w"], p["pad_h"], p["pad_w"]) == (3, 3, 1, 1)
        assert p["C_in"] == p["C_out"] and p["N"] in (2, 8) and p["offset_groups"] in (1, 4)
        assert sc.case.dtype == "float32" and sc.backward
        out_h = (p["H"] + 2 - 3) // p["stride_h"] + 1
        out_w = (p["W"] + 2 - 3) // p["stride_w"] + 1
        layers.add((p["C_in"], out_h, out_w, p["stride_h"]))
    expected = {(128, 28, 28), (128, 100, 168), (256, 14, 14), (256, 50, 84),
                (512, 7, 7), (512, 25, 42)}
    assert layers == {(c, h, w, s) for c, h, w in expected for s in (1, 2)}
    # The TF32 sweep: the stride-1 224x224 layers at N = 8, float32, forward and backward.
    tf32 = {(sc.case.op.name, sc.case.params["C_in"], sc.case.params["H"], sc.case.params["N"],
             sc.case.params["stride_h"], sc.case.dtype, sc.backward)
            for sc in suite.cases if sc.case.params["allow_tf32"]}
    assert tf32 == {(op, c, h, 8, 1, "float32", True) for op in ("deform_conv2d",
                                                                  "modulated_deform_conv2d")
                    for c, h in ((128, 28), (256, 14), (512, 7))}
    assert len(suite.cases) == len(plain) + len(tf32)


def test_dtypes_suite_is_resnet50_dcn_in_every_kernel_dtype():
    base = {sc.case.id for sc in suites.load("resnet50-dcn").cases
            if not sc.case.params["allow_tf32"]}  # TF32 is float32's alone
    cases = suites.load("dtypes").cases
    assert {sc.case.dtype for sc in cases} == {"float32", "float16", "bfloat16"}
    assert {sc.case.id.replace(f"/{sc.case.dtype}/", "/float32/") for sc in cases} == base
    assert len(cases) == 3 * len(base)
