import dataclasses
import shlex

import pytest
from harness_toy import TOY

from harness import cli, registry
from harness.cases import make_case


def test_id_lists_every_parameter_in_declared_order(toy):
    op = registry.get_operator(TOY)
    case = make_case(op, {"scale": 0.5, "C": 8}, "float16", "zeros")
    assert case.id == "toy_scale/N2_C8_H4_W5_s1_scale0.5_bias/float16/zeros"


def test_id_does_not_depend_on_which_parameters_were_named(toy):
    op = registry.get_operator(TOY)
    named = make_case(op, {"N": 2, "C": 3, "H": 4, "W": 5, "stride_h": 1, "stride_w": 1,
                           "scale": 1.0, "bias": True}, "float32", "random")
    defaults = make_case(op, {}, "float32", "random")
    assert named.id == defaults.id == "toy_scale/N2_C3_H4_W5_s1_scale1_bias/float32/random"


def test_id_pairs_and_booleans(toy):
    op = registry.get_operator(TOY)
    case = make_case(op, {"stride_h": 2, "stride_w": 1, "bias": False}, "float32", "random")
    assert case.id == "toy_scale/N2_C3_H4_W5_s2x1_scale1_nobias/float32/random"


def test_flags_named_only_when_true_and_a_dtype_check(toy):
    op = dataclasses.replace(registry.get_operator(TOY), id_flags_if_true=("bias",),
                             id_keys={"bias": "b"})
    assert make_case(op, {}, "float32", "random").id == (
        "toy_scale/N2_C3_H4_W5_s1_scale1_b/float32/random")
    assert make_case(op, {"bias": False}, "float32", "random").id == (
        "toy_scale/N2_C3_H4_W5_s1_scale1/float32/random")

    def no_half_bias(params, dtype):
        if params["bias"] and dtype == "float16":
            raise ValueError("parameter 'bias' must be false for dtype float16")

    checked = dataclasses.replace(op, validate_dtype=no_half_bias)
    with pytest.raises(ValueError, match="parameter 'bias' must be false for dtype float16"):
        make_case(checked, {}, "float16", "random")
    assert make_case(checked, {"bias": False}, "float16", "random").dtype == "float16"


def test_deform_conv2d_id_reads_as_documented():
    op = registry.get_operator("deform_conv2d")
    case = make_case(op, {"C_in": 64, "C_out": 64, "H": 28, "W": 28}, "float32", "random")
    assert case.id == (
        "deform_conv2d/N2_Cin64_Cout64_H28_W28_k3x3_s1_p1_d1_g1_og1_bias/float32/random")


def test_psroi_id_reads_negated_flags_and_pooled_pairs_plainly():
    op = registry.get_operator("deform_psroi_pool")
    with_trans = make_case(op, {"no_trans": False}, "float32", "random").id
    without = make_case(op, {"no_trans": True}, "float32", "random").id
    assert "_trans_" in f"_{with_trans.split('/')[1]}_" and "nonotrans" not in with_trans
    assert "_notrans_" in f"_{without.split('/')[1]}_"
    pooled = make_case(registry.get_operator("roi_align"), {"pooled_h": 7, "pooled_w": 7},
                       "float32", "random").id
    assert "_pooled7_" in pooled and "pooledw" not in pooled


def test_make_case_rejects_unknown_dtype_and_mode(toy):
    op = registry.get_operator(TOY)
    with pytest.raises(ValueError, match="not checked at dtype 'float8'; expected one of: float64"):
        make_case(op, {}, "float8", "random")
    with pytest.raises(ValueError, match="no input mode 'edges'; expected one of: random, zeros"):
        make_case(op, {}, "float32", "edges")


def test_reproduce_command_parses_back_to_the_same_case(toy):
    op = registry.get_operator(TOY)
    case = make_case(op, {"C": 5, "scale": 0.25, "bias": False}, "bfloat16", "zeros")
    command = case.reproduce_command("good", "cpu", seed=7, backward=True)
    words = shlex.split(command)
    assert words[:3] == ["dcnbench", "case", TOY]
    args = cli.build_parser().parse_args(words[1:])
    again = make_case(op, cli._parse_params(args.param), args.dtype, args.mode)
    assert again.id == case.id
    assert (args.impl, args.device, args.seed, args.backward) == ("good", "cpu", 7, True)
