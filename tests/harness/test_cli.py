import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from harness_toy import TOY, toy_math

from harness import casefile, cli, results, timing

REPO = Path(__file__).resolve().parents[2]
FAST = ["--warmup-ms", "0.5", "--rep-ms", "1"]


@pytest.fixture(autouse=True)
def small_copy_and_wide_console(monkeypatch):
    monkeypatch.setitem(timing.COPY_BYTES, "cpu", 1 << 20)
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at 80 columns without a terminal


def test_list_json_describes_operators_implementations_and_tolerances(toy, capsys):
    assert cli.main(["list", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    (op,) = info["operators"]
    assert op["name"] == TOY and op["baseline"] == "baseline"
    assert op["params"]["C"] == 3 and op["input_modes"] == ["random", "zeros"]
    assert op["tolerances"]["forward"]["float32"] == {
        "rel_l2": 1e-6, "max_abs": 1e-6, "why": "one rounding per element"}
    impls = {i["name"]: i for i in op["implementations"]}
    assert impls["missing"]["unavailable"]["cpu"] == "needs the frobnicator"
    assert impls["emulated"]["unavailable"]["cpu"] is None
    assert impls["emulated"]["emulated_on"] == ["cpu"]
    assert {s["name"] for s in info["suites"]} >= {"smoke", "resnet50-dcn", "dtypes"}


def test_list_tables(toy, capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for text in ("operators", "implementations", "tolerances", "suites", "toy_scale",
                 "frobnicator", "emulated"):
        assert text in out, text


def test_run_exits_zero_when_all_pass_and_one_on_a_failure(toy, toy_suite, tmp_path, capsys):
    args = ["run", "--suite", toy_suite, "--device", "cpu", *FAST]
    assert cli.main([*args, "--impl", "good", "baseline", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "dcnbench results" in out and "toy_scale" in out
    assert cli.main([*args, "--impl", "good", "--impl", "wrong", "--dtype", "float32",
                     "--out", str(tmp_path / "b")]) == 1
    out = capsys.readouterr().out
    assert "reproduce: dcnbench case toy_scale" in out
    frame = results.load(tmp_path / "b")
    assert set(frame["impl"]) == {"good", "wrong"}


def test_run_resume_continues_a_run(toy, toy_suite, tmp_path, capsys):
    args = ["run", "--suite", toy_suite, "--device", "cpu", "--no-timing",
            "--out", str(tmp_path / "run")]
    assert cli.main([*args, "--impl", "good"]) == 0
    assert cli.main([*args, "--impl", "good", "baseline", "--resume"]) == 0
    assert set(results.load(tmp_path / "run")["impl"]) == {"good", "baseline"}
    assert cli.main([*args, "--impl", "good"]) == cli.EXIT_USAGE
    assert "already holds a run; pass --resume" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--suite", "nope"], "nope: no such suite"),
        (["run", "--suite", "TOY", "--resume"], "--resume: needs --out DIR"),
        (["run", "--suite", "TOY", "--op", "conv9"], "--op: 'conv9' is not in suite toy"),
        (["case", "nope"], "unknown operator 'nope'; expected one of: toy_scale"),
        (["case", TOY, "--param", "C"], "--param: expected NAME=VALUE, got 'C'"),
        (["case", TOY, "--param", "channels=3"], "has no parameter 'channels'"),
        (["case", TOY, "--param", "C=three"], "parameter 'C' of operator 'toy_scale' expects int"),
        (["case", TOY, "--dtype", "float8"], "not checked at dtype 'float8'"),
        (["case", TOY, "--impl", "fast"], "has no implementation 'fast'"),
        (["case", TOY, "--mode", "zeros", "--backward"], "--backward: mode 'zeros' puts samples"),
        (["case", TOY, "--save", "case.txt"], "--save: expected a FILE.npz path"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_naming_them(toy, toy_suite, capsys, argv, message):
    argv = [toy_suite if a == "TOY" else a for a in argv]
    assert cli.main([*argv, "--device", "cpu"]) == cli.EXIT_USAGE
    assert message in capsys.readouterr().out.replace("\n", "")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU-only machine")
def test_cuda_device_without_a_gpu_is_a_usage_error(toy, toy_suite, capsys):
    assert cli.main(["run", "--suite", toy_suite, "--device", "cuda"]) == cli.EXIT_USAGE
    assert "--device cuda: no CUDA device here" in capsys.readouterr().out


def test_case_saves_inputs_output_and_gradients(toy, tmp_path, capsys):
    path = tmp_path / "case.npz"
    argv = ["case", TOY, "--param", "C=5", "scale=0.5", "--dtype", "bfloat16", "--impl", "good",
            "--device", "cpu", "--seed", "3", "--backward", "--save", str(path)]
    assert cli.main(argv) == 0
    assert "toy_scale/N2_C5_H4_W5_s1_scale0.5_bias/bfloat16/random" in capsys.readouterr().out
    params, arrays = casefile.load(path)
    assert set(arrays) == {"input", "weight", "bias", "output", "grad_output", "grad_input",
                           "grad_weight", "grad_bias"}
    assert params["C"] == 5 and params["scale"] == 0.5
    assert {k: params[k] for k in ("op", "dtype", "mode", "seed", "impl", "device", "status")} == {
        "op": TOY, "dtype": "bfloat16", "mode": "random", "seed": 3, "impl": "good",
        "device": "cpu", "status": "ok"}
    assert arrays["input"].shape == (2, 5, 4, 5) and arrays["input"].dtype == np.float32
    tensors = {k: torch.from_numpy(arrays[k]).bfloat16() for k in ("input", "weight", "bias")}
    expected = toy_math(tensors, params).float().numpy()
    np.testing.assert_array_equal(arrays["output"], expected)
    # bfloat16 widened to float32 exactly: rounding back changes nothing.
    assert torch.equal(torch.from_numpy(arrays["input"]).bfloat16().float(),
                       torch.from_numpy(arrays["input"]))


def test_case_exits_one_when_the_check_fails_and_shows_why(toy, capsys):
    assert cli.main(["case", TOY, "--impl", "wrong", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "fail" in out and "rel_l2 0.01" in out
    assert cli.main(["case", TOY, "--impl", "crash", "--device", "cpu"]) == 1
    assert "RuntimeError: boom" in capsys.readouterr().out


def test_case_defaults_to_the_reference(toy, capsys):
    assert cli.main(["case", TOY, "--device", "cpu"]) == 0
    assert "reference on cpu" in capsys.readouterr().out
    assert cli.main(["case", TOY, "--impl", "emulated", "--device", "cpu"]) == 0
    assert "emulated emulated on cpu" in capsys.readouterr().out


def test_kernels_hands_its_arguments_to_the_build_check(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli.subprocess, "call", lambda command: seen.setdefault("c", command) and 3)
    assert cli.main(["kernels", "--arch", "sm_90", "--arch", "sm_80"]) == 3
    assert seen["c"] == [sys.executable, "-m", "kernels.build_check", "--arch", "sm_90",
                         "--arch", "sm_80"]


def test_plain_checkout_runs_as_python_m_harness_without_importing_the_build_check():
    # What `PYTHONPATH=. python3 -m harness list --json` does, in a fresh interpreter that
    # can then tell which modules the command imported.
    probe = """
import json, runpy, sys
sys.argv = ["harness", "list", "--json"]
try:
    runpy.run_module("harness", run_name="__main__")
except SystemExit as done:
    assert done.code == 0, done.code
assert "kernels.build_check" not in sys.modules, "the build check was imported eagerly"
"""
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": "."}, timeout=120)
    assert done.returncode == 0, done.stderr
    names = {op["name"] for op in json.loads(done.stdout)["operators"]}
    assert {"conv2d", "deform_conv2d", "modulated_deform_conv2d"} <= names


def _subcommands() -> list[str]:
    import argparse

    actions = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


@pytest.mark.parametrize("command", [c for c in _subcommands() if c != "kernels"])
def test_every_subcommands_help_prints(command, capsys):
    # argparse formats help lazily with %: a bare % in a help string crashes --help only.
    # ("kernels" hands --help to kernels.build_check, its own program.)
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
