"""The layering contracts of pyproject.toml's [tool.importlinter], run by import-linter."""

from pathlib import Path

from importlinter import cli

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0
