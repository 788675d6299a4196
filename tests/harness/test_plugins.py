"""Plugins: the example package installed from examples/plugin, --plugin, a suite's
``plugins``, and what a bad plugin or registration says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness import plugins, suites
from harness.registry import RegistryError, implementation

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "plugin"


def dcnbench(*args: str, pythonpath: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in [*pythonpath, ROOT])}
    return subprocess.run([sys.executable, "-m", "harness", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


SUITE = """
    description = "deform_conv2d against the example plugin's peer"
    [[sweep]]
    op = "deform_conv2d"
    impls = ["torchvision", "grid_sample"]
    dtypes = ["float32"]
    backward = true
    [sweep.params]
    N = 1
    C_in = 4
    C_out = 4
    H = 6
    W = 6
    [sweep.axes]
    groups = [1, 2]
"""


@pytest.mark.slow
def test_the_installed_example_plugin_runs_a_suite(tmp_path):
    """pip installs examples/plugin (its entry point included) into a scratch directory
    on the test's path; a suite naming its implementation then runs with nothing else
    to say where it comes from."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-build-isolation", "--target", str(site), str(EXAMPLE)],
                   check=True, capture_output=True, timeout=300)
    assert list(site.glob("dcnbench_example_plugin-*.dist-info/entry_points.txt"))
    suite = tmp_path / "plugin.toml"
    suite.write_text(textwrap.dedent(SUITE))
    done = dcnbench("run", "--suite", str(suite), "--device", "cpu", "--warmup-ms", "1",
                    "--rep-ms", "3", "--out", str(tmp_path / "run"), pythonpath=[site],
                    cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    found = [r for r in rows(tmp_path / "run") if r["impl"] == "grid_sample"]
    assert len(found) == 4 and {r["status"] for r in found} == {"ok"}
    assert {r["impl_source"] for r in found} == {"dcnbench_example_plugin"}
    # The plugin's metric is computed and stored like the built-in ones.
    assert all(r["metrics"]["samples_per_us"] > 0 for r in found)
    metadata = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert metadata["plugins"]["dcnbench_example_plugin"].startswith("entry point 'example'")


def test_a_plugin_module_on_the_command_line_and_in_a_suite(tmp_path):
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent('''
        import functools
        from harness.registry import implementation
        from kernels.reference.conv2d import conv2d

        @implementation("conv2d", "mine", kind="peer", dtypes=("float32",))
        def prepare(inputs, params):
            """conv2d by the reference's function, in float32 (a test plugin)."""
            return functools.partial(
                conv2d, inputs["input"], inputs["weight"], inputs.get("bias"),
                stride=(params["stride_h"], params["stride_w"]),
                padding=(params["pad_h"], params["pad_w"]),
                dilation=(params["dilation_h"], params["dilation_w"]), groups=params["groups"])
    '''))
    listed = dcnbench("--plugin", "my_plugin", "list", "--json", pythonpath=[tmp_path],
                      cwd=tmp_path)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "mine" in {i["name"] for op in json.loads(listed.stdout)["operators"]
                      if op["name"] == "conv2d" for i in op["implementations"]}
    suite = tmp_path / "mine.toml"
    suite.write_text(textwrap.dedent('''
        description = "a suite that loads its plugin"
        plugins = ["my_plugin"]
        [[sweep]]
        op = "conv2d"
        impls = ["mine"]
        dtypes = ["float32"]
    '''))
    done = dcnbench("run", "--suite", str(suite), "--device", "cpu", "--no-timing", "--out",
                    str(tmp_path / "run"), pythonpath=[tmp_path], cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {r["status"] for r in rows(tmp_path / "run")} == {"ok"}


def test_a_plugin_that_is_not_importable_is_named(write_suite):
    with pytest.raises(plugins.PluginError, match="plugin 'no_such_plugin' \\(--plugin\\) is "
                                                  "not importable"):
        plugins.load(["no_such_plugin"])
    path = write_suite("""
        description = "x"
        plugins = ["no_such_plugin"]
        [[sweep]]
        op = "conv2d"
    """)
    with pytest.raises(suites.SuiteError, match="plugins: plugin 'no_such_plugin' \\(suite "):
        suites.load(path)
    path = write_suite("""
        description = "x"
        plugins = [3]
        [[sweep]]
        op = "conv2d"
    """, name="bad")
    with pytest.raises(suites.SuiteError, match="plugins\\[0\\]: expected a list of module names, got 3"):
        suites.load(path)


def test_registering_for_an_unknown_operator_is_an_error(toy):
    with pytest.raises(RegistryError, match="implementation no_such_op/x names an unknown "
                                            "operator 'no_such_op'"):
        implementation("no_such_op", "x", kind="peer")(lambda inputs, params: None)
